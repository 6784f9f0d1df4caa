"""The ``workbench`` command."""

from __future__ import annotations

import argparse
import sys

from workbench import __version__
from workbench.cli.render import add_render_cluster_arguments, cmd_render_pod
from workbench.cli.util import load_policy_or_report, split_groups
from workbench.policy import Policy


def _gib(n: int) -> str:
    return f"{n / 1e9:g}G"


def summary_table(policy: Policy) -> str:
    """A plain-text table of who may use what (pure)."""
    rows = [("group", "kind", "profiles", "dask (max cores / memory / workers)")]
    for name, g in policy.groups.items():
        dask = f"{g.dask.max_cores:g} / {_gib(g.dask.max_memory)} / {g.dask.max_workers}" if g.dask else "-"
        rows.append((name, g.kind, ", ".join(g.profiles) or "-", dask))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    prof = [("profile", "cpu", "memory", "gpu", "image")]
    for name, p in policy.profiles.items():
        gpu = f"{p.gpu.count}x {p.gpu.type}" if p.gpu else "-"
        prof.append((name, f"{p.cpu:g}", _gib(p.memory), gpu, p.image))
    pw = [max(len(r[i]) for r in prof) for i in range(len(prof[0]))]
    plines = ["  ".join(c.ljust(w) for c, w in zip(r, pw)).rstrip() for r in prof]
    plines.insert(1, "  ".join("-" * w for w in pw))
    return "\n".join(lines + [""] + plines)


def cmd_check(args) -> int:
    policy = load_policy_or_report(args.file)
    if policy is None:
        return 2
    print(f"{args.file}: valid ({len(policy.groups)} groups, {len(policy.profiles)} profiles)\n")
    print(summary_table(policy))
    if any(g.slurm for g in policy.groups.values()) or any(p.slurm for p in policy.profiles.values()):
        from workbench.spawn.slurm_jobs import placement_table

        print("\nNotebook servers as Slurm jobs (workbench up --spawner slurm):\n")
        print(placement_table(policy))
    return 0


def cmd_up(args) -> int:
    from workbench.embedded.up import UpOptions, up

    opts = UpOptions(
        config=args.config,
        port=args.port,
        bind=args.bind,
        state_dir=args.state_dir,
        allow_demo_auth_on_network=args.allow_demo_auth_on_network,
        system_users=args.system_users,
        log_to_console=args.log_to_console,
        fake_gpus=args.fake_gpus,
        gateway_backend=args.gateway_backend,
        spawner=args.spawner,
        quota_every=args.quota_every,
        quota=args.quota,
        subdomains=args.subdomains,
        subdomain_host=args.subdomain_host,
    )
    if args.hub_config_dir:
        opts.hub_config_dir = args.hub_config_dir
    return up(opts)


