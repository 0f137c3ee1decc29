"""python -m router_service: the router (dense model, continuous batching, expert fan-out) over gRPC."""

from __future__ import annotations

import sys

from moe_core.errors import MoeServeError
from moe_core.lifecycle import die_with_parent
from moe_core.logs import setup_logging
from moe_core.settings import parse_settings
from router_service.server import run
from router_service.settings import RouterSettings


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    settings = parse_settings(RouterSettings, argv, prog="python -m router_service")
    setup_logging(settings.log_level, settings.log_format, "router")
    try:
        run(settings)
    except MoeServeError as exc:
        print(f"router_service: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
