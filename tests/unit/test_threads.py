"""One OpenMP team per service process: the compute thread gets the threads, other threads stay serial."""

from __future__ import annotations

import threading

import torch

from moe_core.threads import compute_threads, serial_main_thread, use_threads


def test_zero_means_torch_default_and_a_count_is_kept():
    assert compute_threads(3) == 3
    assert compute_threads(0) >= 1


def test_the_setting_is_per_thread():
    before = torch.get_num_threads()
    seen: list[int] = []

    def worker():
        use_threads(before + 1)
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [before + 1] and torch.get_num_threads() == before


def test_serial_main_thread_runs_single_threaded():
    before = torch.get_num_threads()
    try:
        serial_main_thread()
        assert torch.get_num_threads() == 1
    finally:
        use_threads(before)
