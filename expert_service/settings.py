"""Settings of an expert service (flags and MOE_* variables from one definition)."""

from __future__ import annotations

from dataclasses import dataclass

from moe_core.settings import check, setting


@dataclass
class ExpertSettings:
    """An expert service: hosts one shard of a model's experts behind moe.v1.ExpertService."""

    model: str | None = setting(None, "model folder (Hugging Face layout); only this shard's experts are read",
                                required=True)
    shard_id: str = setting("shard-0", "name of the shard served (replicas of a shard share it)")
    experts: str | None = setting(None, "experts held on every MoE layer: '0-3', '0,2,5-7' or 'all'")
    layers: str | None = setting(None, "with --experts: only these MoE layers, e.g. '0-3' (default: all)")
    ffn: str = setting("0/1", "with --experts: the slice PART/PARTS of each expert's FFN computed here, e.g. '1/2' "
                              "(tensor-parallel experts; the router adds the parts up)")
    placement: str | None = setting(None, "placement file (JSON); serves the shard named by --shard-id")
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 in containers)")
    port: int = setting(50051, "gRPC port (0 picks a free port; see --ready-file)")
    data_port: int = setting(50052, "port of the data plane, the router's hot path: ForwardStream's messages framed "
                                    "on TCP, ≈ 4× cheaper per layer step than Python gRPC (0: a free port, -1: off)")
    metrics_port: int = setting(9401, "Prometheus /metrics HTTP port (0: a free port, -1: off)")
    per_expert_metrics: bool = setting(True, "export rows per (layer, expert); off for very large models")
    dtype: str = setting("auto", "compute dtype", choices=["auto", "float32", "bfloat16", "float16"])
    device: str = setting("auto", "compute device: cpu, cuda, cuda:N or auto")
    threads: int = setting(0, "torch intra-op threads (0: torch's default)")
    model_id: str | None = setting(None, "model name reported by Describe (default: the folder name)")
    ready_file: str | None = setting(None, "write {pid, port} here as JSON once serving")
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = setting("text", "log lines as text or one JSON object per line", choices=["text", "json"])
    drain_grace_s: float = setting(3.0, "on SIGTERM: seconds of answering NOT_SERVING to health checks while still "
                                        "serving, so routers move traffic away before the server stops")
    tls_cert: str | None = setting(None, "PEM certificate of this gRPC server (enables TLS)")
    tls_key: str | None = setting(None, "PEM private key for --tls-cert")
    tls_client_ca: str | None = setting(None, "PEM CA; callers (routers) must present a certificate it signed "
                                              "(mutual TLS: only routers can call this service)")

    def validate(self) -> None:
        check(bool(self.experts) != bool(self.placement), "experts", "give exactly one of --experts or --placement")
        check(self.layers is None or bool(self.experts), "layers", "--layers only goes with --experts")
        check(self.ffn == "0/1" or bool(self.experts), "ffn", "--ffn only goes with --experts (a placement names it)")
        check(0 <= self.port < 65536, "port", f"{self.port} is not a TCP port")
        check(-1 <= self.data_port < 65536, "data_port", f"{self.data_port} is not a TCP port (or -1)")
        check(-1 <= self.metrics_port < 65536, "metrics_port", f"{self.metrics_port} is not a TCP port (or -1)")
        check(self.threads >= 0, "threads", "must be >= 0")
        check(self.drain_grace_s >= 0, "drain_grace_s", "must be >= 0")
        check(bool(self.tls_cert) == bool(self.tls_key), "tls_cert", "give both --tls-cert and --tls-key")
        check(not self.tls_client_ca or bool(self.tls_cert), "tls_client_ca", "mutual TLS needs --tls-cert too")
