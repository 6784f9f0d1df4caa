"""The platform policy: one validated, immutable model of the platform YAML.

Every component (hub, gateway, quota service, chart) asks this model instead of
re-reading YAML. ``load_policy(path)`` is the only I/O here; everything else is
pure. Errors are collected and reported together, each naming the file, the
path of the field (``groups.physics-lab.profiles[1]``) and what is expected.
"""

from __future__ import annotations

import ipaddress
import math
import re
import string
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from workbench.sysusers import hub_username_problem

__all__ = [
    "Policy",
    "PolicyError",
    "load_policy",
    "parse_policy",
    "parse_quantity",
    "parse_duration",
]


class PolicyError(ValueError):
    """A platform YAML that cannot be used. ``problems`` is a list of (path, message)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: invalid platform policy ({len(problems)} problem{'s' if len(problems) != 1 else ''})"]
        for path, msg in problems:
            lines.append(f"  - {path or '<top level>'}: {msg}")
        super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------
# Quantities
# ---------------------------------------------------------------------------

_QUANTITY_RE = re.compile(r"^(?P<num>[0-9]+(?:\.[0-9]+)?)(?P<unit>|k|K|M|G|T|Ki|Mi|Gi|Ti)$")
_UNITS = {
    "": 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def parse_quantity(value: Any) -> int:
    """Parse a Kubernetes-style memory quantity (``8G``, ``512Mi``, ``1073741824``) into bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a memory size like 8G or 512Mi, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"must not be negative, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a memory size like 8G or 512Mi, got {value!r}")
    m = _QUANTITY_RE.match(value.strip())
    if not m:
        raise ValueError(
            f"expected a memory size like 8G, 512Mi or 1.5Gi (number then unit, no space; "
            f"units k, M, G, T, Ki, Mi, Gi, Ti), got {value!r}"
        )
    return int(Decimal(m["num"]) * _UNITS[m["unit"]])


