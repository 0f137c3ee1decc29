"""Resident memory of a process whose packed linear layers see every row count from 1 to N.

    python -m bench.kernel_memory --rows 600

oneDNN compiles and keeps a kernel per distinct row count; this runs one gate/up-shaped and one
down-shaped layer (bench-s sizes) over rows 1..N twice, with the row split (moe_core/linear.py) on and
off, each in a fresh process, and prints the RSS after each pass and the time per pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def child(rows: int) -> None:
    import torch

    from moe_core.linear import Linear

    torch.set_num_threads(2)
    torch.manual_seed(0)
    gate_up, down = Linear(torch.randn(2816, 512)), Linear(torch.randn(512, 1408))
    inputs = {m: torch.randn(m, 512) for m in range(1, rows + 1)}

    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    report = {"rss_start_mib": round(rss_mib())}
    for n in (1, 2):
        started = time.perf_counter()
        for m in range(1, rows + 1):
            down(gate_up(inputs[m])[:, :1408].contiguous())
        report[f"pass{n}_s"] = round(time.perf_counter() - started, 2)
        report[f"rss_after_pass{n}_mib"] = round(rss_mib())
    print(json.dumps(report))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.rows)
        return 0
    for split in ("1", "0"):
        out = subprocess.run([sys.executable, "-m", "bench.kernel_memory", "--child", "--rows", str(args.rows)],
                             env={**os.environ, "MOE_SPLIT_ROWS": split}, capture_output=True, text=True, check=True)
        print(json.dumps({"row_split": split == "1", **json.loads(out.stdout)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
