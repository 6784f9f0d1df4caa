"""``workbench report``: usage of a period by group, user, kind and GPU type, as CSV, JSON or a PNG chart.

Reads the ledger directly (``--db-url``, ``$WORKBENCH_QUOTA_DB_URL``, else ``quota.sqlite`` in
``--state-dir``). Rows spanning the period's boundaries count only their part inside it; items
still running count up to now. CSV and JSON go to stdout unless ``--output`` names a file; the PNG
(matplotlib, Agg backend) goes to ``--output`` or ``workbench-usage-<period>.png``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from workbench.policy import Policy, PolicyError, load_policy
from workbench.services.quota.accounting import (
    UTC,
    Interval,
    Period,
    as_utc,
    iso,
    parse_period,
    usage_by,
    usage_in_period,
)

__all__ = ["report_rows", "report_csv", "report_json", "report_png", "add_report_arguments", "cmd_report"]

CSV_FIELDS = ["period", "period_start", "period_end", "group", "user", "kind", "gpu_type", "gpu_hours", "cpu_hours"]


def report_rows(rows: Iterable[Interval], period: Period, now: datetime) -> list[dict]:
    """One line per (group, user, kind, GPU type) with usage in ``period`` (pure; zero lines dropped)."""
    out = []
    by = usage_by(list(rows), period, now, key=lambda r: (r.group, r.user, r.kind, r.gpu_type or ""))
    for (group, user, kind, gpu_type), u in sorted(by.items()):
        if not u.gpu_seconds and not u.cpu_seconds:
            continue
        out.append(
            {
                "period": period.name,
                "period_start": iso(period.start),
                "period_end": iso(period.end),
                "group": group,
                "user": user,
                "kind": kind,
                "gpu_type": gpu_type,
                "gpu_hours": round(u.gpu_hours, 6),
                "cpu_hours": round(u.cpu_hours, 6),
            }
        )
    return out


def report_csv(rows: Iterable[Interval], period: Period, now: datetime) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(report_rows(rows, period, now))
    return buf.getvalue()


def _group_names(rows: list[Interval], policy: Policy | None) -> list[str]:
    seen = {r.group for r in rows}
    ordered = [g for g in (policy.groups if policy else []) if g in seen]
    return ordered + sorted(seen - set(ordered))


def report_json(rows: Iterable[Interval], period: Period, now: datetime, policy: Policy | None = None) -> str:
    rows = list(rows)
    groups = {}
    for g in _group_names(rows, policy):
        mine = [r for r in rows if r.group == g]
        groups[g] = {
            "usage": usage_in_period(mine, period, now).to_json(),
            "by_user": {u: x.to_json() for u, x in usage_by(mine, period, now, lambda r: r.user).items()},
        }
    doc = {
        "period": period.to_json(),
        "as_of": iso(now),
        "usage": usage_in_period(rows, period, now).to_json(),
        "groups": groups,
        "rows": report_rows(rows, period, now),
    }
    if policy is not None:
        for g, entry in groups.items():
            pg = policy.groups.get(g)
            entry["budget"] = (
                {"gpu_hours": pg.budget.gpu_hours, "cpu_hours": pg.budget.cpu_hours, "period": pg.budget.period}
                if pg is not None and pg.budget is not None
                else None
            )
    return json.dumps(doc, indent=2) + "\n"


def report_png(
    rows: Iterable[Interval],
    period: Period,
    now: datetime,
    path: str | os.PathLike,
    policy: Policy | None = None,
    title: str = "Workbench usage",
) -> Path:
    """A chart of GPU-hours by group stacked by GPU type, and CPU-hours by group (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    rows = list(rows)
    groups = _group_names(rows, policy) or ["(no usage)"]
    per_group = {g: usage_in_period([r for r in rows if r.group == g], period, now) for g in groups}
    gpu_types = sorted({t for u in per_group.values() for t in u.gpu_seconds_by_type})

    fig = Figure(figsize=(max(7.0, 1.3 * len(groups) + 3), 7.5), dpi=110, layout="constrained")
    ax_gpu, ax_cpu = fig.subplots(2, 1, sharex=True)
    x = list(range(len(groups)))
    bottom = [0.0] * len(groups)
    for t in gpu_types:
        heights = [per_group[g].gpu_seconds_by_type.get(t, 0.0) / 3600 for g in groups]
        label = t
        if policy is not None and t in policy.gpu_types and policy.gpu_types[t].display_name:
            label = f"{t} ({policy.gpu_types[t].display_name})"
        ax_gpu.bar(x, heights, bottom=bottom, label=label, width=0.6)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    if policy is not None and period.kind == "month":  # monthly GPU budgets as dashed marks over their group
        labelled = False
        for i, g in enumerate(groups):
            pg = policy.groups.get(g)
            if (
                pg is not None
                and pg.budget is not None
                and pg.budget.period == "month"
                and pg.budget.gpu_hours is not None
            ):
                ax_gpu.hlines(
                    pg.budget.gpu_hours,
                    i - 0.35,
                    i + 0.35,
                    colors="crimson",
                    linestyles="dashed",
                    label=None if labelled else "monthly GPU budget",
                )
                labelled = True
    ax_gpu.set_ylabel("GPU-hours")
    ax_gpu.set_title(
        f"{title}: {period.name} ({period.start:%Y-%m-%d} to {f'{period.end:%Y-%m-%d}' if period.end else 'now'}, UTC)"
    )
    if gpu_types or ax_gpu.collections:
        ax_gpu.margins(y=0.25)  # room for the legend above the bars
        ax_gpu.legend(loc="upper right", fontsize="small")
    else:
        ax_gpu.text(0.5, 0.5, "no GPU usage in this period", transform=ax_gpu.transAxes, ha="center", va="center")
    ax_cpu.bar(x, [per_group[g].cpu_hours for g in groups], width=0.6, color="slategray")
    ax_cpu.set_ylabel("CPU core-hours")
    ax_cpu.set_xticks(x, groups, rotation=20, ha="right")
    for ax in (ax_gpu, ax_cpu):
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    ax_cpu.set_xlabel(f"group (as of {iso(now)}; running items count up to then)", fontsize="small", color="dimgray")
    path = Path(path)
    fig.savefig(path, format="png")
    return path


# ---------------------------------------------------------------------------
# Command line (wired into `workbench report` by workbench.cli.main)
# ---------------------------------------------------------------------------


def add_report_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--period",
        default="current",
        help="a month (2026-11), days (2026-11-01..2026-11-15), or current, month, term, total "
        "(default: %(default)s, the current month)",
    )
    parser.add_argument("--format", choices=["csv", "json", "png"], default="csv", help="default: %(default)s")
    parser.add_argument(
        "--output",
        "-o",
        default=None,
        help="file to write (default: stdout for csv and json, workbench-usage-<period>.png for png)",
    )
    parser.add_argument(
        "--db-url",
        default=None,
        help="ledger database URL (default: $WORKBENCH_QUOTA_DB_URL, else quota.sqlite in --state-dir)",
    )
    parser.add_argument(
        "--state-dir", default=".workbench", help="state folder of `workbench up` (default: %(default)s)"
    )
    parser.add_argument(
        "--config",
        default=None,
        help="platform YAML for budgets and group order (default: the one the state folder ran)",
    )
    parser.add_argument("--group", default=None, help="only this group")
    return parser