_DURATION_RE = re.compile(r"^(?P<num>[0-9]+(?:\.[0-9]+)?)(?P<unit>s|m|h|d)?$")
_DURATION_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> int:
    """Parse a duration (``90``, ``30s``, ``15m``, ``8h``, ``2d``) into whole seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30m or 8h, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"must not be negative, got {value!r}")
        return int(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value.strip())
        if m:
            return int(Decimal(m["num"]) * _DURATION_UNITS[m["unit"]])
    raise ValueError(f"expected a duration like 90, 30s, 15m, 8h or 2d, got {value!r}")


def _positive_cpu(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, str):
            try:
                value = float(value[:-1]) / 1000 if value.endswith("m") else float(value)
            except ValueError:
                raise ValueError(f"expected a number of cores like 2 or 0.5 or 500m, got {value!r}") from None
        else:
            raise ValueError(f"expected a number of cores like 2 or 0.5, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number of cores like 2 or 0.5, got {value!r}")
    if value <= 0:
        raise ValueError(f"must be more than 0 cores, got {value!r}")
    return float(value)


Memory = Annotated[int, BeforeValidator(parse_quantity)]
Duration = Annotated[int, BeforeValidator(parse_duration)]
Cores = Annotated[float, BeforeValidator(_positive_cpu)]
Name = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length=63)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


class DemoUser(_Model):
    """A demo account (embedded mode only)."""

    groups: list[str] = Field(default_factory=list)
    admin: bool = False


class Auth(_Model):
    """How people log in, and how their identity provider's groups become policy groups.

    - ``demo``: the accounts in ``demo_users`` with one shared password (embedded mode only).
    - ``generic-oauth``: any OAuth2 / OpenID Connect provider (a university's SSO: Keycloak,
      Shibboleth OIDC, Azure AD, ...). The provider's ``groups_claim`` lists the user's groups.
    - ``github``: GitHub or GitHub Enterprise (startups). ``github_teams`` maps policy groups to
      GitHub organisations (``acme-inc``) or teams (``acme-inc:ml-team``).

    Only policy groups count: a user whose provider vouches for none of them cannot log in, and
    their hub groups are exactly the policy groups they are in. Members of ``admin_groups`` are
    hub admins. Secrets never go in this file: ``client_secret_env`` names the environment
    variable of the hub that holds the client secret.
    """

    type: Literal["demo", "generic-oauth", "github"] = "demo"
    #: OAuth client (generic-oauth and github)
    client_id: str = ""
    client_secret_env: str = ""
    #: never valid: only declared so that a secret pasted into the YAML gets a precise error
    client_secret: Any = Field(default=None, repr=False, exclude=True)
    scope: list[str] | None = None  # None: the type's default (see workbench.auth.oauth.DEFAULT_SCOPES)
    login_service: str = ""  # the text of the login button ("Sign in with <login_service>")
    #: generic-oauth: the provider's endpoints (from its /.well-known/openid-configuration) and claims
    authorize_url: str = ""
    token_url: str = ""
    userdata_url: str = ""
    #: generic-oauth: verify the provider's ID tokens (signature by a key of jwks_url, iss, aud, expiry)
    jwks_url: str = ""
    issuer: str = ""
    username_claim: str = "preferred_username"
    groups_claim: str = "groups"  # a claim name, or a dotted path into nested claims (realm_access.roles)
    #: github: GitHub Enterprise URL (default https://github.com) and group -> organisations / teams
    github_url: str = ""
    github_teams: dict[str, list[str]] = Field(default_factory=dict)
    admin_groups: list[str] = Field(default_factory=list)
    demo_users: dict[str, DemoUser] = Field(default_factory=dict)


_OAUTH = ("generic-oauth", "github")
#: auth fields and the auth types that use them (demo_users has its own check)
_AUTH_FIELD_TYPES: dict[str, tuple[str, ...]] = {
    "client_id": _OAUTH,
    "client_secret_env": _OAUTH,
    "scope": _OAUTH,
    "login_service": _OAUTH,
    "authorize_url": ("generic-oauth",),
    "token_url": ("generic-oauth",),
    "userdata_url": ("generic-oauth",),
    "jwks_url": ("generic-oauth",),
    "issuer": ("generic-oauth",),
    "username_claim": ("generic-oauth",),
    "groups_claim": ("generic-oauth",),
    "github_url": ("github",),
    "github_teams": ("github",),
}
#: required fields per auth type, with what to put there
_AUTH_REQUIRED: dict[str, dict[str, str]] = {
    "generic-oauth": {
        "client_id": "the client ID of the OAuth client registered with your identity provider",
        "client_secret_env": (
            "the NAME of the hub's environment variable that holds the client secret "
            "(e.g. client_secret_env: WORKBENCH_OAUTH_CLIENT_SECRET); the secret itself never goes in this file"
        ),
        "authorize_url": (
            "the provider's authorization endpoint, where users log in "
            "(e.g. https://sso.example.edu/oauth2/authorize; 'authorization_endpoint' in /.well-known/openid-configuration)"
        ),
        "token_url": (
            "the provider's token endpoint, where the hub exchanges the login code for tokens "
            "(e.g. https://sso.example.edu/oauth2/token; 'token_endpoint' in /.well-known/openid-configuration)"
        ),
        "userdata_url": (
            "the provider's userinfo endpoint, which returns the user's claims including groups "
            "(e.g. https://sso.example.edu/oauth2/userinfo; 'userinfo_endpoint' in /.well-known/openid-configuration)"
        ),
    },
    "github": {
        "client_id": "the client ID of the GitHub OAuth app",
        "client_secret_env": (
            "the NAME of the hub's environment variable that holds the GitHub OAuth app's client secret "
            "(e.g. client_secret_env: WORKBENCH_GITHUB_CLIENT_SECRET); the secret itself never goes in this file"
        ),
        "github_teams": (
            "at least one policy group mapped to GitHub organisations or teams, e.g. "
            "github_teams: {startup-acme: [acme-inc, 'acme-inc:ml-team']}; nobody could log in otherwise"
        ),
    },
}
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_GITHUB_ENTRY_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?::[A-Za-z0-9._-]+)?$")


def _url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an identity provider endpoint (None: it can)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return f"must be an absolute https:// URL, got {url!r}"
    if parts.scheme == "http" and not (parts.hostname == "localhost" or _is_loopback_ip(parts.hostname)):
        return (
            f"must use https:// (tokens and user data travel over it); plain http is only accepted for a "
            f"provider on this machine (localhost, 127.0.0.1, ::1), got {url!r}"
        )
    return None


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _auth_problems(p: Policy) -> list[tuple[str, str]]:
    """Checks of ``auth`` that depend on its type and on the groups (pure)."""
    auth = p.auth
    problems: list[tuple[str, str]] = []
    if auth.client_secret is not None:
        problems.append(
            (
                "auth.client_secret",
                "secrets never go in the platform YAML: remove it, put the secret in an environment variable "
                "of the hub and name that variable in auth.client_secret_env",
            )
        )
    for field in sorted(auth.model_fields_set & set(_AUTH_FIELD_TYPES)):
        types = _AUTH_FIELD_TYPES[field]
        if auth.type not in types:
            used = " and ".join(repr(t) for t in types)
            problems.append(
                (
                    f"auth.{field}",
                    f"only used with auth type{'s' if len(types) > 1 else ''} {used}, not {auth.type!r}; remove it",
                )
            )
    for field, what in _AUTH_REQUIRED.get(auth.type, {}).items():
        if not getattr(auth, field):
            problems.append((f"auth.{field}", f"auth type {auth.type!r} needs {what}"))
    if auth.type not in _OAUTH:
        return problems

    if auth.client_secret_env and not _ENV_NAME_RE.match(auth.client_secret_env):
        problems.append(
            (
                "auth.client_secret_env",
                "must be the NAME of an environment variable (letters, digits and '_', not starting with a digit), "
                "like WORKBENCH_OAUTH_CLIENT_SECRET, never the secret itself",
            )
        )
    for i, s in enumerate(auth.scope or []):
        if not s or any(c.isspace() for c in s):
            problems.append((f"auth.scope[{i}]", f"must be one scope name without spaces, got {s!r}"))
    if auth.type == "generic-oauth":
        for field in ("authorize_url", "token_url", "userdata_url", "jwks_url"):
            url = getattr(auth, field)
            if url and (why := _url_problem(url)):
                problems.append((f"auth.{field}", why))
        if bool(auth.jwks_url) != bool(auth.issuer):
            missing, given = ("issuer", "jwks_url") if auth.jwks_url else ("jwks_url", "issuer")
            problems.append(
                (
                    f"auth.{missing}",
                    f"ID tokens are verified with both auth.jwks_url and auth.issuer; auth.{given} is set, so set "
                    f"auth.{missing} too ('jwks_uri' and 'issuer' in the provider's /.well-known/openid-configuration)",
                )
            )
        for field in ("username_claim", "groups_claim"):
            if not getattr(auth, field).strip():
                problems.append((f"auth.{field}", "must name a claim of the provider's user info (e.g. 'groups')"))
    else:  # github
        if auth.github_url and (why := _url_problem(auth.github_url)):
            problems.append(("auth.github_url", why))
        if auth.scope is not None and "read:org" not in auth.scope:
            problems.append(
                ("auth.scope", "GitHub needs the 'read:org' scope to see organisation and team membership; add it")
            )
        for group, entries in auth.github_teams.items():
            if group not in p.groups:
                problems.append(
                    (
                        f"auth.github_teams.{group}",
                        f"unknown group {group!r}; define it under 'groups' or use one of: {_names(p.groups)}",
                    )
                )
            if not entries:
                problems.append(
                    (f"auth.github_teams.{group}", "list at least one GitHub organisation or organisation:team")
                )
            for i, entry in enumerate(entries):
                if not _GITHUB_ENTRY_RE.match(entry):
                    problems.append(
                        (
                            f"auth.github_teams.{group}[{i}]",
                            "expected a GitHub organisation ('acme-inc') or organisation:team ('acme-inc:ml-team') "
                            f"as they appear in github.com URLs, got {entry!r}",
                        )
                    )
    return problems


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


# ---------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------


def _fmt_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


_HINTS = {
    "extra_forbidden": "unknown key; remove it or check its spelling",
    "missing": "required field is missing",
}


def _pydantic_problems(err: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # pydantic appends the validator name for Annotated/union types; drop that noise
        loc = tuple(p for p in loc if p not in ("int", "float", "str", "GpuRequest", "DaskPolicy"))
        msg = _HINTS.get(e["type"])
        if msg is None:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            if e["type"] == "string_pattern_mismatch":
                msg = "names must be lowercase letters, digits and '-' (like a DNS label), at most 63 characters"
            if e["type"] == "literal_error":
                msg = f"{msg}, got {e.get('input')!r}"
        problems.append((_fmt_loc(loc), msg))
    return problems


def _reference_problems(p: Policy) -> list[tuple[str, str]]:
    problems = []
    for pname, prof in p.profiles.items():
        if prof.image not in p.images:
            problems.append(
                (
                    f"profiles.{pname}.image",
                    f"unknown image {prof.image!r}; define it under 'images' or use one of: {_names(p.images)}",
                )
            )
        if prof.gpu and prof.gpu.type not in p.gpu_types:
            problems.append(
                (
                    f"profiles.{pname}.gpu.type",
                    f"unknown GPU type {prof.gpu.type!r}; define it under 'gpu_types' or use one of: {_names(p.gpu_types)}",
                )
            )
        if prof.memory_limit is not None and prof.memory_limit < prof.memory:
            problems.append((f"profiles.{pname}.memory_limit", "must be at least 'memory' (the guarantee)"))
    for gname, group in p.groups.items():
        for i, prof in enumerate(group.profiles):
            if prof not in p.profiles:
                problems.append(
                    (
                        f"groups.{gname}.profiles[{i}]",
                        f"unknown profile {prof!r}; define it under 'profiles' or use one of: {_names(p.profiles)}",
                    )
                )
        if group.kind != "course" and group.instructors:
            problems.append((f"groups.{gname}.instructors", "only groups of kind 'course' have instructors"))
        if group.dask and group.dask.gpu_workers and group.dask.gpu_type not in p.gpu_types:
            problems.append(
                (
                    f"groups.{gname}.dask.gpu_type",
                    f"gpu_workers needs a GPU type defined under 'gpu_types' (one of: {_names(p.gpu_types)}), "
                    f"got {group.dask.gpu_type!r}",
                )
            )
        if group.dask and group.dask.worker_max_cores < 1:
            problems.append(
                (f"groups.{gname}.dask.worker_max_cores", "must be at least 1: Dask workers get whole cores")
            )
        if group.dask and group.dask.worker_max_cores > group.dask.max_cores:
            problems.append((f"groups.{gname}.dask.worker_max_cores", "must not exceed dask.max_cores"))
        if group.dask and group.dask.worker_max_memory > group.dask.max_memory:
            problems.append((f"groups.{gname}.dask.worker_max_memory", "must not exceed dask.max_memory"))
    for i, g in enumerate(p.auth.admin_groups):
        if g not in p.groups:
            problems.append(
                (
                    f"auth.admin_groups[{i}]",
                    f"unknown group {g!r}; define it under 'groups' or use one of: {_names(p.groups)}",
                )
            )
    if p.auth.type == "demo" and not p.auth.demo_users:
        problems.append(("auth.demo_users", "auth type 'demo' needs at least one demo user"))
    if p.auth.type != "demo" and p.auth.demo_users:
        problems.append(("auth.demo_users", f"demo users are only allowed with auth type 'demo', not {p.auth.type!r}"))
    for uname, user in p.auth.demo_users.items():
        if why := _demo_name_problem(uname):
            problems.append((f"auth.demo_users.{uname}", why))
        for i, g in enumerate(user.groups):
            if g not in p.groups:
                problems.append(
                    (
                        f"auth.demo_users.{uname}.groups[{i}]",
                        f"unknown group {g!r}; define it under 'groups' or use one of: {_names(p.groups)}",
                    )
                )
    problems += _auth_problems(p)
    problems += _session_problems(p)
    problems += _slurm_problems(p)
    return problems


def _demo_name_problem(name: str) -> str | None:
    """Why a demo account's name cannot be a hub user with a Unix account (None: it can) (pure)."""
    if why := hub_username_problem(name):
        return f"{why}; rename the account (letters, digits, '-', '_', '.', '@')"
    if name != name.lower() or name != name.strip():
        return (
            f"the hub lowercases and strips user names, so {name!r} could never log in; "
            f"write it as {name.strip().lower()!r}"
        )
    return None


