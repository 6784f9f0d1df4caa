"""The platform policy: one validated, immutable model of the platform YAML.

Every component (hub, gateway, quota service, chart) asks this model instead of
re-reading YAML. ``load_policy(path)`` is the only I/O here; everything else is
pure. Errors are collected and reported together, each naming the file, the
path of the field (``groups.physics-lab.profiles[1]``) and what is expected.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)

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
    return int(float(m["num"]) * _UNITS[m["unit"]])


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
            return int(float(m["num"]) * _DURATION_UNITS[m["unit"]])
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
    type: Literal["demo", "generic-oauth", "github"] = "demo"
    groups_claim: str = "groups"
    admin_groups: list[str] = Field(default_factory=list)
    demo_users: dict[str, DemoUser] = Field(default_factory=dict)


class GpuType(_Model):
    resource: str = "nvidia.com/gpu"
    display_name: str = ""
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)


class Image(_Model):
    image: str
    display_name: str = ""


class GpuRequest(_Model):
    type: str
    count: int = Field(default=1, ge=1, le=16)


class Profile(_Model):
    display_name: str = ""
    description: str = ""
    cpu: Cores = 1.0
    memory: Memory = parse_quantity("2G")
    memory_limit: Memory | None = None
    gpu: GpuRequest | None = None
    image: str = "base"
    env: dict[str, str] = Field(default_factory=dict)


class DaskPolicy(_Model):
    max_cores: Cores = 4.0
    max_memory: Memory = parse_quantity("16G")
    max_workers: int = Field(default=4, ge=0)
    max_clusters: int = Field(default=1, ge=0)
    worker_max_cores: Cores = 2.0
    worker_max_memory: Memory = parse_quantity("8G")
    gpu_workers: bool = False
    idle_timeout: Duration = parse_duration("30m")


class Budget(_Model):
    gpu_hours: float | None = Field(default=None, ge=0)
    cpu_hours: float | None = Field(default=None, ge=0)
    period: Literal["month", "term", "total"] = "month"


class Session(_Model):
    max_age: Duration | None = None


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
    session: Session | None = None
    material: Material | None = None


class Culling(_Model):
    enabled: bool = True
    timeout: Duration = parse_duration("1h")
    every: Duration = parse_duration("5m")


class Storage(_Model):
    home: str = "/home/{system_user}"
    shared: str = "/srv/workbench/groups/{group}"
    datasets: str = "/srv/workbench/datasets"


class Policy(_Model):
    """The whole platform policy. Collections are keyed by name so Helm values can merge."""

    name: str = "Workbench"
    auth: Auth = Field(default_factory=Auth)
    culling: Culling = Field(default_factory=Culling)
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

    def dask_policy_for(self, user_groups: Iterable[str]) -> DaskPolicy | None:
        """The most generous Dask limits among the user's groups (None: no Dask access)."""
        policies = [self.groups[g].dask for g in self.groups_of(user_groups) if self.groups[g].dask]
        if not policies:
            return None
        return max(policies, key=lambda d: (d.max_cores, d.max_memory, d.max_workers))

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
        if group.dask and group.dask.worker_max_cores > group.dask.max_cores:
            problems.append((f"groups.{gname}.dask.worker_max_cores", "must not exceed dask.max_cores"))
        if group.dask and group.dask.worker_max_memory > group.dask.max_memory:
            problems.append((f"groups.{gname}.dask.worker_max_memory", "must not exceed dask.max_memory"))
    for i, g in enumerate(p.auth.admin_groups):
        if g not in p.groups:
            problems.append(
                (f"auth.admin_groups[{i}]", f"unknown group {g!r}; define it under 'groups' or use one of: {_names(p.groups)}")
            )
    if p.auth.type == "demo" and not p.auth.demo_users:
        problems.append(("auth.demo_users", "auth type 'demo' needs at least one demo user"))
    if p.auth.type != "demo" and p.auth.demo_users:
        problems.append(("auth.demo_users", f"demo users are only allowed with auth type 'demo', not {p.auth.type!r}"))
    for uname, user in p.auth.demo_users.items():
        for i, g in enumerate(user.groups):
            if g not in p.groups:
                problems.append(
                    (
                        f"auth.demo_users.{uname}.groups[{i}]",
                        f"unknown group {g!r}; define it under 'groups' or use one of: {_names(p.groups)}",
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
