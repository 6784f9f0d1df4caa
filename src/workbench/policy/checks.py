"""Loading and validating the policy: pydantic's errors turned into path + fix, the checks across sections
(references, demo names, sessions, Slurm), :func:`parse_policy`, :func:`load_policy` (the only I/O) and
:func:`cached_policy`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from workbench.policy.auth import (
    _AUTH_FIELD_TYPES,
    _AUTH_REQUIRED,
    _ENV_NAME_RE,
    _GITHUB_ENTRY_RE,
    _OAUTH,
    _url_problem,
)
from workbench.policy.base import PolicyError, _names
from workbench.policy.model import Policy
from workbench.sysusers import hub_username_problem

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
