"""Pure decisions of the sessions service (:mod:`workbench.services.sessions.app`): which servers to warn or stop now.

Everything here is a function of literal inputs — the policy, the hub's user models (as
``GET /hub/api/users?state=active`` returns them), GPU utilisation samples, what was already
done, and ``now`` — so it is unit-tested without a hub (``tests/unit/test_sessions.py``).

The rules:

- **Session limit** (``session.max_age``): a server is stopped ``max_age`` after it started. The
  limit is the shorter of its profile's ``session.max_age`` and its group's; when several of the
  user's groups entitle the profile, the most generous group limit counts (as for Dask limits),
  and a group without ``session`` means no group limit. Its user is warned ``culling.warn_before``
  ahead (default 15 and 5 minutes); when several warnings are due at once (a short limit), one.
- **Idle** (``culling.enabled``): a server whose hub ``last_activity`` is older than its
  profile's ``idle_timeout`` (default ``culling.timeout``) is stopped.
- **Idle GPUs** (``culling.enabled``, profile ``gpu_idle_timeout``): a server whose GPUs have all
  been below the utilisation threshold in every sample for ``gpu_idle_timeout`` is stopped even
  when the browser keeps it active. A device with no reading (unknown) counts as busy, so
  nothing is stopped on missing data.

Pending servers (starting or stopping) are left alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from workbench.names import SESSIONS_ACCESS_SCOPE as ACCESS_SCOPE  # noqa: F401 - the service's names
from workbench.names import SESSIONS_SCOPES as SERVICE_SCOPES  # noqa: F401
from workbench.policy import Policy

#: a GPU whose utilisation is below this many percent counts as idle
DEFAULT_GPU_IDLE_THRESHOLD = 5.0
SOURCE = "sessions"

Level = Literal["info", "warning", "critical"]


def parse_time(value: str | None) -> datetime | None:
    """A hub timestamp (ISO 8601, ``Z`` or offset) as an aware UTC datetime (None stays None)."""
    if not value:
        return None
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC)


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def human(seconds: float) -> str:
    """``5400`` -> ``1h 30m``; ``20`` -> ``20s``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    parts = [f"{d}d" if d else "", f"{h}h" if h else "", f"{m}m" if m else "", f"{s}s" if s and not d and not h else ""]
    return " ".join(p for p in parts if p)


# ---------------------------------------------------------------------------
# Limits of one server
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What applies to one server (None: no such limit)."""

    max_age: int | None = None
    idle_timeout: int | None = None
    gpu_idle_timeout: int | None = None


def _min(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def group_max_age(policy: Policy, user_groups: Iterable[str], profile: str) -> int | None:
    """The group session limit of ``profile`` for a member of ``user_groups`` (None: no limit)."""
    groups = policy.groups_of(user_groups)
    entitling = [g for g in groups if profile in policy.groups[g].profiles] or groups
    if not entitling:
        return None
    ages = [policy.groups[g].session.max_age if policy.groups[g].session else None for g in entitling]
    return None if any(a is None for a in ages) else max(ages)  # the most generous group


def server_limits(policy: Policy, user_groups: Iterable[str], profile: str) -> Limits:
    """The session and idle limits of a server of ``profile`` started by a member of ``user_groups``."""
    prof = policy.profiles.get(profile)
    profile_age = prof.session.max_age if prof and prof.session else None
    max_age = _min(profile_age, group_max_age(policy, user_groups, profile))
    if not policy.culling.enabled:
        return Limits(max_age=max_age)
    idle = prof.idle_timeout if prof and prof.idle_timeout is not None else policy.culling.timeout
    gpu_idle = prof.gpu_idle_timeout if prof and prof.gpu else None
    return Limits(max_age=max_age, idle_timeout=idle, gpu_idle_timeout=gpu_idle)


# ---------------------------------------------------------------------------
# Servers from the hub's user models
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """One running server as the hub reports it."""

    user: str
    name: str  # "" for the default server
    profile: str
    groups: tuple[str, ...]
    started: datetime
    last_activity: datetime
    gpu_devices: tuple[str, ...] = ()
    pending: str | None = None

    @property
    def key(self) -> str:
        """Identifies this run of the server (a restart is a new run: new warnings, new GPU history)."""
        return f"{self.user}/{self.name}@{iso(self.started)}"

    @property
    def label(self) -> str:
        return f"{self.user}/{self.name}" if self.name else self.user


def profile_of(policy: Policy, groups: Iterable[str], model: Mapping[str, Any]) -> str:
    """The profile a server runs: its spawner state, else its ``user_options``, else the user's default."""
    state = model.get("state") or {}
    requested = state.get("profile") or (model.get("user_options") or {}).get("profile")
    if requested:
        return str(requested)
    allowed = policy.profiles_for(groups)
    return allowed[0] if allowed else ""


