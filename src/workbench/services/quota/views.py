"""JSON documents of the usage API and the report, built from ledger rows (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from workbench.policy import Policy
from workbench.services.quota.accounting import BudgetStatus, Interval, Period, iso, usage_by, usage_in_period
from workbench.services.quota.models import RunningItem, server_item_id

__all__ = [
    "running_summary",
    "user_usage_doc",
    "group_usage_doc",
    "overview_doc",
    "charge_group",
    "default_profile",
    "server_items",
]


def running_summary(open_rows: Iterable[Interval]) -> dict:
    rows = list(open_rows)
    by_type: dict[str, int] = {}
    for r in rows:
        if r.gpu_count and r.gpu_type:
            by_type[r.gpu_type] = by_type.get(r.gpu_type, 0) + r.gpu_count
    return {
        "servers": sum(1 for r in rows if r.kind == "server"),
        "dask_workers": sum(1 for r in rows if r.kind == "dask-worker"),
        "gpus": sum(by_type.values()),
        "gpus_by_type": dict(sorted(by_type.items())),
        "cpu": sum(r.cpu for r in rows),
    }


def _by(rows, period, now, key) -> dict:
    return {k: u.to_json() for k, u in usage_by(rows, period, now, key).items()}


def user_usage_doc(
    user: str,
    rows: list[Interval],
    period: Period,
    now: datetime,
    budgets: list[BudgetStatus],
    limited_to: set[str] | None = None,
) -> dict:
    """A user's usage in ``period``; ``limited_to``: only these groups' rows (an instructor's view)."""
    if limited_to is not None:
        rows = [r for r in rows if r.group in limited_to]
        budgets = [b for b in budgets if b.group in limited_to]
    return {
        "user": user,
        "period": period.to_json(),
        "as_of": iso(now),
        "limited_to_groups": sorted(limited_to) if limited_to is not None else None,
        "usage": usage_in_period(rows, period, now).to_json(),
        "by_group": _by(rows, period, now, lambda r: r.group),
        "by_kind": _by(rows, period, now, lambda r: r.kind),
        "running": running_summary(r for r in rows if r.stop is None),
        "budgets": [b.to_json() for b in budgets],
    }


def group_usage_doc(
    policy: Policy,
    group: str,
    rows: list[Interval],
    period: Period,
    now: datetime,
    budgets: list[BudgetStatus],
    members_visible: bool,
) -> dict:
    pg = policy.groups.get(group)
    caps = pg.caps.model_dump() if pg is not None and pg.caps is not None else None
    return {
        "group": group,
        "kind": pg.kind if pg is not None else None,
        "period": period.to_json(),
        "as_of": iso(now),
        "usage": usage_in_period(rows, period, now).to_json(),
        "by_kind": _by(rows, period, now, lambda r: r.kind),
        "by_user": _by(rows, period, now, lambda r: r.user) if members_visible else None,
        "running": running_summary(r for r in rows if r.stop is None),
        "budgets": [b.to_json() for b in budgets],
        "caps": caps,
    }


def overview_doc(
    policy: Policy, rows: list[Interval], period: Period, now: datetime, budgets: dict[str, list[BudgetStatus]]
) -> dict:
    names = list(policy.groups) + sorted({r.group for r in rows} - set(policy.groups))
    return {
        "period": period.to_json(),
        "as_of": iso(now),
        "usage": usage_in_period(rows, period, now).to_json(),
        "groups": {
            g: {
                "usage": usage_in_period([r for r in rows if r.group == g], period, now).to_json(),
                "running": running_summary(r for r in rows if r.group == g and r.stop is None),
                "budgets": [b.to_json() for b in budgets.get(g, [])],
            }
            for g in names
        },
    }


# ---------------------------------------------------------------------------
# Notebook servers as the hub lists them
# ---------------------------------------------------------------------------


def default_profile(policy: Policy, user_groups: Iterable[str]) -> str | None:
    """The profile a server started without one gets (the spawner's rule: the first entitled)."""
    allowed = policy.profiles_for(user_groups)
    return allowed[0] if allowed else None


def charge_group(policy: Policy, user_groups: Iterable[str], profile: str | None) -> str | None:
    """The group a server of ``profile`` is charged to: the user's first group entitled to it (policy order)."""
    groups = policy.groups_of(user_groups)
    for g in groups:
        if profile is not None and profile in policy.groups[g].profiles:
            return g
    return groups[0] if groups else None


UNASSIGNED = "-"


def server_items(policy: Policy, users: Iterable[dict]) -> list[RunningItem]:
    """Running items of the servers in the hub's ``GET /users?state=active`` models (pure).

    A server is counted from the moment its spawn starts (``started``), pending or ready. Its
    resources come from its profile in ``user_options`` (the spawner's default when absent).
    """
    out = []
    for u in users:
        groups = u.get("groups") or []
        for name, server in (u.get("servers") or {}).items():
            if server.get("stopped"):
                continue
            profile = (server.get("user_options") or {}).get("profile") or default_profile(policy, groups)
            if profile is not None and profile not in policy.profiles:
                profile = None
            group = charge_group(policy, groups, profile) or UNASSIGNED
            out.append(
                RunningItem(
                    item=server_item_id(u["name"], name),
                    kind="server",
                    user=u["name"],
                    group=group,
                    profile=profile,
                    cpu=None if profile else 0.0,
                    memory=None if profile else 0,
                    gpu_count=None if profile else 0,
                    started=_parse_time(server.get("started")),
                )
            )
    return out


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
