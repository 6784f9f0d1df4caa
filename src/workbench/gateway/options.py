"""Cluster options per group, for every backend: what a user may request (worker cores, memory, GPUs, environment)
and the limits of a cluster, from the group's ``dask:`` section of the policy (pure)."""

from __future__ import annotations

import math
import re

from dask_gateway_server.options import Float, Integer, Mapping, Options, String

from workbench.policy import DaskPolicy, Policy

GIB = 2**30


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


#: environment variables a user may not set for their cluster: the workbench and dask-gateway set them
RESERVED_ENV = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "SHELL",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "PYTHONHOME",
        "CUDA_VISIBLE_DEVICES",
        "NVIDIA_VISIBLE_DEVICES",
    }
)


#: variables that steer the batch system: sbatch (run with the cluster's environment on the Slurm backend)
#: reads SBATCH_* as its options (SBATCH_EXCLUSIVE=1 takes a whole node while the quota charges the
#: cores asked for), srun/salloc read theirs inside jobs, SLURM_* and SPANK_* reach Slurm and its plugins
BATCH_ENV_PREFIXES = ("SBATCH_", "SALLOC_", "SRUN_", "SLURM_", "SPANK_")

RESERVED_ENV_PREFIXES = ("DASK_GATEWAY", "DASK_DISTRIBUTED__COMM__", "JUPYTERHUB_", "WORKBENCH_", *BATCH_ENV_PREFIXES)


MAX_ENV = 64


def check_environment(env: dict) -> dict[str, str]:
    """The ``environment`` option, checked: names, string values, no variable the workbench sets (pure)."""
    if len(env) > MAX_ENV:
        raise ValueError(f"environment: at most {MAX_ENV} variables, got {len(env)}")
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ValueError(f"environment: {name!r} is not a variable name (letters, digits, _; not first a digit)")
        if name.startswith(BATCH_ENV_PREFIXES):
            raise ValueError(
                f"environment: {name} would steer the batch system ({', '.join(p + '*' for p in BATCH_ENV_PREFIXES)} "
                "are reserved); ask for cores, memory and GPUs with the cluster options instead"
            )
        if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES):
            raise ValueError(f"environment: {name} is set by the workbench for every cluster; choose another name")
        if not isinstance(value, str):
            raise ValueError(f"environment: the value of {name} must be a string (quote it), got {value!r}")
        if len(value) > 4096:
            raise ValueError(f"environment: the value of {name} is longer than 4096 characters")
    return dict(env)


def cluster_options_for(
    policy: Policy, user_groups: list[str], backend_overrides=None, base_environment: dict[str, str] | None = None
) -> Options:
    """Cluster options a user may set, bounded by their group's Dask policy (pure).

    A user none of whose groups has a Dask policy sees no options, and creating a cluster is
    refused with a message saying why. Groups with ``gpu_workers`` also get ``worker_gpus``.
    ``backend_overrides(group, dask_policy, options) -> dict`` adds backend-specific settings
    (e.g. Slurm partition, account, GRES).
    """
    group = policy.dask_group_for(user_groups)
    if group is None:
        groups = ", ".join(policy.groups_of(user_groups)) or "none"

        def refuse(options, user=None):
            raise ValueError(
                f"Your groups ({groups}) may not use Dask Gateway: none of them has a 'dask' section in the "
                "platform policy. Ask the platform team to add one."
            )

        return Options(handler=refuse)
    dask = policy.groups[group].dask
    # round down to 0.01 GiB so that the largest choice never exceeds the policy
    max_mem_gib = math.floor(dask.worker_max_memory / GIB * 100) / 100
    min_mem_gib = min(0.25, max_mem_gib)

    def handler(options, user=None):
        config = cluster_config_for(dask, options.worker_cores, options.worker_memory)
        env = {**(base_environment or {}), **check_environment(options.environment)}
        if env:  # the user's variables on top of the gateway's own (which they may not replace)
            config["environment"] = env
        if backend_overrides is not None:
            config.update(backend_overrides(group, dask, options))
        return config

    fields = [
        Integer("worker_cores", default=1, min=1, max=int(dask.worker_max_cores), label="Worker cores"),
        Float(
            "worker_memory",
            default=min(1.0, max_mem_gib),
            min=min_mem_gib,
            max=max_mem_gib,
            label="Worker memory (GiB)",
        ),
    ]
    if dask.gpu_workers:
        gtype = policy.gpu_types[dask.gpu_type]
        fields.append(
            Integer(
                "worker_gpus",
                default=0,
                min=0,
                max=dask.worker_max_gpus,
                label=f"GPUs per worker ({gtype.display_name or dask.gpu_type})",
            )
        )
    fields.append(Mapping("environment", default={}, label="Environment variables of the scheduler and workers"))
    # a notebook job's tag (workbench.jobs.gateway.JOB_TAG_OPTION): recorded with the cluster, so the job and the
    # jobs service stop exactly the run's clusters when it ends; it configures nothing
    fields.append(String("workbench_job", default="", label="Notebook job that owns this cluster (set by jobs)"))
    return Options(*fields, handler=handler)


SCHEDULER_CORES = 1


SCHEDULER_MEMORY = GIB


def cluster_config_for(dask: DaskPolicy, worker_cores: int, worker_memory_gib: float) -> dict:
    """Cluster configuration overrides for validated options under a group's policy (pure).

    The policy's ``max_cores``/``max_memory`` are what the workers may use; dask-gateway's
    cluster limits also count the scheduler, so its share is added on top.
    """
    return {
        "worker_cores": worker_cores,
        "worker_memory": int(worker_memory_gib * GIB),
        "scheduler_cores": SCHEDULER_CORES,
        "scheduler_memory": SCHEDULER_MEMORY,
        "cluster_max_workers": dask.max_workers,
        "cluster_max_cores": dask.max_cores + SCHEDULER_CORES,
        "cluster_max_memory": dask.max_memory + SCHEDULER_MEMORY,
        "idle_timeout": dask.idle_timeout,
        "max_clusters": dask.max_clusters,
    }