def _session_problems(p: Policy) -> list[tuple[str, str]]:
    """Checks of profiles' session and idle limits and of ``culling`` (pure)."""
    problems = []
    for pname, prof in p.profiles.items():
        if prof.session is not None and prof.session.max_age is not None and prof.session.max_age <= 0:
            problems.append(
                (f"profiles.{pname}.session.max_age", "must be more than 0 (like 8h); remove 'session' for no limit")
            )
        if prof.idle_timeout is not None and prof.idle_timeout <= 0:
            problems.append(
                (f"profiles.{pname}.idle_timeout", "must be more than 0 (like 30m); remove it to use culling.timeout")
            )
        if prof.gpu_idle_timeout is not None:
            if prof.gpu is None:
                problems.append(
                    (
                        f"profiles.{pname}.gpu_idle_timeout",
                        "only profiles with a 'gpu' have GPUs to watch; remove it or use idle_timeout",
                    )
                )
            elif prof.gpu_idle_timeout <= 0:
                problems.append(
                    (
                        f"profiles.{pname}.gpu_idle_timeout",
                        "must be more than 0 (like 20m); remove it to never stop servers for idle GPUs",
                    )
                )
    if p.culling.every <= 0:
        problems.append(("culling.every", "must be more than 0 (like 5m): how often servers are checked"))
    if p.culling.enabled and p.culling.timeout <= 0:
        problems.append(
            ("culling.timeout", "must be more than 0 (like 1h); use 'enabled: false' to never stop idle servers")
        )
    for i, lead in enumerate(p.culling.warn_before):
        if lead <= 0:
            problems.append(
                (
                    f"culling.warn_before[{i}]",
                    "must be more than 0 (like 15m): how long before a session limit users are warned",
                )
            )
        elif lead in p.culling.warn_before[:i]:
            problems.append((f"culling.warn_before[{i}]", f"{lead}s is listed twice; list each warning once"))
    return problems


