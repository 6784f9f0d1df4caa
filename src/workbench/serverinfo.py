"""What a notebook server is told about itself, written once for every engine (pure).

The JupyterLab cockpit (:mod:`workbench.lab.cockpit`) shows the user where their server runs and what
applies to it. A single-user server has no policy file (on Kubernetes none is mounted; embedded, the
state folder is the platform's own), so the spawner hands it the facts in its environment:

- ``WORKBENCH_ENGINE``: ``embedded``, ``kubernetes`` or ``slurm``;
- ``WORKBENCH_SERVER_INFO``: JSON of :func:`server_info` (profile, GPU request, the group charged,
  the session and idle limits of :func:`workbench.services.sessions.rules.server_limits`, the
  budgets' ``warn_at`` levels of the user's groups, when the session ends);
- ``MEM_LIMIT`` (bytes) and ``CPU_LIMIT`` (cores): jupyter-resource-usage's own variables (KubeSpawner
  sets them from its limits; the local spawner from the profile);
- ``DASK_LABEXTENSION__USE_GATEWAY``: for members of a group with a ``dask`` section, dask-labextension's
  cluster list and "new cluster" button use the Dask Gateway (dask-labextension-gateway), not local clusters.

Nothing in it is a secret or a grant: the cockpit only displays it, every decision stays with the hub
and the services.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

from workbench.policy import Policy
from workbench.services.sessions.rules import server_limits

ENGINES = ("embedded", "kubernetes", "slurm")
INFO_VAR = "WORKBENCH_SERVER_INFO"
ENGINE_VAR = "WORKBENCH_ENGINE"


def charged_group(policy: Policy, user_groups: Iterable[str], profile: str) -> str | None:
    """The group a server of ``profile`` is charged to: the user's first group entitled to it (policy order)."""
    groups = policy.groups_of(user_groups)
    return next((g for g in groups if profile in policy.groups[g].profiles), groups[0] if groups else None)


def server_info(
    policy: Policy,
    user_groups: Iterable[str],
    profile: str,
    engine: str,
    started: datetime | None = None,
    gpu_devices: Sequence[str] = (),
) -> dict:
    """The facts of one server of ``profile`` started at ``started`` by a member of ``user_groups``."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: use one of {', '.join(ENGINES)}")
    groups = list(user_groups)
    prof = policy.profiles[profile]
    limits = server_limits(policy, groups, profile)
    gpu = None
    if prof.gpu:
        gtype = policy.gpu_types[prof.gpu.type]
        gpu = {
            "type": prof.gpu.type,
            "display_name": gtype.display_name or prof.gpu.type,
            "count": prof.gpu.count,
            "resource": gtype.resource,
            "mig": "mig-" in gtype.resource,
            "devices": list(gpu_devices),
        }
    ends_at = None
    if limits.max_age is not None and started is not None:
        ends_at = (started.astimezone(UTC) + timedelta(seconds=limits.max_age)).strftime("%Y-%m-%dT%H:%M:%SZ")
    mine = policy.groups_of(groups)
    return {
        "engine": engine,
        "profile": profile,
        "display_name": prof.display_name or profile,
        "cpu": prof.cpu,
        "memory": prof.memory_limit or prof.memory,
        "gpu": gpu,
        "groups": mine,
        "charged_group": charged_group(policy, groups, profile),
        "session": {
            "max_age": limits.max_age,
            "ends_at": ends_at,
            "idle_timeout": limits.idle_timeout,
            "gpu_idle_timeout": limits.gpu_idle_timeout,
        },
        "warn_at": {g: list(policy.groups[g].budget.warn_at) for g in mine if policy.groups[g].budget is not None},
    }


def server_info_env(
    policy: Policy,
    user_groups: Iterable[str],
    profile: str,
    engine: str,
    started: datetime | None = None,
    gpu_devices: Sequence[str] = (),
) -> dict[str, str]:
    """The environment a spawner adds: ``WORKBENCH_ENGINE``, ``WORKBENCH_SERVER_INFO``, ``MEM_LIMIT``, ``CPU_LIMIT``."""
    groups = list(user_groups)
    info = server_info(policy, groups, profile, engine, started or datetime.now(UTC), gpu_devices)
    env = {
        ENGINE_VAR: engine,
        INFO_VAR: json.dumps(info, separators=(",", ":"), sort_keys=True),
        "MEM_LIMIT": str(int(info["memory"])),
        "CPU_LIMIT": f"{info['cpu']:g}",
    }
    if policy.dask_group_for(groups) is not None:
        env["DASK_LABEXTENSION__USE_GATEWAY"] = "True"
    return env
