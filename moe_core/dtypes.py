"""Names of the dtypes and devices a user can ask for, and the 'auto' choice."""

from __future__ import annotations

import functools

import torch

from moe_core.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NAMES = {v: k for k, v in DTYPES.items()}


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """bfloat16 matmuls only beat float32 on CPUs with native bf16 instructions (AVX-512 BF16 / AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_has_amx_bf16() -> bool:
    """Intel AMX tiles with bf16 (Sapphire Rapids and later), where oneDNN's bf16 kernels run fastest."""
    return "amx_bf16" in cpu_flags()


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """'auto' is bfloat16 on CUDA and on CPUs with native bf16, float32 otherwise."""
    if name == "auto":
        if device.startswith("cuda") or cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype '{name}'; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"unknown device '{name}'; choose cpu, cuda, cuda:N or auto")
    return name


def describe_device(device: str) -> str:
    """"cpu", or the accelerator with its name: "cuda (NVIDIA H100 80GB HBM3)"."""
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else device