def _policy_for(args) -> Policy | None:
    config = args.config
    if config is None:
        rt = Path(args.state_dir, "runtime.json")
        if rt.exists():
            config = json.loads(rt.read_text()).get("config")
    if not config:
        return None
    return load_policy(config)


def _db_url(args) -> str:
    from workbench.services.quota.ledger import DB_URL_ENV, default_db_url

    if args.db_url:
        return args.db_url
    if os.environ.get(DB_URL_ENV):
        return os.environ[DB_URL_ENV]
    return default_db_url(args.state_dir)


def cmd_report(args, now: datetime | None = None, out=None) -> int:
    from sqlalchemy.engine import make_url

    from workbench.services.quota.ledger import Ledger

    out = out or sys.stdout
    now = as_utc(now) if now is not None else datetime.now(UTC)
    try:
        policy = _policy_for(args)
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 2
    try:
        period = parse_period(args.period, now)
    except ValueError as e:
        print(f"workbench report: {e}", file=sys.stderr)
        return 2
    url = _db_url(args)
    u = make_url(url)
    if u.get_backend_name() == "sqlite" and not (u.database and Path(u.database).exists()):
        print(
            f"workbench report: no ledger at {u.database}; run `workbench up` (its quota service keeps it) "
            "or pass --db-url / --state-dir",
            file=sys.stderr,
        )
        return 2
    ledger = Ledger(url, policy, create=False)
    try:
        rows = ledger.rows(period, now, group=args.group)
    finally:
        ledger.close()
    if args.format == "png":
        path = report_png(
            rows, period, now, args.output or f"workbench-usage-{period.name.replace(' ', '-')}.png", policy
        )
        print(f"wrote {path}", file=sys.stderr)
        return 0
    text = report_csv(rows, period, now) if args.format == "csv" else report_json(rows, period, now, policy)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        out.write(text)
    return 0
