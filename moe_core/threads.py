"""Torch's CPU threads in a service process: one thread computes, and it alone gets the threads.

libgomp gives every thread that starts a parallel region its own team of workers, and once a process
holds more OpenMP threads than it has CPUs, idle workers spin about 100 times instead of 300,000
before they sleep on a futex: from then on every torch op pays a wake-up. A router that loaded its
model on the main thread (one team) and stepped the engine on another (a second team) ran a decode
step in 22.7 ms instead of 11.9 ms on a 2-core machine (bench/RESULTS.md, "One OpenMP team per process").

The router computes on its engine thread: its main thread goes serial (`serial_main_thread`, before
any torch work, so loading runs there single-threaded) and the engine thread takes its count
(`use_threads`). An expert service computes on its event loop's thread, which keeps the count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_DEFAULT = torch.get_num_threads()  # torch's own choice (the cores it may use), before anyone changed it


def compute_threads(requested: int = 0) -> int:
    """Intra-op threads for the compute thread: `requested`, or torch's default when 0."""
    return requested or _DEFAULT


def serial_main_thread() -> None:
    """Run this thread's torch ops single-threaded, so it never starts an OpenMP team of its own."""
    torch.set_num_threads(1)


def use_threads(count: int) -> None:
    """Give the calling thread `count` intra-op threads (the setting is per thread under OpenMP)."""
    torch.set_num_threads(count)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed torch ops on the calling thread alone, then give it back its thread count.

    For short ops at moments when the other cores are likely busy (a cluster router's split and sends
    while the first shards compute, its combine as the last shard's process still runs): an OpenMP op
    waits at its barriers for every worker, and a worker whose core is taken waits for the scheduler.
    torch's `index_add_` sorts its index in parallel passes, a barrier each: a 32-row combine took
    3.2 ms on two threads and 0.5 ms on one beside a busy process on a 2-core machine
    (bench/RESULTS.md, "The combine's barriers")."""
    count = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(count)