def build_parser() -> argparse.ArgumentParser:
    from workbench.embedded.up import DEFAULT_CONFIG

    parser = argparse.ArgumentParser(
        prog="workbench",
        description="Workbench: JupyterHub + Dask Gateway for a research computing centre, driven by one platform YAML.",
    )
    parser.add_argument("--version", action="version", version=f"workbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    up = sub.add_parser(
        "up",
        help="run the embedded workbench (hub, proxy, Dask Gateway, idle culler) in the foreground",
        description=(
            "Run the embedded workbench on this machine in the foreground: a real JupyterHub with "
            "configurable-http-proxy, single-user JupyterLab servers as local processes (one Unix account "
            "per user when run as root), Dask Gateway (local backend) at /services/dask-gateway and the "
            "idle culler. The policy is validated first; nothing starts if it is broken. Ctrl-C or SIGTERM "
            "stops everything it started."
        ),
    )
    up.add_argument("--config", default=str(DEFAULT_CONFIG), help="platform YAML to run (default: %(default)s)")
    up.add_argument("--port", type=int, default=8000, help="public port of the hub's proxy (default: %(default)s)")
    up.add_argument("--bind", default="127.0.0.1", help="address the proxy listens on (default: %(default)s)")
    up.add_argument(
        "--state-dir", default=".workbench", help="folder for databases, secrets, logs (default: %(default)s)"
    )
    up.add_argument(
        "--hub-config-dir",
        default=None,
        help="folder with jupyterhub_config.py (default: the one shipped in the package, workbench/hub_config)",
    )
    up.add_argument(
        "--allow-demo-auth-on-network",
        action="store_true",
        help="allow demo auth (one shared password) on a non-loopback --bind; for closed lab networks only",
    )
    users = up.add_mutually_exclusive_group()
    users.add_argument(
        "--system-users",
        dest="system_users",
        action="store_true",
        default=None,
        help="require one Unix account per user (default: on when root and the venv is usable by others)",
    )
    users.add_argument(
        "--no-system-users",
        dest="system_users",
        action="store_false",
        help="run every server as the current user (no isolation between users)",
    )
    up.add_argument("--log-to-console", action="store_true", help="stream the hub's log here instead of to a file")
    up.add_argument(
        "--gateway-backend",
        choices=["local", "slurm"],
        default="local",
        help="where Dask clusters run: local processes (default), or jobs on the Slurm cluster named by "
        "$SLURM_CONF, else the one-node cluster that `make slurm` starts",
    )
    up.add_argument(
        "--spawner",
        choices=["local", "slurm"],
        default="local",
        help="where notebook servers run: local processes (default), or Slurm jobs of each user's account on the "
        "cluster that `make slurm` starts (supercomputer mode, with --gateway-backend slurm; needs root and sudo)",
    )
    up.add_argument(
        "--fake-gpus",
        default="",
        metavar="TYPE:N,...",
        help="pretend this machine has N GPUs of TYPE (e.g. h100:2) to try GPU profiles and their exclusive "
        "allocation without a GPU; the devices are not real (default: detect with nvidia-smi)",
    )
    up.add_argument(
        "--quota-every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how often the quota service stops servers of spent budgets (after the policy's budget.grace) and "
        "the gateway reconciles its clusters with the usage ledger (default: %(default)s)",
    )
    up.add_argument(
        "--no-quota",
        dest="quota",
        action="store_false",
        help="run without the quota service: budgets and caps are not enforced and usage is not recorded "
        "(for comparisons and for machines where nobody is accounted)",
    )
    up.add_argument(
        "--subdomains",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve each user's server from its own origin, http://<user>.localhost:<port>/user/<user>/ (the hub "
        "at http://localhost:<port>; http://127.0.0.1:<port> redirects there), so a page a user serves cannot act "
        "with another user's hub login (default: on, except on a non-loopback --bind without --subdomain-host); "
        "--no-subdomains serves every server as a path of the hub's origin",
    )
    up.add_argument(
        "--subdomain-host",
        default="",
        metavar="URL",
        help="with subdomains, the hub's origin (e.g. https://workbench.example.edu, whose *.workbench.example.edu "
        "resolves to this machine); implies --subdomains (default: http://localhost:<port>)",
    )
    up.set_defaults(func=cmd_up)

    check = sub.add_parser(
        "check",
        help="validate a platform YAML and show who may use what",
        description="Validate a platform YAML; on success print a summary of groups and profiles, "
        "on failure every problem with its field path and the fix. Exit code 2 when invalid.",
    )
    check.add_argument("file", help="platform YAML")
    check.set_defaults(func=cmd_check)

    render = sub.add_parser(
        "render-pod",
        help="print the Kubernetes pod KubeSpawner would create for a user and profile",
        description="Render, offline, the pod manifest that KubeSpawner (with the policy's settings) would "
        "create for USER in GROUPS starting PROFILE, as YAML; no cluster is contacted. Exit code 2 when the "
        "policy is invalid, 3 when the policy refuses the profile to those groups (the message says which "
        "profiles they may use).",
    )
    render.add_argument("--config", required=True, help="platform YAML")
    render.add_argument("--user", required=True, help="hub user name")
    render.add_argument("--groups", default="", help="the user's groups, comma-separated (G1,G2)")
    render.add_argument("--profile", default=None, help="profile to start (default: the user's first)")
    render.set_defaults(func=cmd_render_pod)

    rc = sub.add_parser(
        "render-cluster",
        help="print the Kubernetes pods of a user's Dask Gateway cluster",
        description="Render, offline, the scheduler and worker pods that dask-gateway's Kubernetes controller "
        "would create for USER's cluster with the given options, as YAML. Exit code 2 when the policy is "
        "invalid, 3 when the options are refused (the message names the option).",
    )
    add_render_cluster_arguments(rc)

    go = sub.add_parser(
        "gateway-options",
        help="show what a user may request from Dask Gateway, and why",
        description="Show the Dask Gateway options and limits a user gets from the policy: which of their "
        "groups the limits come from (the most generous), the per-worker choices, the per-cluster and per-user "
        "limits, the idle timeout and, for Slurm, where the jobs go. Groups default to the user's demo account.",
    )
    go.add_argument("--config", default=str(DEFAULT_CONFIG), help="platform YAML (default: %(default)s)")
    go.add_argument("--user", required=True, help="hub user name")
    go.add_argument("--groups", default=None, help="the user's groups, comma-separated (default: from auth.demo_users)")
    go.set_defaults(func=cmd_gateway_options)

    from workbench.services.quota.report import add_report_arguments, cmd_report

    report = sub.add_parser(
        "report",
        help="GPU-hours and CPU-hours per user and group, from the quota ledger (csv, json or a PNG chart)",
        description="Report usage from the quota service's ledger for a period: csv or json to stdout, or a PNG "
        "chart of usage by group and GPU type (--output FILE).",
    )
    add_report_arguments(report)
    report.set_defaults(func=cmd_report)

    from workbench.cli.course import add_course_arguments

    course = sub.add_parser(
        "course",
        help="course material links and rosters (link, add-students, remove-student)",
        description="Course groups: print an nbgitpuller link to the course's material (link), load a roster CSV "
        "into the course's hub group (add-students) or take a student off it (remove-student), through the hub's "
        "roster service.",
    )
    add_course_arguments(course)

    from workbench.cli.job import add_job_arguments

    job = sub.add_parser(
        "job",
        help="notebook jobs: submit, list, cancel, logs, output, rerun",
        description="Run a notebook of your home as a batch job (Slurm, or a local process) that survives logout, "
        "charged to your group's budget, through the hub's jobs service.",
    )
    add_job_arguments(job)
    return parser


