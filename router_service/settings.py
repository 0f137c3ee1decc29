"""Settings of a router (flags and MOE_* variables from one definition)."""

from __future__ import annotations

from dataclasses import dataclass

from moe_core.settings import check, setting


@dataclass
class RouterSettings:
    """A router: runs the dense part of the model with continuous batching and fans experts out to shards."""

    model: str | None = setting(None, "model folder (Hugging Face layout)", required=True)
    experts: str = setting("grpc", "where routed experts run: on expert services, or in this process",
                           choices=["grpc", "local"])
    shard: list[str] = setting([], "a shard and its replicas, 'shard-0=host:port,host:port' (repeatable)")
    placement: str | None = setting(None, "placement file (JSON) naming shards and their replicas' addresses")
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 in containers)")
    port: int = setting(50050, "gRPC port (0 picks a free port; see --ready-file)")
    metrics_port: int = setting(9400, "Prometheus /metrics HTTP port (0: a free port, -1: off)")
    per_expert_metrics: bool = setting(True, "export tokens per (layer, expert); off for very large models "
                                             "(per-layer totals stay)")
    balance_window: int = setting(1024, "steps per layer in the balancedness window")
    dtype: str = setting("auto", "compute dtype", choices=["auto", "float32", "bfloat16", "float16"])
    device: str = setting("auto", "compute device: cpu, cuda, cuda:N or auto")
    threads: int = setting(0, "torch intra-op threads (0: torch's default)")
    kv_cache_mib: int = setting(1024, "KV-cache budget in MiB")
    block_size: int = setting(16, "tokens per KV-cache block")
    max_num_seqs: int = setting(64, "most sequences in one batch")
    max_num_batched_tokens: int = setting(2048, "most tokens in one step (long prompts are prefilled in chunks)")
    max_model_len: int = setting(0, "longest prompt + output accepted (0: the model's limit)")
    prefix_cache: bool = setting(True, "reuse the KV-cache blocks of prompt prefixes seen before (repeated "
                                       "prompts, shared system prompts, preempted sequences skip that prefill)")
    overlap: bool = setting(False, "split each step into two micro-batches so one computes while the other's "
                                   "experts are in flight (grpc experts only; pays off when the expert services run "
                                   "on other machines or GPUs, not when they share this machine's cores)")
    draft_tokens: int = setting(0, "repeat drafts: a request that repeats an earlier one (same prompt, greedy or "
                                   "the same seed) has up to this many tokens of the earlier output verified per "
                                   "step, so it finishes in a few steps with the same tokens (0: off)")
    max_queue: int = setting(256, "most requests waiting for a batch slot; past it new requests get "
                                   "RESOURCE_EXHAUSTED (HTTP 429) instead of unbounded latency")
    drain_timeout_s: float = setting(30.0, "on SIGTERM, how long in-flight requests may run before they end "
                                           "with an error")
    expert_transport: str = setting("auto", "hot path to the experts: auto (each replica's data plane where it offers "
                                            "one, gRPC otherwise) or grpc (ForwardStream only)",
                                    choices=["auto", "grpc"])
    rpc_timeout_s: float = setting(30.0, "deadline of one call to an expert shard")
    health_interval_s: float = setting(1.0, "how often replicas are health-checked (and down ones probed)")
    connect_timeout_s: float = setting(120.0, "how long to wait at start for every shard to answer")
    cache: str = setting("off", "expert-output cache: off, local (in-process LRU), redis (LRU in front of Redis)",
                         choices=["off", "local", "redis"])
    redis_url: str | None = setting(None, "Redis for --cache redis, e.g. redis://127.0.0.1:6379/0")
    cache_local_mib: int = setting(256, "bytes the in-process cache holds, in MiB (taken at start)")
    cache_ttl_s: int = setting(3600, "expiry of entries written to Redis")
    cache_phases: str = setting("both", "which rows use the cache", choices=["prefill", "decode", "both"])
    cache_prefix: str = setting("moe", "key prefix, so several deployments can share one Redis")
    cache_redis_timeout_ms: float = setting(50.0, "Redis timeout; slower answers count as errors and are computed")
    seed: int | None = setting(None, "seed of the generator used by requests without their own seed")
    model_id: str | None = setting(None, "model name reported to clients (default: the folder name)")
    ready_file: str | None = setting(None, "write {pid, port} here as JSON once serving")
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = setting("text", "log lines as text or one JSON object per line", choices=["text", "json"])
    tls_cert: str | None = setting(None, "PEM certificate of this router's gRPC server (enables TLS)")
    tls_key: str | None = setting(None, "PEM private key for --tls-cert")
    tls_client_ca: str | None = setting(None, "PEM CA; clients (gateways) must present a certificate it signed")
    expert_tls_ca: str | None = setting(None, "PEM CA that signed the expert services' certificates (enables TLS)")
    expert_tls_cert: str | None = setting(None, "PEM client certificate presented to expert services (mutual TLS)")
    expert_tls_key: str | None = setting(None, "PEM private key for --expert-tls-cert")
    expert_tls_server_name: str | None = setting(None, "name to verify in the experts' certificates (default: "
                                                       "the address's host)")

    def validate(self) -> None:
        check(0 <= self.port < 65536, "port", f"{self.port} is not a TCP port")
        check(-1 <= self.metrics_port < 65536, "metrics_port", f"{self.metrics_port} is not a TCP port (or -1)")
        check(self.balance_window > 0, "balance_window", "must be positive")
        if self.experts == "grpc":
            check(bool(self.shard) != bool(self.placement), "shard",
                  "with --experts grpc give the shards with --shard (repeatable) or --placement")
        else:
            check(not self.shard and not self.placement, "shard", "--shard/--placement need --experts grpc")
        for spec in self.shard:
            name, _, addresses = spec.partition("=")
            check(bool(name) and bool(addresses) and all(":" in a for a in addresses.split(",")), "shard",
                  f"'{spec}' is not 'name=host:port[,host:port...]'")
        for name in ("kv_cache_mib", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            check(getattr(self, name) > 0, name, "must be positive")
        check(self.max_model_len >= 0, "max_model_len", "must be >= 0")
        check(self.draft_tokens >= 0, "draft_tokens", "must be >= 0")
        for name in ("rpc_timeout_s", "health_interval_s", "connect_timeout_s"):
            check(getattr(self, name) > 0, name, "must be positive")
        check(self.threads >= 0, "threads", "must be >= 0")
        check(self.max_queue > 0 and self.drain_timeout_s >= 0, "max_queue", "must be positive")
        check(bool(self.tls_cert) == bool(self.tls_key), "tls_cert", "give both --tls-cert and --tls-key")
        check(not self.tls_client_ca or bool(self.tls_cert), "tls_client_ca", "mutual TLS needs --tls-cert too")
        check(bool(self.expert_tls_cert) == bool(self.expert_tls_key), "expert_tls_cert",
              "give both --expert-tls-cert and --expert-tls-key")
        check(not self.expert_tls_cert or bool(self.expert_tls_ca), "expert_tls_ca",
              "a client certificate for experts needs --expert-tls-ca")
        check(self.cache != "redis" or bool(self.redis_url), "redis_url", "--cache redis needs a Redis URL")
        check(self.cache_local_mib > 0 and self.cache_ttl_s > 0 and self.cache_redis_timeout_ms > 0, "cache_local_mib",
              "cache sizes and times must be positive")

    def shard_addresses(self) -> dict[str, list[str]]:
        """From --shard flags: shard id -> replica addresses."""
        out: dict[str, list[str]] = {}
        for spec in self.shard:
            name, _, addresses = spec.partition("=")
            out.setdefault(name, []).extend(a.strip() for a in addresses.split(",") if a.strip())
        return out