def servers_of(policy: Policy, users: Iterable[Mapping[str, Any]]) -> list[Server]:
    """The servers in the hub's user models (``servers`` needs ``read:servers``)."""
    out = []
    for user in users:
        groups = tuple(user.get("groups") or ())
        for name, model in (user.get("servers") or {}).items():
            started = parse_time(model.get("started"))
            if started is None:
                continue
            last = parse_time(model.get("last_activity")) or started
            devices = tuple((model.get("state") or {}).get("gpu_devices") or ())
            out.append(
                Server(
                    user=user["name"],
                    name=name,
                    profile=profile_of(policy, groups, model),
                    groups=groups,
                    started=started,
                    last_activity=max(last, started),
                    gpu_devices=devices,
                    pending=model.get("pending") or None,
                )
            )
    return out


# ---------------------------------------------------------------------------
# GPU idleness
# ---------------------------------------------------------------------------


def gpus_idle(devices: Iterable[str], samples: Mapping[str, float], threshold: float) -> bool:
    """Whether every device has a reading and all are below ``threshold`` percent (no devices: False)."""
    devices = list(devices)
    return bool(devices) and all(d in samples and samples[d] < threshold for d in devices)


def update_gpu_idle(
    previous: Mapping[str, datetime],
    servers: Iterable[Server],
    samples: Mapping[str, float],
    now: datetime,
    threshold: float = DEFAULT_GPU_IDLE_THRESHOLD,
) -> dict[str, datetime]:
    """Since when each GPU server's devices have been idle in every sample (servers not idle now drop out).

    ``previous`` and the result map :attr:`Server.key` to the first sample of the current idle stretch.
    """
    out = {}
    for s in servers:
        if s.gpu_devices and gpus_idle(s.gpu_devices, samples, threshold):
            out[s.key] = previous.get(s.key, now)
    return out


# ---------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """Warn a user about, or stop, one server."""

    kind: Literal["warn", "stop"]
    user: str
    server: str  # "" for the default server
    key: str  # Server.key; with ``lead`` it makes a warning's identity
    reason: Literal["max_age", "idle", "gpu_idle"]
    level: Level
    message: str
    lead: int | None = None  # warnings: seconds before the limit this warning stands for
    #: warnings: every lead this warning covers (when several are due at once, one warning covers them)
    covers: tuple[int, ...] = field(default=())

    def notification(self, now: datetime) -> dict[str, str]:
        """The user-visible notification of this action."""
        return {"level": self.level, "source": SOURCE, "message": self.message, "at": iso(now), "server": self.server}


def _where(s: Server) -> str:
    return f"Your server '{s.name}'" if s.name else "Your server"


