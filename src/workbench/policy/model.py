"""The policy's sections as frozen pydantic models: GPU types, images, profiles, Slurm placement, Dask limits,
budgets and caps, groups, courses, culling, storage, branding, and :class:`Policy` itself with its lookups (pure).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator

from workbench.policy.auth import Auth
from workbench.policy.base import Cores, Duration, Memory, Name, _Model, parse_duration, parse_quantity


class GpuType(_Model):
    resource: str = "nvidia.com/gpu"
    display_name: str = ""
    #: product name (or part of it) as nvidia-smi reports it, to find local GPUs of this type;
    #: empty: the type's own name (e.g. "h100" matches "NVIDIA H100 80GB HBM3")
    product: str = ""
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)


class Image(_Model):
    image: str
    display_name: str = ""


class GpuRequest(_Model):
    type: str
    count: int = Field(default=1, ge=1, le=16)


class Session(_Model):
    """How long one server may run: it is stopped ``max_age`` after it started (warned before)."""

    max_age: Duration | None = None


_SLURM_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SLURM_CONSTRAINT_RE = re.compile(r"^[A-Za-z0-9_.&|,!*()\[\]:-]{1,256}$")


def _slurm_name(value: Any) -> str:
    if not isinstance(value, str) or not _SLURM_NAME_RE.match(value):
        raise ValueError(
            f"expected a Slurm name (letters, digits, '_', '.', '-'; at most 64; no spaces), like 'gpu', got {value!r}"
        )
    return value


def _slurm_constraint(value: Any) -> str:
    if not isinstance(value, str) or not _SLURM_CONSTRAINT_RE.match(value):
        raise ValueError(
            "expected Slurm node features as sbatch --constraint takes them (features joined by '&', '|' or ',', "
            f"no spaces), like 'h100&nvlink', got {value!r}"
        )
    return value


SlurmName = Annotated[str, BeforeValidator(_slurm_name)]
SlurmConstraint = Annotated[str, BeforeValidator(_slurm_constraint)]


class SlurmPlacement(_Model):
    """Where a group's notebook servers run as Slurm jobs (``workbench up --spawner slurm``).

    Unset values are left to Slurm (default partition, the user's default account and QoS). A
    profile's own ``slurm:`` section overrides its group's, value by value.
    """

    partition: SlurmName | None = None
    account: SlurmName | None = None
    qos: SlurmName | None = None
    constraint: SlurmConstraint | None = None


class ProfileSlurm(SlurmPlacement):
    """A profile's Slurm placement; ``gres_type`` is the Slurm GRES type of its GPUs (default: its GPU type's name;
    MIG slices are their own GRES types, e.g. ``1g.10gb``)."""

    gres_type: SlurmName | None = None


class Profile(_Model):
    display_name: str = ""
    description: str = ""
    cpu: Cores = 1.0
    memory: Memory = parse_quantity("2G")
    memory_limit: Memory | None = None
    gpu: GpuRequest | None = None
    image: str = "base"
    env: dict[str, str] = Field(default_factory=dict)
    #: the longest a server of this profile may run (the shorter of this and its group's ``session.max_age``)
    session: Session | None = None
    #: idle servers of this profile are stopped after this (None: ``culling.timeout``)
    idle_timeout: Duration | None = None
    #: GPU profiles: stopped when their GPUs have been idle this long, even with an active browser (None: never)
    gpu_idle_timeout: Duration | None = None
    #: where servers of this profile run as Slurm jobs (overrides the group's ``slurm``)
    slurm: ProfileSlurm | None = None


class SlurmPolicy(_Model):
    """Where a group's Dask workers run on the Slurm backend (sbatch --partition/--account/--qos/--time)."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    walltime: Duration = parse_duration("8h")


class DaskPolicy(_Model):
    """A group's Dask Gateway limits: per cluster (cores, memory, workers), per user (clusters).

    ``max_cores`` and ``max_memory`` are what a cluster's workers may use together; the scheduler
    (1 core, 1 GiB) comes on top.
    """

    max_cores: Cores = 4.0
    max_memory: Memory = parse_quantity("16G")
    max_workers: int = Field(default=4, ge=0)
    max_clusters: int = Field(default=1, ge=0)
    worker_max_cores: Cores = 2.0
    worker_max_memory: Memory = parse_quantity("8G")
    gpu_workers: bool = False
    gpu_type: str | None = None  # the GPU type of GPU workers (required with gpu_workers)
    worker_max_gpus: int = Field(default=1, ge=0, le=16)
    idle_timeout: Duration = parse_duration("30m")
    slurm: SlurmPolicy = Field(default_factory=SlurmPolicy)


# -- budgets and concurrency caps (read by workbench.services.quota) -------------------

_TERM_START_RE = re.compile(r"^(?P<month>[0-9]{2})-(?P<day>[0-9]{2})$")


