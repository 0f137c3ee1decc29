"""Draw the expert-utilization heatmap (layers x experts) from what Prometheus scraped.

    python docs/make_heatmap.py --prometheus http://127.0.0.1:9090 --out heatmap.png [--range 15m]
    python docs/make_heatmap.py --demo     # the picture in docs/: a real run, made from scratch

`--demo` starts `moe-serve up` (demo model, 2 shards) and a Prometheus on it (moe_serve.prometheus),
drives it with a seeded mixed workload (completions and chats, text and token-id prompts, short and
long, some streamed) and draws docs/expert-utilization-heatmap.png once Prometheus has scraped the
last of it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "expert-utilization-heatmap.png"


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=30).json()
    if reply["status"] != "success":
        raise RuntimeError(f"{expr}: {reply}")
    return reply["data"]["result"]


def fetch(prometheus: str, window: str | None = None) -> dict[str, Any]:
    """Tokens routed per (layer, expert), summed over routers: since start, or over the last `window`."""
    series = "moe_expert_tokens_total"
    expr = f"sum by (layer, expert) (increase({series}[{window}]))" if window else f"sum by (layer, expert) ({series})"
    cells = {(int(r["metric"]["layer"]), int(r["metric"]["expert"])): float(r["value"][1])
             for r in query(prometheus, expr)}
    if not cells:
        raise RuntimeError(f"Prometheus at {prometheus} has no {series} (is it scraping a router?)")
    layers = sorted({layer for layer, _ in cells})
    experts = list(range(max(e for _, e in cells) + 1))
    balance = {int(r["metric"]["layer"]): float(r["value"][1])
               for r in query(prometheus, "avg by (layer) (moe_expert_balancedness)")}
    held = f'group by (shard, expert) (moe_expert_shard_tokens_total{{layer="{layers[0]}"}})'
    shards = {int(r["metric"]["expert"]): r["metric"]["shard"] for r in query(prometheus, held)}  # who computes it
    return {"layers": layers, "experts": experts, "balancedness": balance, "shards": shards,
            "tokens": [[cells.get((layer, e), 0.0) for e in experts] for layer in layers]}


def render(data: dict[str, Any], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tokens = np.array(data["tokens"])  # [layers, experts]
    share = tokens / np.maximum(tokens.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.1 * len(data["experts"]) + 3.5, 0.8 * len(data["layers"]) + 2.2))
    image = ax.imshow(share, cmap="YlOrRd", vmin=0, aspect="auto")
    for (i, j), value in np.ndenumerate(tokens):
        dark = share[i, j] > 0.6 * share.max()
        ax.text(j, i, f"{share[i, j]:.0%}\n{value:.0f}", ha="center", va="center", fontsize=8,
                color="white" if dark else "black")
    ax.set_xticks(range(len(data["experts"])), [f"{e}\n{data['shards'].get(e, '')}" for e in data["experts"]])
    ax.set_yticks(range(len(data["layers"])),
                  [f"layer {layer}\nbal. {data['balancedness'].get(layer, float('nan')):.2f}"
                   for layer in data["layers"]])
    ax.set_xlabel("expert")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="share of the layer's routed tokens")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def mixed_requests(n: int, seed: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """(route, body) pairs: completions with text or token-id prompts, chats, streamed or not."""
    rng = random.Random(seed)
    words = ["the", "river", "ran", "past", "old", "mill", "while", "a", "small", "boat", "drifted", "toward",
             "harbour", "and", "children", "counted", "ships", "that", "sailed", "beyond", "lighthouse", "into",
             "grey", "morning"]
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.choice((4, 12, 40, 120))))
        body: dict[str, Any] = {"model": "", "max_tokens": rng.choice((8, 16, 48)), "seed": i,
                                "temperature": rng.choice((0.0, 0.8, 1.0)), "ignore_eos": True}
        kind = i % 4
        if kind == 0:
            out.append(("/v1/completions", {**body, "prompt": text}))
        elif kind == 1:
            ids = [rng.randrange(5, 2000) for _ in range(rng.choice((16, 64, 200)))]
            out.append(("/v1/completions", {**body, "prompt": ids}))
        elif kind == 2:
            out.append(("/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}))
        else:
            out.append(("/v1/completions", {**body, "prompt": text, "stream": True}))
    return out


def drive(base_url: str, model: str, requests: list[tuple[str, dict[str, Any]]], concurrency: int = 4) -> int:
    def one(item: tuple[str, dict[str, Any]]) -> int:
        route, body = item
        return httpx.post(base_url + route, json={**body, "model": model}, timeout=300).status_code

    with ThreadPoolExecutor(concurrency) as pool:
        codes = list(pool.map(one, requests))
    return sum(code == 200 for code in codes)


def wait_until_scraped(prometheus: str, base_url: str, timeout_s: float = 60.0) -> None:
    """Until Prometheus' latest scrape has every token the gateway's /v1/experts/stats counts."""
    want = sum(map(sum, httpx.get(f"{base_url}/v1/experts/stats", timeout=30).json()["tokens"]))
    deadline = time.monotonic() + timeout_s
    while True:
        got = query(prometheus, "sum(moe_expert_tokens_total)")
        if got and float(got[0]["value"][1]) == want:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"Prometheus has {got} routed tokens, the cluster {want}")
        time.sleep(0.5)


def demo(out: Path, n: int) -> Path:
    from moe_core.demo import ensure_demo_model
    from moe_serve.prometheus import start_prometheus, stop_prometheus

    model = ensure_demo_model()
    run_dir = Path(tempfile.mkdtemp(prefix="moe-heatmap-"))
    up = subprocess.Popen([sys.executable, "-m", "moe_serve.cli", "up", "--model", str(model), "--shards", "2",
                           "--port", "0", "--run-dir", str(run_dir), "--dtype", "float32", "--device", "cpu"],
                          stdout=(run_dir / "up.out").open("w"), stderr=subprocess.STDOUT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        while not (run_dir / "cluster.json").exists():
            if up.poll() is not None:
                raise RuntimeError((run_dir / "up.out").read_text())
            time.sleep(0.2)
        cluster = json.loads((run_dir / "cluster.json").read_text())
        prometheus, url = start_prometheus(run_dir, cluster)
        try:
            ok = drive(cluster["url"], model.resolve().name, mixed_requests(n))
            wait_until_scraped(url, cluster["url"])
            title = (f"moe-serve demo model, 2 shards: tokens routed per (layer, expert), from Prometheus\n"
                     f"{ok} requests of a mixed workload (completions, chats, text and token-id prompts)")
            return render(fetch(url), out, title)
        finally:
            stop_prometheus(prometheus)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prometheus", help="base URL of a Prometheus scraping the routers")
    source.add_argument("--demo", action="store_true", help="start a demo cluster + Prometheus, load it, draw")
    parser.add_argument("--range", dest="window", help="only the last WINDOW (e.g. 15m) instead of since start")
    parser.add_argument("--requests", type=int, default=96, help="with --demo: requests in the workload")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.demo:
        path = demo(args.out, args.requests)
    else:
        over = f" over the last {args.window}" if args.window else ""
        path = render(fetch(args.prometheus, args.window), args.out, f"Tokens routed per (layer, expert){over}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