def decide(
    policy: Policy,
    servers: Iterable[Server],
    now: datetime,
    *,
    warned: Iterable[tuple[str, int]] = (),
    gpu_idle_since: Mapping[str, datetime] | None = None,
) -> list[Action]:
    """What to do now: stop servers past a limit, warn about session limits ahead.

    ``warned`` holds ``(server key, lead)`` of warnings already given; ``gpu_idle_since`` is the
    result of :func:`update_gpu_idle`. A stopped server gets one stop action (the first reason in
    the order session limit, idle, idle GPUs); pending servers get none.
    """
    warned = set(warned)
    gpu_idle_since = gpu_idle_since or {}
    leads = sorted(set(policy.culling.warn_before), reverse=True)
    last_lead = leads[-1] if leads else None
    actions: list[Action] = []
    for s in servers:
        if s.pending:
            continue
        lim = server_limits(policy, s.groups, s.profile)
        stop: Action | None = None
        if lim.max_age is not None:
            ends = s.started + timedelta(seconds=lim.max_age)
            if now >= ends:
                stop = Action(
                    "stop",
                    s.user,
                    s.name,
                    s.key,
                    "max_age",
                    "info",
                    f"{_where(s)} ({s.profile}) was stopped: it reached its session limit of "
                    f"{human(lim.max_age)}. Your files are kept; start a new server to go on.",
                )
            else:
                due = [lead for lead in leads if now >= ends - timedelta(seconds=lead) and (s.key, lead) not in warned]
                if due:
                    lead = min(due)
                    left = (ends - now).total_seconds()
                    actions.append(
                        Action(
                            "warn",
                            s.user,
                            s.name,
                            s.key,
                            "max_age",
                            "critical" if lead == last_lead else "warning",
                            f"{_where(s)} ({s.profile}) will be stopped in {human(left)}, at {iso(ends)}: "
                            f"its session limit is {human(lim.max_age)}. Save your work; your Dask "
                            f"clusters stop with it.",
                            lead=lead,
                            covers=tuple(sorted(due)),
                        )
                    )
        if stop is None and lim.idle_timeout is not None:
            idle = (now - s.last_activity).total_seconds()
            if idle >= lim.idle_timeout:
                stop = Action(
                    "stop",
                    s.user,
                    s.name,
                    s.key,
                    "idle",
                    "info",
                    f"{_where(s)} ({s.profile}) was stopped after {human(idle)} without activity "
                    f"(the limit for {s.profile} is {human(lim.idle_timeout)}).",
                )
        if stop is None and lim.gpu_idle_timeout is not None and s.key in gpu_idle_since:
            idle = (now - gpu_idle_since[s.key]).total_seconds()
            if idle >= lim.gpu_idle_timeout:
                stop = Action(
                    "stop",
                    s.user,
                    s.name,
                    s.key,
                    "gpu_idle",
                    "info",
                    f"{_where(s)} ({s.profile}) was stopped: its GPUs were idle for {human(idle)} "
                    f"(the limit for {s.profile} is {human(lim.gpu_idle_timeout)}), so others may use them.",
                )
        if stop is not None:
            actions = [a for a in actions if a.key != s.key]  # no warning about a server being stopped
            actions.append(stop)
    return actions


def next_due(
    policy: Policy,
    servers: Iterable[Server],
    now: datetime,
    *,
    warned: Iterable[tuple[str, int]] = (),
    gpu_idle_since: Mapping[str, datetime] | None = None,
) -> datetime | None:
    """The earliest moment after ``now`` at which :func:`decide` may act on these servers (None: never)."""
    warned = set(warned)
    gpu_idle_since = gpu_idle_since or {}
    moments = []
    for s in servers:
        lim = server_limits(policy, s.groups, s.profile)
        if lim.max_age is not None:
            ends = s.started + timedelta(seconds=lim.max_age)
            moments.append(ends)
            moments += [
                ends - timedelta(seconds=lead) for lead in policy.culling.warn_before if (s.key, lead) not in warned
            ]
        if lim.idle_timeout is not None:
            moments.append(s.last_activity + timedelta(seconds=lim.idle_timeout))
        if lim.gpu_idle_timeout is not None and s.key in gpu_idle_since:
            moments.append(gpu_idle_since[s.key] + timedelta(seconds=lim.gpu_idle_timeout))
    future = [m for m in moments if m > now]
    return min(future) if future else None


def needs_service(policy: Policy) -> bool:
    """Whether the sessions service has anything to enforce: culling, or a session limit somewhere."""
    return (
        policy.culling.enabled
        or any(g.session is not None and g.session.max_age is not None for g in policy.groups.values())
        or any(p.session is not None and p.session.max_age is not None for p in policy.profiles.values())
    )