def _term_start(value: Any) -> str:
    """A term's first day as ``MM-DD`` (every year, 00:00 UTC)."""
    m = _TERM_START_RE.match(str(value)) if isinstance(value, str) else None
    if not m or not (1 <= int(m["month"]) <= 12) or not (1 <= int(m["day"]) <= 28):
        raise ValueError(
            f"expected a term's first day as 'MM-DD' (month 01-12, day 01-28 so that it exists every year), "
            f"like '09-01', got {value!r}"
        )
    return value


TermStart = Annotated[str, BeforeValidator(_term_start)]


class UserBudget(_Model):
    """What each member of the group may use within the group's budget period (None: no per-user limit)."""

    gpu_hours: float | None = Field(default=None, ge=0)
    cpu_hours: float | None = Field(default=None, ge=0)


class Budget(_Model):
    """A group's GPU-hours and CPU-hours per period, across notebook servers and Dask clusters.

    ``period``: ``month`` (calendar month, UTC), ``term`` (from one of ``term_starts`` to the next)
    or ``total`` (never resets). ``per_user`` limits each member's share of the same period.
    """

    gpu_hours: float | None = Field(default=None, ge=0)
    cpu_hours: float | None = Field(default=None, ge=0)
    period: Literal["month", "term", "total"] = "month"
    term_starts: list[TermStart] = Field(default_factory=lambda: ["02-01", "09-01"], min_length=1)
    per_user: UserBudget | None = None
    warn_at: list[float] = Field(
        default_factory=lambda: [0.8, 0.95],
        description="fractions of a budget at which users are warned (notifications of the quota service)",
    )
    grace: Duration = Field(
        default=parse_duration("15m"),
        description="how long servers and Dask clusters keep running once a budget is spent, then they are stopped",
    )

    @field_validator("warn_at")
    @classmethod
    def _warn_at_fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < x < 1 for x in v):
            raise ValueError(f"each warning level is a fraction between 0 and 1 (0.8 = at 80%), got {v}")
        if v != sorted(set(v)):
            raise ValueError(f"list the warning levels once each, in increasing order (e.g. [0.8, 0.95]), got {v}")
        return v


class Caps(_Model):
    """Concurrency caps: how much of the group may run at once (None: no cap).

    ``running_servers`` / ``running_gpus`` count the whole group's notebook servers and GPUs
    (servers and Dask workers); the ``user_`` variants count each member's within the group.
    """

    running_servers: int | None = Field(default=None, ge=0)
    running_gpus: int | None = Field(default=None, ge=0)
    user_running_servers: int | None = Field(default=None, ge=0)
    user_running_gpus: int | None = Field(default=None, ge=0)


# -- end of budgets and concurrency caps -------------------------------------


class Material(_Model):
    git: str
    branch: str = "main"


class Group(_Model):
    kind: Literal["research", "course", "startup", "admin"]
    display_name: str = ""
    profiles: list[str] = Field(default_factory=list)
    instructors: list[str] = Field(default_factory=list)
    dask: DaskPolicy | None = None
    budget: Budget | None = None
    caps: Caps | None = None  # concurrency caps (workbench.services.quota)
    session: Session | None = None
    material: Material | None = None
    slurm: SlurmPlacement | None = None  # where members' notebook servers run as Slurm jobs


class Courses(_Model):
    """Limits of course rosters (:mod:`workbench.services.rosters.app`)."""

    max_students: int = Field(
        default=500,
        description="the most students one course roster may list; a larger roster is refused as a whole",
    )

    @field_validator("max_students")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be at least 1 (the most students one roster may list, e.g. 500), got {v}")
        return v


class Culling(_Model):
    """Idle culling and session limits, enforced by the ``sessions`` hub service (:mod:`workbench.services.sessions.app`).

    ``timeout``: idle servers are stopped after this (a profile's ``idle_timeout`` overrides it);
    ``every``: how often servers are checked; ``warn_before``: how long before a session limit
    (``session.max_age``) its user is warned.
    """

    enabled: bool = True
    timeout: Duration = parse_duration("1h")
    every: Duration = parse_duration("5m")
    warn_before: list[Duration] = Field(default_factory=lambda: [parse_duration("15m"), parse_duration("5m")])


_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _placeholders(template: str) -> set[str]:
    try:
        return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as e:
        raise ValueError(f"not a valid template ({e}): {template!r}") from None


