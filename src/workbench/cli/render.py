"""`workbench render-pod` and `workbench render-cluster`: the Kubernetes objects a user would get, rendered offline.

Both need the ``kubernetes`` extra (KubeSpawner, kubernetes_asyncio); they import it only when they run, so the
``workbench`` command and the embedded mode work without it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from workbench.cli.util import load_policy_or_report, split_groups


def _kubernetes_module(command: str, module: str):
    """Import ``module`` (which needs the ``kubernetes`` extra), or say on stderr which extra is missing (None)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in ("kubespawner", "kubernetes_asyncio", "kubernetes"):
            raise
        print(
            f"{command} needs the Kubernetes packages ({e}); install them with: pip install 'workbench[kubernetes]'",
            file=sys.stderr,
        )
        return None


def _option(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. worker_cores=2), got {text!r}")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def add_render_cluster_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``workbench render-cluster`` to ``parser`` (a sub-command's parser)."""
    parser.add_argument("--config", required=True, help="platform YAML")
    parser.add_argument("--user", required=True, help="gateway (hub) user name")
    parser.add_argument("--groups", default="", help="the user's groups, comma-separated (G1,G2)")
    parser.add_argument(
        "--option",
        "-o",
        dest="options",
        action="append",
        type=_option,
        default=[],
        metavar="KEY=VALUE",
        help="a cluster option as the user would set it (repeatable): worker_cores=2, worker_memory=4, worker_gpus=1",
    )
    parser.add_argument("--namespace", default="workbench", help="namespace of the clusters (default: %(default)s)")
    parser.add_argument(
        "--component",
        choices=["scheduler", "worker", "all"],
        default="all",
        help="which pod to print (default: %(default)s, as two YAML documents)",
    )
    parser.set_defaults(func=cmd_render_cluster)
    return parser


def cmd_render_cluster(args: argparse.Namespace) -> int:
    """Print the pods of a user's Dask cluster as YAML. Exit 2: bad policy; 3: options refused."""
    import yaml

    kube = _kubernetes_module("render-cluster", "workbench.gateway.kube")
    if kube is None:
        return 2
    policy = load_policy_or_report(args.config)
    if policy is None:
        return 2
    groups = split_groups(args.groups)
    try:
        pods = kube.render_cluster_pods(policy, args.user, groups, dict(args.options), namespace=args.namespace)
    except kube.ClusterOptionsError as e:
        print(f"refused: {e}", file=sys.stderr)
        return 3
    wanted = ["scheduler", "worker"] if args.component == "all" else [args.component]
    print(yaml.safe_dump_all([pods[c] for c in wanted], sort_keys=False), end="")
    return 0


def main_render_cluster(argv: list[str] | None = None) -> int:
    """``workbench render-cluster``: the scheduler and worker pods of a user's Dask cluster, offline."""
    parser = argparse.ArgumentParser(
        prog="workbench render-cluster",
        description="Print the scheduler and worker pods dask-gateway's Kubernetes controller would create "
        "for a user's Dask cluster with the given options (no cluster needed).",
    )
    add_render_cluster_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


def cmd_render_pod(args) -> int:
    import yaml
    from tornado import web

    kube = _kubernetes_module("render-pod", "workbench.spawn.kube")
    if kube is None:
        return 2
    policy = load_policy_or_report(args.config)
    if policy is None:
        return 2
    groups = split_groups(args.groups)
    try:
        pod = kube.render_pod(policy, args.user, groups, args.profile)
    except web.HTTPError as e:
        print(f"refused ({e.status_code}): {e.log_message}", file=sys.stderr)
        return 3
    print(yaml.safe_dump(pod, sort_keys=False), end="")
    return 0
