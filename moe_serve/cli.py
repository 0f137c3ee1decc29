"""`moe-serve`: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import logging
import sys

from moe_core.errors import MoeServeError


def build_parser() -> argparse.ArgumentParser:
    from moe_serve import demo_cmd, generate, up

    parser = argparse.ArgumentParser(prog="moe-serve", description="Serve Mixture-of-Experts language models.")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="answer a prompt with the one-process engine, streaming")
    generate.add_arguments(gen)
    gen.set_defaults(run=generate.run)
    cluster = sub.add_parser("up", help="start a local cluster: gateway, router(s), expert shards x replicas")
    up.add_arguments(cluster)
    cluster.set_defaults(run=up.run)
    bench = sub.add_parser("bench", help="benchmark serving configurations side by side (see bench/)")
    bench.set_defaults(run=_run_bench)
    _add_bench_arguments(bench)
    demo = sub.add_parser("demo", help="build the built-in demo model (if needed) and print its folder")
    demo_cmd.add_arguments(demo)
    demo.set_defaults(run=demo_cmd.run)
    from moe_serve import health
    from moe_serve.deploy import cli as deploy_cli
    check = sub.add_parser("health", help="check a service's health (gRPC health or HTTP), for container probes")
    health.add_arguments(check)
    check.set_defaults(run=health.run)
    deploy = sub.add_parser("deploy", help="render Kubernetes manifests or a compose file from a placement")
    deploy_cli.add_arguments(deploy)
    deploy.set_defaults(run=deploy_cli.run)
    from moe_serve import plan
    placement = sub.add_parser("plan", help="a placement from measured expert load (balanced, hot experts copied)")
    plan.add_arguments(placement)
    placement.set_defaults(run=plan.run)
    return parser


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    try:
        from bench.run import add_arguments
    except ImportError:  # bench/ lives in the source tree, not in an installed wheel
        p.add_argument("rest", nargs="*")
        return
    add_arguments(p)


def _run_bench(args: argparse.Namespace) -> int:
    try:
        from bench.run import run
    except ImportError:
        print("moe-serve bench runs from a source checkout (the bench/ folder)", file=sys.stderr)
        return 2
    return run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except MoeServeError as exc:
        print(f"moe-serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