class Storage(_Model):
    """Where users' files live.

    ``home``, ``shared`` and ``datasets`` are the paths users see, the same in the embedded mode and
    in Kubernetes pods (where the home is always mounted at the image's ``/home/jovyan``). The other
    fields only matter on Kubernetes: the size and class of each user's home volume (a PVC per user),
    the PVC of each group's shared folder (``{group}`` is the group name; ReadWriteMany, made by the
    platform team) and the PVC holding the datasets (mounted read-only).
    """

    home: str = "/home/{system_user}"
    shared: str = "/srv/workbench/groups/{group}"
    datasets: str = "/srv/workbench/datasets"
    #: each course's materials folder ({course}: the course group): read-only for students,
    #: writable by the course's instructors (workbench.courses.material)
    courses: str = "/srv/workbench/courses/{course}"
    home_size: str = "10Gi"
    storage_class: str | None = None
    shared_claim: str = "workbench-group-{group}"
    datasets_claim: str = "workbench-datasets"

    @field_validator("shared", "datasets")
    @classmethod
    def _absolute_path(cls, value: str, info: ValidationInfo) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must be an absolute path (starting with /), got {value!r}")
        allowed = {"group"} if info.field_name == "shared" else set()
        used = _placeholders(value)
        if used - allowed:
            raise ValueError(
                f"unknown placeholder(s) {', '.join(sorted('{' + u + '}' for u in used - allowed))} in {value!r}; "
                + ("only {group} is allowed" if allowed else "no placeholders are allowed")
            )
        if allowed and "group" not in used:
            raise ValueError(f"must contain {{group}} so that each group gets its own folder, got {value!r}")
        return value

    @field_validator("home_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> str:
        if parse_quantity(value) <= 0:
            raise ValueError(f"must be more than 0, got {value!r}")
        return str(value)

    @field_validator("shared_claim", "datasets_claim")
    @classmethod
    def _claim_name(cls, value: str, info: ValidationInfo) -> str:
        allowed = {"group"} if info.field_name == "shared_claim" else set()
        used = _placeholders(value)
        if used - allowed or (allowed and "group" not in used):
            raise ValueError(
                "must contain {group} (one PVC per group), e.g. 'workbench-group-{group}'"
                if allowed
                else "must be a PVC name without placeholders, e.g. 'workbench-datasets'"
            )
        name = value.format(group="g") if allowed else value
        if not _DNS_SUBDOMAIN_RE.match(name) or len(value.replace("{group}", "x" * 63)) > 253:
            raise ValueError(
                f"must give a valid PVC name (lowercase letters, digits, '-' and '.', at most 253 characters), got {value!r}"
            )
        return value


class Branding(_Model):
    """The centre's name and logo on the hub's pages (the spawn page, the login page's title)."""

    name: str = Field(min_length=1, max_length=80)
    logo_url: str = ""

    @field_validator("logo_url")
    @classmethod
    def _logo(cls, value: str) -> str:
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme == "https" and parts.hostname:
            return value
        if not parts.scheme and not parts.netloc and value.startswith("/") and not value.startswith("//"):
            return value
        raise ValueError(
            f"must be an https:// URL or a path on the hub's own site starting with '/' "
            f"(e.g. /hub/static/logo.png), got {value!r}"
        )


class Policy(_Model):
    """The whole platform policy. Collections are keyed by name so Helm values can merge."""

    name: str = "Workbench"
    branding: Branding | None = None
    auth: Auth = Field(default_factory=Auth)
    culling: Culling = Field(default_factory=Culling)
    courses: Courses = Field(default_factory=Courses)
    storage: Storage = Field(default_factory=Storage)
    gpu_types: dict[Name, GpuType] = Field(default_factory=dict)
    images: dict[Name, Image] = Field(default_factory=dict)
    profiles: dict[Name, Profile] = Field(default_factory=dict)
    groups: dict[Name, Group] = Field(default_factory=dict)

    # -- queries (pure) ----------------------------------------------------

    def groups_of(self, user_groups: Iterable[str]) -> list[str]:
        """The policy groups among ``user_groups``, in policy order."""
        wanted = set(user_groups)
        return [name for name in self.groups if name in wanted]

    def profiles_for(self, user_groups: Iterable[str]) -> list[str]:
        """Names of the profiles a member of ``user_groups`` may use, in policy order."""
        allowed: set[str] = set()
        for g in self.groups_of(user_groups):
            allowed.update(self.groups[g].profiles)
        return [p for p in self.profiles if p in allowed]

    def primary_group(self, user_groups: Iterable[str]) -> str | None:
        groups = self.groups_of(user_groups)
        return groups[0] if groups else None

    def dask_group_for(self, user_groups: Iterable[str]) -> str | None:
        """The user's group whose Dask limits are the most generous (None: no Dask access)."""
        named = [g for g in self.groups_of(user_groups) if self.groups[g].dask]
        if not named:
            return None
        return max(
            named,
            key=lambda g: (
                self.groups[g].dask.max_cores,
                self.groups[g].dask.max_memory,
                self.groups[g].dask.max_workers,
            ),
        )

    def dask_policy_for(self, user_groups: Iterable[str]) -> DaskPolicy | None:
        """The most generous Dask limits among the user's groups (None: no Dask access)."""
        group = self.dask_group_for(user_groups)
        return self.groups[group].dask if group else None

    def kinds_of(self, user_groups: Iterable[str]) -> list[str]:
        return [self.groups[g].kind for g in self.groups_of(user_groups)]
