"""The platform's own spawn page: branding, and for each entitled profile whether it can start now and what it costs.

JupyterHub renders ``spawn.html`` from ``c.JupyterHub.template_paths`` (this package's ``templates/``, which
extend JupyterHub's own templates: no fork) with ``c.JupyterHub.template_vars`` (:func:`template_vars`: the
policy's ``branding``), and puts the spawner's options form into it. :func:`spawn_form` is that form, as an
async ``Spawner.options_form`` callable; for each profile the user's groups are entitled to it says

- whether it can start now: a GPU profile needs ``count`` free devices of its GPU type (the local spawner's
  :class:`workbench.gpus.GpuAllocator`); a spent budget of the group it is charged to (GPU budget for GPU
  profiles, CPU budget for all) stops it too;
- what an hour of it costs against that group's budget (GPU-hours and CPU-hours per hour) and how much is
  left (the group's and, with ``per_user``, the user's own share: the smaller), as hours of this profile;
- its session limit (:func:`workbench.services.sessions.rules.server_limits`).

A profile that cannot start now is shown disabled with the reason. The hub still decides at start
(admission by the quota service, the GPU allocator): the page only informs. The quota service is asked
with a one-minute token of the user (their own usage, nothing more); when it does not answer the page
says so and leaves the profiles enabled.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from workbench.names import QUOTA_SERVICE
from workbench.policy import Policy
from workbench.serverinfo import charged_group
from workbench.services.sessions.rules import server_limits
from workbench.spawn.common import describe_profile

TEMPLATES = Path(__file__).with_name("templates")


def template_vars(policy: Policy) -> dict:
    """``c.JupyterHub.template_vars``: the centre's name and logo for the templates (pure)."""
    b = policy.branding
    return {"workbench_branding": {"name": b.name if b else policy.name, "logo_url": b.logo_url if b else ""}}


