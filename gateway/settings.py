"""The gateway's settings: flags `--kebab-name` and `MOE_*` environment variables (see moe_core.settings)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from moe_core.settings import check, setting

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# host:port where host is a name, an IPv4 address or a bracketed IPv6 address.
ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


@dataclass
class GatewaySettings:
    """OpenAI-compatible HTTP gateway in front of one or more moe-serve routers."""

    model: str = setting(help="Model folder (tokenizer.json, tokenizer_config.json with the chat template)",
                         required=True)
    router: list[str] = setting(help="Router address host:port; repeat the flag (or comma-separate the "
                                     "variable) for several routers", required=True)
    model_name: str | None = setting(None, "Model id the API serves and expects in requests "
                                           "(default: the model folder's name)")
    host: str = setting("127.0.0.1", "Interface to listen on (0.0.0.0 for all)")
    port: int = setting(8000, "TCP port to listen on (0 picks a free one; see --ready-file)")
    ready_file: str | None = setting(None, "Once listening, write {\"port\", \"pid\"} as JSON to this file "
                                           "(atomically) so a launcher can find a port-0 service")
    request_timeout_s: float = setting(600.0, "Deadline of one request, from arrival to its last token (504 beyond)")
    max_body_bytes: int = setting(2 * 1024 * 1024, "Largest request body accepted (413 beyond)")
    max_n: int = setting(16, "Largest `n` (completions per prompt) accepted")
    max_stop_sequences: int = setting(8, "Most stop strings one request may give")
    max_choices: int = setting(256, "Most completions one request may ask for (prompts × n), each a router call")
    startup_timeout_s: float = setting(60.0, "How long to wait at start for a router to answer before giving up")
    drain_timeout_s: float = setting(30.0, "On SIGTERM/SIGINT, how long in-flight requests may take to finish")
    log_level: str = setting("info", "Logging level", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        if not self.model_name and self.model:
            self.model_name = Path(self.model).resolve().name

    def validate(self) -> None:
        check(Path(self.model).is_dir(), "model", f"{self.model} is not a folder")
        check(bool(self.model_name), "model_name", "must not be empty")
        check(len(self.router) > 0, "router", "give at least one router address")
        for address in self.router:
            check(valid_address(address), "router", f"{address!r} is not host:port")
        check(0 <= self.port <= 65535, "port", f"{self.port} is not in 0..65535")
        check(self.request_timeout_s > 0, "request_timeout_s", "must be positive")
        check(self.max_body_bytes > 0, "max_body_bytes", "must be positive")
        check(self.max_n >= 1, "max_n", "must be at least 1")
        check(self.max_choices >= self.max_n, "max_choices", f"must be at least --max-n ({self.max_n})")
        check(self.max_stop_sequences >= 0, "max_stop_sequences", "must not be negative")
        check(self.startup_timeout_s > 0, "startup_timeout_s", "must be positive")
        check(self.drain_timeout_s >= 0, "drain_timeout_s", "must not be negative")


def valid_address(address: str) -> bool:
    match = ADDRESS.match(address.strip())
    return match is not None and 1 <= int(match.group(2)) <= 65535
