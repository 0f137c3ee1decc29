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


def test_cluster_services_wait_passively_and_a_lone_router_keeps_the_default(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from moe_serve import up

    monkeypatch.setattr(up, "SHARED_CORES_ENV", {"OMP_WAIT_POLICY": "PASSIVE"})
    started: list[tuple[str, dict | None]] = []

    class Group:
        def start(self, service, env=None):
            started.append((service.name, env))
            return service

    args = SimpleNamespace(routers=1, run_dir=tmp_path, cache="off", redis=None, host="127.0.0.1", dtype="auto",
                           device="cpu", kv_cache_mib=64, max_model_len=0, router_threads=0, rpc_timeout_s=5.0,
                           router_arg=[])
    up.start_routers(Group(), args, tmp_path, placement=None)
    up.start_routers(Group(), args, tmp_path, placement=tmp_path / "placement.json")
    assert started == [("router 0", None), ("router 0", {"OMP_WAIT_POLICY": "PASSIVE"})]


def test_a_router_beside_expert_slices_takes_its_share_of_the_cores(monkeypatch):
    from types import SimpleNamespace

    from moe_serve import up

    monkeypatch.setattr(up.os, "cpu_count", lambda: 2)
    args = SimpleNamespace(router_threads=0, split="experts")
    assert up.router_threads(args, shards=0) == 0  # alone: every core
    assert up.router_threads(args, shards=2) == 1
    monkeypatch.setattr(up.os, "cpu_count", lambda: 64)
    assert up.router_threads(args, shards=2) == 21
    assert up.router_threads(SimpleNamespace(router_threads=0, split="layers"), shards=2) == 0  # takes turns
    assert up.router_threads(SimpleNamespace(router_threads=3, split="experts"), shards=2) == 3  # the flag wins


def test_a_wait_policy_the_user_set_wins(monkeypatch):
    import importlib

    from moe_serve import up

    try:
        monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
        assert importlib.reload(up).SHARED_CORES_ENV == {}
        monkeypatch.delenv("OMP_WAIT_POLICY")
        assert importlib.reload(up).SHARED_CORES_ENV == {"OMP_WAIT_POLICY": "PASSIVE"}
    finally:
        monkeypatch.undo()
        importlib.reload(up)
