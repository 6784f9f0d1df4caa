"""The pure parts of notebook jobs: parameters, time limits, names, ledger items, the Slurm batch script.

Every function here is pure (no I/O) and every error is a :class:`JobError` whose message names the
field and the fix, so the CLI and the service give the same words.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from workbench.policy import Policy, parse_duration

__all__ = [
    "DEFAULT_MAX_SECONDS",
    "JobError",
    "SlurmPlacement",
    "check_notebook_path",
    "check_parameters",
    "job_item_id",
    "job_name",
    "max_job_seconds",
    "parse_parameters",
    "parse_scontrol",
    "resolve_time_limit",
    "run_id",
    "sbatch_args",
    "sbatch_script",
]

#: the longest a job may run when neither the group nor the profile sets a limit
DEFAULT_MAX_SECONDS = 24 * 3600
#: the time limit of a job submitted without one (or the group's maximum, if shorter)
DEFAULT_SECONDS = 3600
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KEYWORDS = {"False", "None", "True", "and", "as", "def", "del", "for", "from", "if", "import", "in", "is", "lambda"}
_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
MAX_PARAMETERS_BYTES = 64 * 1024


class JobError(ValueError):
    """A job request that cannot run; the message names the field and the fix."""


# ---------------------------------------------------------------------------
# Parameters (papermill style: `-p name=value`)
# ---------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not _IDENT.match(name) or name in _KEYWORDS:
        fixed = re.sub(r"\W", "_", name) or "x"
        if fixed[0].isdigit():
            fixed = f"_{fixed}"
        raise JobError(
            f"parameter {name!r}: not a Python variable name; parameters become variables of the notebook, "
            f"use letters, digits and _ (e.g. {fixed!r})"
        )


def parse_parameters(items: Iterable[str]) -> dict:
    """``["lr=0.1", "name=run 1", "layers=[1,2]"]`` -> ``{"lr": 0.1, "name": "run 1", "layers": [1, 2]}``.

    A value is read as JSON when it is JSON (numbers, ``true``/``false``/``null``, lists, objects, quoted
    strings), else taken as a string. ``-p`` twice for the same name is an error, as is a missing ``=``.
    """
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise JobError(f"parameter {item!r} has no value: write -p {item or 'NAME'}=VALUE")
        name, raw = item.split("=", 1)
        name = name.strip()
        if not name:
            raise JobError(f"parameter {item!r} has no name: write -p NAME={raw}")
        _check_name(name)
        if name in out:
            raise JobError(f"parameter {name!r} is given twice: keep one -p {name}=…")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out[name] = value
    return out


def check_parameters(params) -> dict:
    """The ``parameters`` of a job request (a JSON object of variable names), or :class:`JobError`."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise JobError('parameters: must be an object of name: value (e.g. {"lr": 0.1})')
    for name in params:
        _check_name(str(name))
    if len(json.dumps(params)) > MAX_PARAMETERS_BYTES:
        raise JobError(f"parameters: more than {MAX_PARAMETERS_BYTES // 1024} KiB; pass a file name instead")
    return dict(params)