def gateway_options_report(policy: Policy, user: str, groups: list[str]) -> str:
    """What ``user`` in ``groups`` may ask of Dask Gateway, and why (pure)."""
    from workbench.gateway.options import SCHEDULER_CORES, cluster_options_for

    lines = [f"user {user}, groups: {', '.join(groups) or '(none)'}"]
    group = policy.dask_group_for(groups)
    if group is None:
        lines.append("no Dask Gateway access: none of these groups has a 'dask' section in the policy")
        return "\n".join(lines)
    dask = policy.groups[group].dask
    others = [g for g in policy.groups_of(groups) if g != group and policy.groups[g].dask]
    why = f" (most generous of: {', '.join([group, *others])})" if others else ""
    lines.append(f"limits from group {group}{why}:")
    lines.append(
        f"  per cluster: up to {dask.max_workers} workers, {dask.max_cores:g} cores, "
        f"{_gib(dask.max_memory)} memory for workers (+ the scheduler: {SCHEDULER_CORES} core, 1 GiB)"
    )
    lines.append(f"  per user:    up to {dask.max_clusters} active cluster(s)")
    lines.append(f"  idle clusters are stopped after {dask.idle_timeout} s; all stop with the user's notebook server")
    if dask.slurm.partition or dask.slurm.account or dask.slurm.qos:
        s = dask.slurm
        lines.append(
            f"  on Slurm:    partition={s.partition or '-'} account={s.account or '-'} qos={s.qos or '-'} "
            f"walltime={s.walltime} s"
        )
    lines.append("per-worker options (gateway.cluster_options()):")
    for f in cluster_options_for(policy, groups).get_specification():
        spec = f["spec"]
        if spec.get("type") == "mapping":  # environment: the user's own variables, checked by name
            lines.append(
                f"  {f['field']:<14} {{NAME: value, ...}} not PATH, HOME, DASK_GATEWAY_*, ...; {f.get('label', '')}"
            )
            continue
        lines.append(
            f"  {f['field']:<14} default {f.get('default')!s:<6} min {spec.get('min')!s:<6} "
            f"max {spec.get('max')!s:<6} {f.get('label', '')}"
        )
    return "\n".join(lines)


def cmd_gateway_options(args) -> int:
    policy = load_policy_or_report(args.config)
    if policy is None:
        return 2
    if args.groups is None:
        demo = policy.auth.demo_users.get(args.user)
        if demo is None:
            print(f"{args.user!r} is not a demo account of {args.config}; pass --groups G1,G2", file=sys.stderr)
            return 2
        groups = list(demo.groups)
    else:
        groups = split_groups(args.groups)
    print(gateway_options_report(policy, args.user, groups))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
