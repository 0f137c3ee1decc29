"""`moe-serve deploy render --target k8s|compose`: write the per-shard manifests for a placement.

    moe-serve deploy render --target k8s                       # deploy/k8s/base for the default 2 shards
    moe-serve deploy render --target k8s --placement p.json --replicas 2 --out my-base
    moe-serve deploy render --target compose --placement p.json    # ./docker-compose.yml + its placement
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_serve.deploy import compose, k8s
from moe_serve.deploy.spec import DEFAULT_MODEL_NAME, IMAGE, DeployConfig, load_shards

DEFAULT_OUT = {"k8s": Path("deploy/k8s/base"), "compose": Path(".")}
DASHBOARDS = Path("deploy/grafana/dashboards")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="deploy_command", required=True)
    r = sub.add_parser("render", help="write Kubernetes manifests (kustomize base) or a compose file")
    r.add_argument("--target", required=True, choices=["k8s", "compose"])
    r.add_argument("--placement", help="placement file (JSON, see moe_core/placement.py); default: 2 even shards")
    r.add_argument("--shards", type=int, help="without --placement: an even split into this many shards")
    r.add_argument("--model", help="model folder: check the placement against its config.json (and size --shards)")
    r.add_argument("--out", type=Path, help="output folder (default: deploy/k8s/base for k8s; . for compose, "
                                            "the repository root, which the compose file's paths are relative to)")
    r.add_argument("--replicas", type=int, default=1, help="replicas per shard (and of gateway and router)")
    r.add_argument("--max-replicas", type=int, default=4, help="k8s: autoscaling ceiling per workload")
    r.add_argument("--image", default=IMAGE, help="container image of gateway, router and experts")
    r.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="model id the API serves")
    r.add_argument("--dashboards", type=Path, default=DASHBOARDS,
                   help="k8s: Grafana dashboard JSON files to ship as ConfigMaps (skipped if the folder is absent)")
    r.add_argument("--check", action="store_true", help="write nothing; exit 1 if the files on disk differ")


def render_files(args: argparse.Namespace) -> dict[str, str]:
    if args.replicas < 1 or args.max_replicas < 1:
        raise SystemExit("moe-serve deploy render: --replicas and --max-replicas must be at least 1")
    shards = load_shards(args.placement, args.model, args.shards)
    cfg = DeployConfig(shards, replicas=args.replicas, max_replicas=args.max_replicas, image=args.image,
                       model_name=args.model_name)
    if args.target == "compose":
        return compose.render(cfg)
    return k8s.render(cfg, args.dashboards if args.dashboards and args.dashboards.is_dir() else None)


def stale_files(out: Path, files: dict[str, str], target: str) -> list[str]:
    """Files that differ from what would be written; for k8s also stray .yaml files in the folder."""
    stale = [name for name, text in files.items()
             if not (out / name).is_file() or (out / name).read_text() != text]
    if target == "k8s" and out.is_dir():
        stale += sorted(p.name for p in out.iterdir() if p.suffix == ".yaml" and p.name not in files)
    return stale


def run(args: argparse.Namespace) -> int:
    files = render_files(args)
    out = args.out or DEFAULT_OUT[args.target]
    if args.check:
        stale = stale_files(out, files, args.target)
        for name in stale:
            print(f"out of date: {out / name}", file=sys.stderr)
        return 1 if stale else 0
    if args.target == "k8s" and out.is_dir():  # shards that left the placement leave no manifests behind
        for old in out.glob("expert-*.yaml"):
            if old.name not in files:
                old.unlink()
    for name, text in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
    return 0
