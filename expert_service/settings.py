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
    placement: str | None = setting(None, "placement file (JSON); serves the shard named by --shard-id")
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 in containers)")
    port: int = setting(50051, "gRPC port (0 picks a free port; see --ready-file)")
    metrics_port: int = setting(9401, "Prometheus /metrics HTTP port (0: a free port, -1: off)")
    per_expert_metrics: bool = setting(True, "export rows per (layer, expert); off for very large models")
    dtype: str = setting("auto", "compute dtype", choices=["auto", "float32", "bfloat16", "float16"])
    device: str = setting("auto", "compute device: cpu, cuda, cuda:N or auto")
    threads: int = setting(0, "torch intra-op threads (0: torch's default)")
    model_id: str | None = setting(None, "model name reported by Describe (default: the folder name)")
    ready_file: str | None = setting(None, "write {pid, port} here as JSON once serving")
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR")

    def validate(self) -> None:
        check(bool(self.experts) != bool(self.placement), "experts", "give exactly one of --experts or --placement")
        check(self.layers is None or bool(self.experts), "layers", "--layers only goes with --experts")
        check(0 <= self.port < 65536, "port", f"{self.port} is not a TCP port")
        check(-1 <= self.metrics_port < 65536, "metrics_port", f"{self.metrics_port} is not a TCP port (or -1)")
        check(self.threads >= 0, "threads", "must be >= 0")
