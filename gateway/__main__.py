"""`python -m gateway`: the OpenAI-compatible HTTP gateway as a process (settings from flags and MOE_* vars).

Steps: parse settings, set up logging (text or JSON), load the tokenizer, wait for a router to answer, bind
the socket ourselves (so port 0 works and the real port is known), serve, write the ready file, and drain on
SIGTERM/SIGINT (see GatewayServer).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

import uvicorn

from gateway.app import create_app
from gateway.errors import GatewayError
from gateway.router_client import RouterPool
from gateway.server import GatewayServer, bind, write_ready_file
from gateway.settings import GatewaySettings
from moe_core.errors import TokenizerError
from moe_core.lifecycle import die_with_parent
from moe_core.logs import setup_logging
from moe_core.pb import router_pb2
from moe_core.settings import parse_settings
from moe_core.tokenizer import Tokenizer

log = logging.getLogger("gateway")


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    settings = parse_settings(GatewaySettings, argv, prog="python -m gateway")
    setup_logging(settings.log_level, settings.log_format, "gateway")
    try:
        tokenizer = Tokenizer.from_dir(settings.model)
    except TokenizerError as exc:
        print(f"gateway: cannot load the tokenizer: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(settings, tokenizer))
    except KeyboardInterrupt:  # Ctrl-C while still waiting for the router
        return 130


async def serve(settings: GatewaySettings, tokenizer: Tokenizer) -> int:
    pool = RouterPool(settings.router, settings.router_affinity_tokens)
    ready_file = Path(settings.ready_file) if settings.ready_file else None
    try:
        info = await wait_for_router(pool, settings.startup_timeout_s)
        if info is None:
            print(f"gateway: no router answered at {', '.join(settings.router)} within "
                  f"{settings.startup_timeout_s:g} s; is the router running?", file=sys.stderr)
            return 1
        log.info("serving %s as %r (revision %s, context %d) via %d router(s)", info.model_id,
                 settings.model_name, info.model_revision, info.max_model_len, len(settings.router))
        sock = bind(settings.host, settings.port)
        port = sock.getsockname()[1]
        app = create_app(settings, pool, tokenizer)
        # log_config=None: uvicorn's loggers go through our handler (text or JSON); our own access log
        # (gateway.access) replaces uvicorn's, which would log raw paths and no request id.
        config = uvicorn.Config(app, log_level=settings.log_level, lifespan="off", log_config=None,
                                access_log=False, timeout_graceful_shutdown=settings.drain_timeout_s)  # type: ignore[arg-type]

        def announce() -> None:
            log.info("listening on http://%s:%d", settings.host, port)
            if ready_file is not None:
                write_ready_file(ready_file, port)

        def drain() -> None:
            app.state.gateway.draining = True

        server = GatewayServer(config, on_started=announce, on_drain=drain, drain_grace_s=settings.drain_grace_s)
        await server.serve(sockets=[sock])
        log.info("stopped")
        return 0
    finally:
        await pool.close()
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)  # a stale file would point a launcher at a dead port


async def wait_for_router(pool: RouterPool, timeout_s: float) -> router_pb2.ModelInfo | None:
    """The router's model info, retried with backoff while the router starts; None if it never answers."""
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        try:
            return await pool.model_info(refresh=True)
        except GatewayError as exc:
            if time.monotonic() + delay > deadline:
                log.error("router not reachable: %s", exc.message)
                return None
            if delay == 0.1:
                log.info("waiting for a router at %s", ", ".join(pool.addresses))
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


if __name__ == "__main__":
    sys.exit(main())
