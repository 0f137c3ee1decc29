"""The gateway's settings: flags `--kebab-name` and `MOE_*` environment variables (see moe_core.settings)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from moe_core.settings import check, setting

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
# What a key may hold: it travels in an HTTP header, so printable ASCII without spaces.
KEY_CHARS = re.compile(r"^[\x21-\x7e]+$")
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
    router_affinity_tokens: int = setting(256, "With several routers, prompts that begin with the same this many "
                                               "tokens go to the same router (unless it has 8 more requests in "
                                               "flight than the least busy), so its prefix cache serves repeats, "
                                               "shared system prompts and conversations; 0: the least busy always")
    startup_timeout_s: float = setting(60.0, "How long to wait at start for a router to answer before giving up")
    max_prompt_tokens: int = setting(0, "Longest prompt accepted, in tokens (400 beyond; 0: the model's context)")
    max_tokens_limit: int = setting(0, "Largest max_tokens a request may ask for (400 beyond; 0: the model's "
                                       "context); also caps the output of chat requests that give none")
    api_keys: list[str] = setting([], "API keys: when any is set (here or in --api-keys-file), every route but "
                                      "/healthz, /readyz, /metrics and /openapi.json needs `Authorization: Bearer "
                                      "KEY`; repeat the flag or comma-separate the variable; empty: no authentication")
    api_keys_file: str | None = setting(None, "File of API keys, one per line (blank lines and # comments ignored), "
                                              "added to --api-keys")
    rate_limit_rpm: int = setting(0, "Requests per minute per API key (per client address without keys), as a "
                                     "token bucket holding one minute's worth; 429 beyond; 0: no limit")
    max_streams_per_key: int = setting(0, "Requests in flight at once per API key (per client address without "
                                          "keys), streaming or not; 429 beyond; 0: no limit")
    drain_grace_s: float = setting(5.0, "On SIGTERM: seconds of answering 503 on /readyz while still serving new "
                                        "requests (so load balancers notice), before no longer accepting")
    drain_timeout_s: float = setting(30.0, "On SIGTERM/SIGINT, how long in-flight requests may take to finish")
    log_level: str = setting("info", "Logging level", choices=LOG_LEVELS)
    log_format: str = setting("text", "Log lines as text or as one JSON object each", choices=LOG_FORMATS)
    log_prompts: bool = setting(False, "Log prompts (at debug level, with the request id); off: prompt text is "
                                       "never logged")

    def __post_init__(self) -> None:
        if not self.model_name and self.model:
            self.model_name = Path(self.model).resolve().name
        # A flag may also hold several comma-separated keys; whitespace around a key is not part of it.
        self.api_keys = [key.strip() for item in self.api_keys for key in item.split(",") if key.strip()]

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
        check(self.drain_grace_s >= 0, "drain_grace_s", "must not be negative")
        check(self.router_affinity_tokens >= 0, "router_affinity_tokens", "must not be negative (0: off)")
        for name in ("max_prompt_tokens", "max_tokens_limit", "rate_limit_rpm", "max_streams_per_key"):
            check(getattr(self, name) >= 0, name, "must not be negative (0: no limit)")
        self.configured_keys()

    def configured_keys(self) -> list[str]:
        """Every API key, from --api-keys and --api-keys-file; checked, and never named in an error."""
        keys = list(self.api_keys)
        if self.api_keys_file:
            path = Path(self.api_keys_file)
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                check(False, "api_keys_file", f"cannot read {path}: {type(exc).__name__}")
            keys += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
            check(len(keys) > 0, "api_keys_file", f"{path} holds no key")
        for i, key in enumerate(keys):
            check(KEY_CHARS.match(key) is not None, "api_keys",
                  f"key #{i + 1} has characters other than printable ASCII without spaces")
        return keys


def valid_address(address: str) -> bool:
    match = ADDRESS.match(address.strip())
    return match is not None and 1 <= int(match.group(2)) <= 65535