def parameters_source(params: dict) -> str:
    """The code of the injected-parameters cell (pure): one assignment per parameter, JSON values as Python."""
    lines = ["# Parameters (injected by workbench job)"]
    for name, value in params.items():
        lines.append(f"{name} = {value!r}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Time limits
# ---------------------------------------------------------------------------


def max_job_seconds(policy: Policy, group: str, profile: str) -> int:
    """The longest a job of ``profile`` charged to ``group`` may run (pure).

    The shorter of the group's and the profile's ``session.max_age`` when either is set (a job is a session
    without a browser); else the group's ``dask.slurm.walltime`` (what its batch jobs may use); else 24 h.
    """
    g = policy.groups[group]
    p = policy.profiles[profile]
    ages = [s.max_age for s in (g.session, p.session) if s is not None and s.max_age]
    if ages:
        return min(ages)
    if g.dask is not None and g.dask.slurm is not None and g.dask.slurm.walltime:
        return g.dask.slurm.walltime
    return DEFAULT_MAX_SECONDS


def _fmt(seconds: int) -> str:
    h, rest = divmod(int(seconds), 3600)
    m = rest // 60
    return f"{h}h{m:02d}m" if m else f"{h}h"


def resolve_time_limit(value, policy: Policy, group: str, profile: str) -> int:
    """``--time`` (``"2h"``, ``"90m"``, seconds; None: 1 h or the group's maximum if shorter) in seconds."""
    limit = max_job_seconds(policy, group, profile)
    if value is None or value == "":
        return min(DEFAULT_SECONDS, limit)
    try:
        seconds = parse_duration(value)
    except (ValueError, TypeError) as e:
        raise JobError(f"time: {e}; write it like 2h, 90m or 3600") from None
    if seconds <= 0:
        raise JobError("time: must be more than 0 (like 2h)")
    if seconds > limit:
        raise JobError(
            f"time: {_fmt(seconds)} is more than the {_fmt(limit)} that jobs of group {group} with profile "
            f"{profile} may run; ask for --time {_fmt(limit)} or less"
        )
    return seconds


# ---------------------------------------------------------------------------
# Names and paths
# ---------------------------------------------------------------------------


def check_notebook_path(path: str) -> str:
    """A notebook path relative to the user's home (``analysis/fit.ipynb``), normalised; else :class:`JobError`."""
    if not isinstance(path, str) or not path.strip():
        raise JobError("notebook: give the notebook's path relative to your home (e.g. analysis/fit.ipynb)")
    p = path.strip()
    if p.startswith("~/"):
        p = p[2:]
    parts = [x for x in p.split("/") if x not in ("", ".")]
    if p.startswith("/") or ".." in parts or not parts:
        raise JobError(f"notebook: {path!r} must be a path inside your home without '..' (e.g. analysis/fit.ipynb)")
    if not parts[-1].endswith(".ipynb"):
        raise JobError(f"notebook: {path!r} is not a notebook; give a .ipynb file")
    return "/".join(parts)


def job_name(name: str | None, notebook: str) -> str:
    """The job's folder name under ``~/jobs`` (given, or the notebook's stem), safe as one path part (pure)."""
    raw = name if name else notebook.rsplit("/", 1)[-1].removesuffix(".ipynb")
    clean = _NAME.sub("-", raw).strip(".-")[:64]
    if not clean:
        raise JobError(f"name: {name!r} has no usable character; use letters, digits, '-', '_' or '.'")
    return clean


def run_id(at: datetime, job_id: str) -> str:
    """The run's folder under ``~/jobs/<name>``: its submission time and the job's id (pure)."""
    return f"{at.strftime('%Y%m%d-%H%M%S')}-{job_id[:6]}"


def job_item_id(user: str, job_id: str) -> str:
    """The ledger item of a job's run (``job:alice/<id>``); its admission is ``job-admit:alice/<id>``."""
    return f"job:{user}/{job_id}"


# ---------------------------------------------------------------------------
# Slurm
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SlurmPlacement:
    """Where and with what one job runs on Slurm (from the profile and the charged group's ``dask.slurm``)."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    cpus: int = 1
    memory_mb: int = 0
    gpu_type: str = ""
    gpu_count: int = 0

    @classmethod
    def of(cls, policy: Policy, group: str, profile: str, gpu_partition: str = "") -> SlurmPlacement:
        p = policy.profiles[profile]
        g = policy.groups[group]
        s = g.dask.slurm if g.dask is not None else None
        gpus = p.gpu.count if p.gpu else 0
        partition = gpu_partition if gpus and gpu_partition else (s.partition if s else "")
        return cls(
            partition=partition,
            account=s.account if s else "",
            qos=s.qos if s else "",
            cpus=max(1, math.ceil(p.cpu)),
            memory_mb=max(1, math.ceil(p.memory / 2**20)),
            gpu_type=p.gpu.type if p.gpu else "",
            gpu_count=gpus,
        )


def sbatch_args(placement: SlurmPlacement, *, name: str, time_limit: int, run_dir: str) -> list[str]:
    """The sbatch options of a job (pure): placement, ``--time``, output into the run folder."""
    from workbench.gateway.slurm import slurm_time

    args = [f"--job-name=wb-job-{name}", "--parsable", f"--time={slurm_time(time_limit)}"]
    if placement.partition:
        args.append(f"--partition={placement.partition}")
    if placement.account:
        args.append(f"--account={placement.account}")
    if placement.qos:
        args.append(f"--qos={placement.qos}")
    args += [f"--cpus-per-task={placement.cpus}", "--ntasks=1", "--nodes=1"]
    if placement.memory_mb:
        args.append(f"--mem={placement.memory_mb}M")
    if placement.gpu_count:
        args.append(f"--gres=gpu:{placement.gpu_type}:{placement.gpu_count}")
    args += [f"--chdir={run_dir}", f"--output={run_dir}/job.log", "--open-mode=append"]
    return args


def execute_command(python: str, notebook: str, run_dir: str, params: dict) -> list[str]:
    """The command that runs the notebook inside the job, as the user (:mod:`workbench.jobs.execute`)."""
    return [
        python,
        "-m",
        "workbench.jobs.execute",
        "--notebook",
        notebook,
        "--run-dir",
        run_dir,
        "--parameters",
        json.dumps(params),
    ]


def sbatch_script(command: list[str], env: dict[str, str] | None = None) -> str:
    """The batch script given to sbatch on stdin (pure): every value shell-quoted."""
    lines = ["#!/bin/bash", "set -e"]
    for k, v in sorted((env or {}).items()):
        lines.append(f"export {k}={shlex.quote(v)}")
    lines.append("exec " + " ".join(shlex.quote(c) for c in command))
    return "\n".join(lines) + "\n"


def parse_scontrol(text: str) -> dict[str, str]:
    """``scontrol show job -o`` output as a dict (pure; values without spaces, as Slurm writes them)."""
    out: dict[str, str] = {}
    for item in text.split():
        if "=" in item:
            k, v = item.split("=", 1)
            out.setdefault(k, v)
    return out
