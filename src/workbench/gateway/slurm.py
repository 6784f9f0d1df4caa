"""Dask Gateway on Slurm: each cluster's scheduler and workers are batch jobs of the user's account.

``workbench up --gateway-backend slurm`` (or ``runtime.gateway_backend == "slurm"``) makes
``configure_gateway`` call :func:`configure_slurm`, which swaps the local backend for
:class:`WorkbenchSlurmBackend`: dask-gateway's ``SlurmBackend`` plus what a group's policy asks
for and upstream cannot express:

- placement from the group's ``dask.slurm``: ``--partition``, ``--account``, ``--qos`` (as
  upstream) and ``--time`` (the walltime) on every job of the cluster;
- GPU workers: ``--gres=gpu:<dask.gpu_type>:<worker_gpus>`` on worker jobs (the Slurm GRES type
  is the policy's GPU type name), in ``gpu_partition`` when one is set;
- jobs are submitted as the hub user's Unix account (hub user ``researcher`` -> ``wb-researcher``,
  the same mapping as the local backend and the spawner), created on first use;
- the Slurm cluster: ``$SLURM_CONF`` when set, else the one at ``/etc/slurm/slurm.conf`` that
  ``scripts/slurm-up.sh`` (``make slurm``) starts;
- upstream's launcher (the per-user ``sbatch``/``scancel`` helper run through ``sudo``) is run as
  ``python -I <its file>`` (:attr:`WorkbenchSlurmBackend.launcher_python`): its console script first
  imports ``dask_gateway_server.backends`` (aiohttp), 0.27 s of CPU per job against 0.035 s, 1.3 s
  against 0.16 s wall on the loaded 2-core machine (benchmarks/README.md, target 3b).

:func:`slurm_overrides` (per-user cluster config from the policy) and :func:`placement_args`
(the sbatch arguments of one job) are pure.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

from dask_gateway_server.backends.jobqueue import launcher as jobqueue_launcher
from dask_gateway_server.backends.jobqueue.slurm import SlurmBackend, SlurmClusterConfig
from traitlets import Integer, Type, Unicode

from workbench.gateway.fast_start import FastStartMixin, scheduler_command, worker_command
from workbench.gateway.quota import ClusterCapMixin
from workbench.policy import DaskPolicy, Policy
from workbench.runtime import Runtime
from workbench.sysusers import USER_PREFIX, ensure_system_user, others_can_execute, system_username

__all__ = [
    "DEFAULT_SLURM_CONF",
    "WorkbenchSlurmBackend",
    "WorkbenchSlurmClusterConfig",
    "configure_slurm",
    "placement_args",
    "resolve_slurm_conf",
    "slurm_overrides",
    "slurm_time",
]

#: where Slurm's commands look without $SLURM_CONF, and where scripts/slurm-up.sh writes
DEFAULT_SLURM_CONF = "/etc/slurm/slurm.conf"
#: first line of a slurm.conf written by scripts/slurm-up.sh
SLURM_UP_MARKER = "# Written by Workbench scripts/slurm-up.sh"
#: the partition of GPU workers on the cluster of scripts/slurm-up.sh
SLURM_UP_GPU_PARTITION = "gpu"

#: sbatch options that placement_args decides; upstream's are replaced
_PLACEMENT_OPTIONS = ("--partition=", "--account=", "--qos=", "--time=", "--gres=", "--job-name=")


# ---------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------


def slurm_time(seconds: int) -> str:
    """A duration in seconds as Slurm's ``--time`` (``D-HH:MM:SS``), rounded up to whole minutes (pure)."""
    if seconds <= 0:
        raise ValueError(f"a walltime must be positive, got {seconds}")
    minutes = -(-int(seconds) // 60)
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    return f"{days}-{hours:02d}:{mins:02d}:00"


def slurm_overrides(group: str, dask: DaskPolicy, options) -> dict:
    """Per-user cluster config overrides for the Slurm backend from a group's policy (pure).

    ``dask.slurm`` gives where every job of the cluster runs (partition, account, QoS, walltime);
    ``options.worker_gpus`` (only offered to groups with ``gpu_workers``) how many GPUs of the
    group's ``gpu_type`` each worker job requests.
    """
    gpus = int(options.get("worker_gpus", 0) or 0)
    if gpus and not dask.gpu_workers:
        raise ValueError(f"group {group} may not request GPUs for Dask workers (worker_gpus={gpus})")
    if gpus > dask.worker_max_gpus:
        raise ValueError(f"worker_gpus must be <= {dask.worker_max_gpus}, got {gpus}")
    s = dask.slurm
    return {
        "partition": s.partition,
        "account": s.account,
        "qos": s.qos,
        "walltime": s.walltime,
        "worker_gpus": gpus,
        "gpu_type": (dask.gpu_type or "") if gpus else "",
    }


def placement_args(
    *,
    worker: bool,
    partition: str = "",
    account: str = "",
    qos: str = "",
    walltime: int = 0,
    worker_gpus: int = 0,
    gpu_type: str = "",
    gpu_partition: str = "",
) -> list[str]:
    """The sbatch arguments that place one job of a cluster (pure).

    The scheduler job (``worker=False``) never gets GPUs. A worker job with ``worker_gpus`` > 0
    requests ``--gres=gpu:<gpu_type>:<n>`` and goes to ``gpu_partition`` when one is set. Empty
    values are left to Slurm's defaults (default partition, the user's default account and QoS,
    the partition's time limit when ``walltime`` is 0).
    """
    gpus = worker_gpus if worker else 0
    if gpus and not gpu_type:
        raise ValueError("a GPU worker needs the GPU type (the Slurm GRES type, e.g. h100)")
    args = [f"--job-name=dask-{'worker' if worker else 'scheduler'}"]
    part = gpu_partition if gpus and gpu_partition else partition
    if part:
        args.append(f"--partition={part}")
    if account:
        args.append(f"--account={account}")
    if qos:
        args.append(f"--qos={qos}")
    if walltime:
        args.append(f"--time={slurm_time(walltime)}")
    if gpus:
        args.append(f"--gres=gpu:{gpu_type}:{gpus}")
    return args


def resolve_slurm_conf(runtime: Runtime | None = None, environ=None) -> str:
    """The slurm.conf of the cluster to use: ``runtime.extra["slurm_conf"]``, else ``$SLURM_CONF``,
    else the default path (where ``scripts/slurm-up.sh`` writes) (pure).

    The gateway runs as a hub-managed service, whose environment does not carry the ``SLURM_CONF``
    that ``workbench up`` was started with: ``workbench up`` passes it on in ``runtime.extra``.
    ``$SLURM_CONF`` here counts when the gateway is started some other way.
    """
    environ = os.environ if environ is None else environ
    extra = (runtime.extra if runtime is not None else {}) or {}
    return extra.get("slurm_conf") or environ.get("SLURM_CONF") or DEFAULT_SLURM_CONF


def written_by_slurm_up(conf: str | os.PathLike) -> bool:
    try:
        with open(conf) as f:
            return f.readline().startswith(SLURM_UP_MARKER)
    except OSError:
        return False


def user_steered_submission(conf_text: str) -> str | None:
    """Why users could change their jobs' sbatch options behind the gateway's back, or None (pure).

    The gateway runs ``sbatch`` as the user (``sudo -u``, through the launcher) with the cluster's
    environment only (its batch variables are refused by ``gateway.options``), in the user's home,
    with a script it writes: no shell start-up file is read. What remains is Slurm's
    ``cli_filter/user_defaults`` plugin, which reads ``~/.slurm/defaults`` (the user's own file).
    """
    for line in conf_text.splitlines():
        key, _, value = line.split("#", 1)[0].partition("=")
        if key.strip().lower() == "clifilterplugins" and "user_defaults" in value:
            return (
                "slurm.conf has CliFilterPlugins=user_defaults, which lets each user set sbatch options for the "
                "gateway's jobs in ~/.slurm/defaults (e.g. --exclusive, charged as the cores asked for): remove it"
            )
    return None


# ---------------------------------------------------------------------------
# Backend
# ---------------------------------------------------------------------------


class WorkbenchSlurmClusterConfig(SlurmClusterConfig):
    """Upstream's Slurm cluster config plus walltime, GPU workers and the per-user cluster cap."""

    max_clusters = Integer(
        0, help="How many active clusters the requesting user may have (from the group's dask.max_clusters)."
    ).tag(config=True)
    walltime = Integer(
        0,
        help="Time limit of every job of the cluster in seconds (sbatch --time, rounded up to minutes); "
        "0: the partition's limit. From the group's dask.slurm.walltime.",
    ).tag(config=True)
    worker_gpus = Integer(0, help="GPUs per worker job (sbatch --gres=gpu:<gpu_type>:<n>); 0: CPU workers.").tag(
        config=True
    )
    gpu_type = Unicode(
        "", help="Slurm GRES type of the GPUs of GPU workers: the group's dask.gpu_type (e.g. h100)."
    ).tag(config=True)
    gpu_partition = Unicode(
        "",
        help="Partition of worker jobs that request GPUs; empty: the cluster's partition. The scheduler "
        "and CPU workers always use the cluster's partition.",
    ).tag(config=True)


class WorkbenchSlurmBackend(FastStartMixin, ClusterCapMixin, SlurmBackend):
    """dask-gateway's SlurmBackend, with every job submitted as the hub user's Unix account.

    Jobs carry the group's partition, account, QoS and walltime, and GPU worker jobs their GRES
    (see :func:`placement_args`). ``sbatch``, ``squeue`` and ``scancel`` run with ``SLURM_CONF`` set
    to :attr:`slurm_conf`, so the cluster need not be at the default path (``sudo``, through which
    upstream submits as the user, drops ``SLURM_CONF``; it is passed to the launcher explicitly).
    """

    cluster_config_class = Type(
        "workbench.gateway.slurm.WorkbenchSlurmClusterConfig",
        klass="dask_gateway_server.backends.base.ClusterConfig",
        help="The cluster config class to use",
        config=True,
    )

    user_prefix = Unicode(USER_PREFIX, help="Prefix of the Unix accounts made for hub users.").tag(config=True)

    slurm_conf = Unicode(
        "", help="slurm.conf of the cluster, given to Slurm's commands as SLURM_CONF; empty: Slurm's default."
    ).tag(config=True)

    launcher_python = Unicode(
        "",
        help="Python that runs upstream's launcher file directly (`python -I launcher.py`, stdlib only) instead "
        "of the `dask-gateway-jobqueue-launcher` console script, which imports aiohttp first; empty: upstream's "
        "console script (dask_gateway_jobqueue_launcher).",
    ).tag(config=True)

    def launcher_command(self, unix: str) -> list[str]:
        """The command that runs the launcher as the Unix account ``unix`` (sudo, no environment passed)."""
        if not self.launcher_python:
            return ["sudo", "-nHu", unix, self.dask_gateway_jobqueue_launcher]
        return ["sudo", "-nHu", unix, self.launcher_python, "-I", jobqueue_launcher.__file__]

    async def run_launcher(self, launcher: list[str], action: str, **kwargs):
        """Upstream's ``do_as_user`` with ``launcher`` as the launcher command: JSON in, JSON out."""
        kwargs["action"] = action
        proc = await asyncio.create_subprocess_exec(
            *launcher,
            env={},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await proc.communicate(json.dumps(kwargs).encode("utf8"))
        stdout, stderr = stdout.decode("utf8", "replace"), stderr.decode("utf8", "replace")
        if proc.returncode != 0:
            raise Exception(
                f"Error running the jobqueue launcher ({' '.join(launcher)})\n  returncode: {proc.returncode}\n"
                f"  stdout: {stdout}\n  stderr: {stderr}"
            )
        result = json.loads(stdout)
        if not result["ok"]:
            raise Exception(result["error"])
        return result["returncode"], result["stdout"], result["stderr"]

    def _unix_name(self, hub_name: str) -> str:
        return system_username(hub_name, self.user_prefix)

    def _slurm_env(self) -> dict[str, str]:
        return {"SLURM_CONF": self.slurm_conf} if self.slurm_conf else {}

    def get_staging_directory(self, cluster):
        # upstream looks up the hub name (``researcher``) in the password database
        entry = ensure_system_user(self._unix_name(cluster.username))
        staging = cluster.config.staging_directory.format(home=entry.pw_dir, username=entry.pw_name)
        return os.path.join(staging, cluster.name)

    async def do_as_user(self, user, action, **kwargs):
        # ``user`` is the hub name: run the launcher as its Unix account, made on first use
        unix = ensure_system_user(self._unix_name(user)).pw_name
        staging = kwargs.get("staging_dir")
        if action == "stop" and staging and not os.path.exists(staging):
            # upstream's launcher returns without cancelling the job (and without the JSON reply the
            # backend waits for) when the staging directory is already gone: cancel without it
            kwargs["staging_dir"] = None
        if not self.launcher_python:
            return await super().do_as_user(unix, action, **kwargs)
        return await self.run_launcher(self.launcher_command(unix), action, **kwargs)

    def get_submit_cmd_env_stdin(self, cluster, worker=None):
        cmd, env, script = super().get_submit_cmd_env_stdin(cluster, worker)
        config = cluster.config
        placement = placement_args(
            worker=worker is not None,
            partition=config.partition,
            account=config.account,
            qos=config.qos,
            walltime=config.walltime,
            worker_gpus=config.worker_gpus,
            gpu_type=config.gpu_type,
            gpu_partition=config.gpu_partition,
        )
        rest = [a for a in cmd[1:] if not a.startswith(_PLACEMENT_OPTIONS)]
        return [cmd[0], *placement, *rest], {**env, **self._slurm_env()}, script

    def get_stop_cmd_env(self, job_id):
        cmd, env = super().get_stop_cmd_env(job_id)
        return cmd, {**env, **self._slurm_env()}

    def get_status_cmd_env(self, job_ids):
        cmd, env = super().get_status_cmd_env(job_ids)
        return cmd, {**env, **self._slurm_env()}


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def configure_slurm(c, policy: Policy, runtime: Runtime) -> None:
    """Switch the gateway configured in ``c`` to :class:`WorkbenchSlurmBackend`.

    Called by ``configure_gateway`` after the common settings (authentication, proxy, database).
    Fails with a message saying what to do when Slurm, sudo or a per-user Python is missing.
    """
    venv = Path(runtime.venv_bin)
    conf = resolve_slurm_conf(runtime)
    problems = []
    if not Path(conf).is_file():
        problems.append(
            f"no Slurm configuration at {conf}: start the one-node cluster with `make slurm` "
            "(scripts/slurm-up.sh) or set SLURM_CONF to your cluster's slurm.conf"
        )
    elif why := user_steered_submission(Path(conf).read_text(errors="replace")):
        problems.append(f"{conf}: {why}")
    for tool in ("sbatch", "squeue", "scancel", "sudo"):
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` not found on PATH (Debian: apt-get install slurm-client sudo)")
    if not runtime.system_users:
        problems.append(
            "the Slurm backend submits each user's jobs as their own Unix account (through sudo): run "
            "`workbench up` as root with per-user accounts (--system-users)"
        )
    else:
        ok, blocker = others_can_execute(venv / "python")
        if not ok:
            problems.append(f"{blocker} is not reachable by other users, so their Slurm jobs cannot run {venv}")
    if problems:
        raise RuntimeError("cannot use the Slurm backend:\n  - " + "\n  - ".join(problems))

    c.DaskGateway.backend_class = f"{WorkbenchSlurmBackend.__module__}.{WorkbenchSlurmBackend.__name__}"
    backend = c.WorkbenchSlurmBackend
    backend.user_prefix = runtime.user_prefix
    backend.slurm_conf = conf
    backend.dask_gateway_jobqueue_launcher = str(venv / "dask-gateway-jobqueue-launcher")
    backend.launcher_python = str(venv / "python")
    for trait, tool in (("submit_command", "sbatch"), ("cancel_command", "scancel"), ("status_command", "squeue")):
        setattr(backend, trait, shutil.which(tool))
    # where the jobs' schedulers report to: the gateway's HTTP proxy (on this machine: the
    # proxy listens on 127.0.0.1, so the jobs must run here too, as on the one-node cluster)
    backend.api_url = f"http://127.0.0.1:{runtime.gateway_http_port}{c.Proxy.prefix}/api"

    cfg = c.WorkbenchSlurmClusterConfig
    cfg.scheduler_cmd = scheduler_command(venv)
    cfg.worker_cmd = worker_command(venv)
    # per cluster, in the user's home (private, 0700): TLS key and certificate, job logs
    cfg.staging_directory = "{home}/.dask-gateway/"
    if written_by_slurm_up(conf):
        cfg.gpu_partition = SLURM_UP_GPU_PARTITION
