"""python -m expert_service: serve one shard of a model's experts over gRPC."""

from __future__ import annotations

import sys

from expert_service.server import run
from expert_service.settings import ExpertSettings
from moe_core.errors import MoeServeError
from moe_core.lifecycle import die_with_parent
from moe_core.logs import setup_logging
from moe_core.settings import parse_settings


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    settings = parse_settings(ExpertSettings, argv, prog="python -m expert_service")
    setup_logging(settings.log_level, settings.log_format, "expert")
    try:
        run(settings)
    except MoeServeError as exc:
        print(f"expert_service: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