def _hours(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def _duration(seconds: int) -> str:
    h, rem = divmod(int(seconds), 3600)
    return f"{h}h" + (f" {rem // 60}m" if rem // 60 else "") if h else f"{rem // 60}m"


def profile_rows(
    policy: Policy,
    user_groups: Iterable[str],
    free_gpus: Mapping[str, int] | None,
    budgets: list[Mapping] | None,
) -> list[dict]:
    """What the spawn page says about each entitled profile (pure).

    ``free_gpus``: free devices per GPU type (None: unknown here, e.g. on Kubernetes, where the scheduler
    decides); ``budgets``: the quota service's budget statuses of the user (None: not known).
    """
    groups = list(user_groups)
    rows = []
    for name in policy.profiles_for(groups):
        prof = policy.profiles[name]
        group = charged_group(policy, groups, name)
        reasons = []
        if prof.gpu and free_gpus is not None:
            free = free_gpus.get(prof.gpu.type, 0)
            if free < prof.gpu.count:
                gname = policy.gpu_types[prof.gpu.type].display_name or prof.gpu.type
                reasons.append(f"no free GPU of type {gname} now ({free} free, {prof.gpu.count} needed)")
        cost = {"gpu": float(prof.gpu.count) if prof.gpu else 0.0, "cpu": float(prof.cpu)}
        left: dict[str, float] = {}
        for b in budgets or []:
            if b.get("group") != group or b.get("resource") not in cost:
                continue
            res = b["resource"]
            remaining = max(0.0, float(b.get("limit_hours") or 0) - float(b.get("used_hours") or 0))
            left[res] = min(left.get(res, remaining), remaining)
            if b.get("exhausted") and (res == "cpu" or cost["gpu"]):
                who = "your share of" if b.get("scope") == "user" else "the"
                reasons.append(
                    f"{who} {res.upper()} budget of {group} is spent"
                    + (f" (resets {str(b.get('resets_at'))[:10]})" if b.get("resets_at") else "")
                )
        limits = server_limits(policy, groups, name)
        rows.append(
            {
                "name": name,
                "display_name": prof.display_name or name,
                "summary": describe_profile(policy, name),
                "description": prof.description,
                "group": group,
                "group_title": (policy.groups[group].display_name or group) if group in policy.groups else str(group),
                "can_start": not reasons,
                "reason": "; ".join(reasons),
                "cost": cost,
                "left": left,
                "session_limit": limits.max_age,
            }
        )
    return rows


def _cost_line(row: Mapping, budgeted: bool) -> str:
    cost, left = row["cost"], row["left"]
    parts = []
    for res in ("gpu", "cpu"):
        if not cost[res]:
            continue
        text = f"{cost[res]:g} {res.upper()}-hours per hour"
        if res in left:
            text += f" ({_hours(left[res])} left in {row['group']}'s budget: {_hours(left[res] / cost[res])} h of this)"
        parts.append(text)
    return ("Costs " + "; ".join(parts)) if budgeted and parts else ""


def form_html(rows: list[dict], problem: str = "") -> str:
    """The options form: one radio button per profile, grouped under the group it is charged to, disabled with its
    reason when it cannot start (pure)."""
    out = []
    if problem:
        out.append(f'<p class="alert alert-warning wb-spawn-problem">{html.escape(problem)}</p>')
    first = next((r["name"] for r in rows if r["can_start"]), None)
    sections: dict[str, list[str]] = {}
    for r in rows:
        items = sections.setdefault(str(r.get("group_title") or r["group"]), [])
        disabled = not r["can_start"]
        attrs = " disabled" if disabled else (" checked" if r["name"] == first else "")
        lines = [html.escape(r["summary"])]
        if r["description"]:
            lines.append(html.escape(r["description"]))
        cost = _cost_line(r, bool(r["left"]))
        if cost:
            lines.append(html.escape(cost))
        lines.append("Session limit: " + (_duration(r["session_limit"]) if r["session_limit"] else "none"))
        reason = (
            f'<br><strong class="text-danger wb-reason">Cannot start now: {html.escape(r["reason"])}</strong>'
            if disabled
            else ""
        )
        items.append(
            f'<label class="wb-profile{" wb-disabled text-muted" if disabled else ""}" '
            f'data-profile="{html.escape(r["name"])}" style="display:block;margin:0.6em 0">'
            f'<input type="radio" name="profile" value="{html.escape(r["name"])}"{attrs}> '
            f"<strong>{html.escape(r['display_name'])}</strong> "
            f'<span class="text-muted">({html.escape(r["name"])}, charged to {html.escape(str(r["group"]))})</span><br>'
            f"<small>{'<br>'.join(lines)}</small>{reason}</label>"
        )
    for title, items in sections.items():
        out.append(f'<fieldset class="wb-group"><legend>{html.escape(title)}</legend>{"".join(items)}</fieldset>')
    return "\n".join(out)


async def user_budgets(spawner) -> tuple[list[dict] | None, str]:
    """The user's budget statuses from the quota service, asked with a one-minute token of the user."""
    from tornado.httpclient import AsyncHTTPClient

    url = getattr(spawner, "quota_api_url", "")
    if not url:
        return None, ""
    token = spawner.user.new_api_token(
        scopes=[f"access:services!service={QUOTA_SERVICE}"], expires_in=60, note="workbench: the spawn page"
    )
    try:
        r = await AsyncHTTPClient().fetch(
            f"{url.rstrip('/')}/usage/users/{spawner.user.name}",
            headers={"Authorization": f"token {token}"},
            request_timeout=5,
            raise_error=False,
        )
    except OSError as e:
        return None, f"Budgets cannot be shown now (the quota service does not answer: {e})."
    if r.code != 200:
        return None, f"Budgets cannot be shown now (the quota service answered {r.code})."
    try:
        return list(json.loads(r.body).get("budgets") or []), ""
    except (ValueError, AttributeError):
        return None, "Budgets cannot be shown now (the quota service answered nonsense)."


async def spawn_form(spawner) -> str:
    """``Spawner.options_form`` of the embedded engine: :func:`form_html` for this user, now."""
    policy = spawner.policy
    groups = [g.name for g in spawner.user.groups]
    allocator = getattr(spawner, "allocator", None)
    free = {t: len(allocator.free(t)) for t in policy.gpu_types} if allocator is not None else None
    budgets, problem = await user_budgets(spawner)
    rows = profile_rows(policy, groups, free, budgets)
    if len(rows) == 1 and rows[0]["can_start"] and not problem:
        return ""  # nothing to choose: the hub starts it at once
    return form_html(rows, problem)
