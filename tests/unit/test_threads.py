"""One OpenMP team per service process: the compute thread gets the threads, other threads stay serial."""

from __future__ import annotations

import threading

import pytest
import torch

from moe_core.threads import compute_threads, one_thread, serial_main_thread, use_threads


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


def test_one_thread_runs_its_block_serially_and_gives_the_count_back_even_on_error():
    before = torch.get_num_threads()
    try:
        use_threads(2)
        with one_thread():
            inside = torch.get_num_threads()
        assert inside == 1 and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_thread():
            raise RuntimeError("a failed combine")
        assert torch.get_num_threads() == 2
    finally:
        use_threads(before)


def test_cluster_routers_take_every_core_and_spin_briefly_and_a_lone_router_keeps_the_default(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from moe_serve import up

    monkeypatch.setattr(up, "SHARED_CORES_ENV", {"GOMP_SPINCOUNT": "30000"})
    started: list[tuple[str, dict | None, str]] = []

    class Group:
        def start(self, service, env=None):
            started.append((service.name, env, service.argv[service.argv.index("--threads") + 1]))
            return service

    def args(threads: int = 0):
        return SimpleNamespace(routers=1, run_dir=tmp_path, cache="off", redis=None, host="127.0.0.1", dtype="auto",
                               device="cpu", kv_cache_mib=64, max_model_len=0, router_threads=threads,
                               rpc_timeout_s=5.0, draft_tokens=0, router_arg=[])

    up.start_routers(Group(), args(), tmp_path, placement=None)
    up.start_routers(Group(), args(), tmp_path, placement=tmp_path / "placement.json")
    up.start_routers(Group(), args(threads=3), tmp_path, placement=tmp_path / "placement.json")
    assert started == [("router 0", None, "0"),  # 0: torch's default, every core
                       ("router 0", {"GOMP_SPINCOUNT": "30000"}, "0"),
                       ("router 0", {"GOMP_SPINCOUNT": "30000"}, "3")]  # the flag wins


def test_a_wait_setting_the_user_made_wins(monkeypatch):
    import importlib

    from moe_serve import up

    try:
        for name, value in (("OMP_WAIT_POLICY", "PASSIVE"), ("GOMP_SPINCOUNT", "1000")):
            monkeypatch.setenv(name, value)
            assert importlib.reload(up).SHARED_CORES_ENV == {}
            monkeypatch.delenv(name)
        reloaded = importlib.reload(up)
        env = reloaded.SHARED_CORES_ENV
        assert env == {"GOMP_SPINCOUNT": str(reloaded.SPIN_COUNT)}
    finally:
        monkeypatch.undo()
        importlib.reload(up)