def _slurm_problems(p: Policy) -> list[tuple[str, str]]:
    """Checks of the ``slurm:`` sections of profiles (notebook servers as Slurm jobs) (pure)."""
    problems = []
    for pname, prof in p.profiles.items():
        if prof.slurm is not None and prof.slurm.gres_type is not None and prof.gpu is None:
            problems.append(
                (
                    f"profiles.{pname}.slurm.gres_type",
                    "only profiles with a 'gpu' request GPUs (GRES); remove gres_type or add a gpu to the profile",
                )
            )
    return problems


def _names(d: dict) -> str:
    return ", ".join(sorted(d)) or "(none defined)"


def parse_policy(data: Any, source: str = "<policy>") -> Policy:
    """Validate already-loaded YAML data into a :class:`Policy` (pure)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(source, [("", f"expected a mapping at the top level, got {type(data).__name__}")])
    try:
        policy = Policy.model_validate(data)
    except ValidationError as err:
        raise PolicyError(source, _pydantic_problems(err)) from None
    problems = _reference_problems(policy)
    if problems:
        raise PolicyError(source, problems)
    return policy


def load_policy(path: str | Path) -> Policy:
    """Read and validate a platform YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PolicyError(str(path), [("", "file not found; pass --config with the path to a platform YAML")]) from None
    except OSError as e:
        raise PolicyError(str(path), [("", f"cannot read file: {e.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(e, "problem", None) or str(e)
        raise PolicyError(str(path), [("", f"not valid YAML at {where}: {problem}")]) from None
    return parse_policy(data, source=str(path))


_LOADED: dict[str, Policy] = {}


def cached_policy(path: str) -> Policy:
    """The policy at ``path``, loaded once per process (the spawner, the gateway's backend and its config)."""
    if path not in _LOADED:
        _LOADED[path] = load_policy(path)
    return _LOADED[path]
