"""`moe-serve demo`: make the built-in demo model and print where it is."""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_core.demo import ensure_demo_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path", type=Path, default=None, help="folder to build into (default: the cache folder)")


def run(args: argparse.Namespace) -> int:
    print(ensure_demo_model(args.path))
    return 0
