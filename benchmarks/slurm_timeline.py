"""Per-worker start-up timeline of a Dask cluster whose workers are Slurm jobs (used by bench_slurm.py).

For each worker, in wall-clock seconds after the client asked for the workers (``cluster.scale``), from the
sources that each step leaves on this one machine:

  sbatch returned   gateway: its log line "Job <id> submitted for worker" (in the hub log, ms);
                    jobqueue: dask-jobqueue's debug line "Starting job: <id>" (this process, ms)
  slurm submit      Slurm's SubmitTime of the job (``scontrol show job``; whole seconds)
  slurm start       Slurm's StartTime (whole seconds)
  job script        creation time of the job's batch-script process (the nanny's parent; psutil, 10 ms)
  python exec'd     creation time of the nanny process (the ``python -m distributed.cli.dask_worker`` of the job)
  imports done      the nanny's "Start Nanny at" log line (in the job's output file, ms): Python and
                    ``distributed`` imported, the nanny listening
  worker process    creation time of the worker process (forked or spawned by the nanny)
  worker started    the worker's "Start worker at" log line
  registered        the worker's "Registered to" log line (TLS/TCP connect and handshake with the scheduler)
  scheduler saw it  the scheduler's "add-worker" event (``client.get_events("all")``)

Everything is read from the running cluster before it is shut down (``collect``). ``print_timeline`` prints the
median over workers and runs of each step, per side.
"""

from __future__ import annotations

import logging
import re
import statistics
import subprocess
import sys
from datetime import datetime

STEPS = (
    ("sbatch_returned", "sbatch returned (submitter's log)"),
    ("slurm_submit", "Slurm SubmitTime (1 s resolution)"),
    ("slurm_start", "Slurm StartTime (1 s resolution)"),
    ("script_proc", "job script process created"),
    ("nanny_proc", "python (nanny) exec'd"),
    ("nanny_started", "imports done: 'Start Nanny at'"),
    ("worker_proc", "worker process created"),
    ("worker_started", "'Start worker at'"),
    ("registered", "'Registered to' (worker side)"),
    ("scheduler_added", "scheduler's add-worker event"),
)

_LOG_TIME = re.compile(r"(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[.,]\d+)")
_GATEWAY_SUBMIT = re.compile(r"(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[.,]\d+).*?Job (\d+) submitted for worker")


def _stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace(",", ".").replace(" ", "T")).timestamp()


def _probe():
    """Runs on each worker (``client.run``): its processes, Slurm job id and its job's log lines."""
    import os

    import psutil

    me = psutil.Process()
    nanny = me.parent()
    script = nanny.parent() if nanny is not None else None
    out = {
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "worker_proc": me.create_time(),
        "nanny_proc": nanny.create_time() if nanny else None,
        "script_proc": script.create_time() if script else None,
        "script_name": script.name() if script else None,
        "log": "",
    }
    try:
        path = os.readlink(f"/proc/{nanny.pid}/fd/2")
        with open(path, errors="replace") as f:
            out["log"] = f.read()[-20000:]
    except (OSError, AttributeError):
        pass
    return out


def _first(log: str, needle: str) -> float | None:
    for line in log.splitlines():
        if needle in line:
            m = _LOG_TIME.search(line)
            if m:
                return _stamp(m.group(1))
    return None


def _slurm_times(job_id: str) -> dict:
    res = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    out = {}
    for key, name in (("SubmitTime", "slurm_submit"), ("StartTime", "slurm_start")):
        m = re.search(rf"\b{key}=(\S+)", res.stdout)
        if m and m.group(1) not in ("Unknown", "None"):
            out[name] = datetime.fromisoformat(m.group(1)).timestamp()
    return out


class JobqueueSubmits(logging.Handler):
    """Records when dask-jobqueue's sbatch returned ("Starting job: <id>", wall clock) in this process."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.submitted: dict[str, float] = {}

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Starting job: "):
            self.submitted[msg.split(": ", 1)[1].strip()] = record.created

    def install(self) -> JobqueueSubmits:
        log = logging.getLogger("dask_jobqueue.core")
        log.setLevel(logging.DEBUG)
        log.addHandler(self)
        return self


def gateway_submits(hub_log: str) -> dict[str, float]:
    """Job id -> wall time of the gateway's "Job <id> submitted for worker" line in the hub log."""
    return {m.group(2): _stamp(m.group(1)) for m in _GATEWAY_SUBMIT.finditer(hub_log)}


def collect(client, t_scale: float, submits: dict[str, float]) -> list[dict]:
    """The timeline of each worker of ``client``'s cluster, seconds after ``t_scale`` (wall clock)."""
    import cloudpickle

    # the workers cannot import this module (benchmarks/ is not on their path): send _probe by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    probes = client.run(_probe)
    added = {}
    for stamp, msg in client.get_events("all"):
        if isinstance(msg, dict) and msg.get("action") == "add-worker":
            added[msg.get("worker")] = stamp
    rows = []
    for addr, p in probes.items():
        abs_t = {
            "script_proc": p["script_proc"],
            "nanny_proc": p["nanny_proc"],
            "worker_proc": p["worker_proc"],
            "nanny_started": _first(p["log"], "Start Nanny at"),
            "worker_started": _first(p["log"], "Start worker at"),
            "registered": _first(p["log"], "Registered to"),
            "scheduler_added": added.get(addr),
        }
        if p["job_id"]:
            abs_t.update(_slurm_times(p["job_id"]))
            abs_t["sbatch_returned"] = submits.get(p["job_id"])
        rows.append(
            {k: (None if v is None else round(v - t_scale, 3)) for k, v in abs_t.items()}
            | {"job_id": p["job_id"], "script": p["script_name"]}
        )
    return rows


def medians(runs: list[list[dict]]) -> dict[str, float | None]:
    out = {}
    for key, _ in STEPS:
        vals = [w[key] for run in runs for w in run if w.get(key) is not None]
        out[key] = statistics.median(vals) if vals else None
    return out


def print_timeline(timelines: dict[str, list[list[dict]]]) -> dict:
    """Print the median of each step per side (seconds after scale()); returns the medians."""
    meds = {side: medians(runs) for side, runs in timelines.items()}
    sides = list(meds)
    print("worker start-up timeline: seconds after cluster.scale(), median over workers and runs")
    print(f"{'step':<40}" + "".join(f"{s:>12}" for s in sides))
    for key, label in STEPS:
        cells = "".join(f"{meds[s][key]:>12.2f}" if meds[s][key] is not None else f"{'-':>12}" for s in sides)
        print(f"{label:<40}{cells}")
    print()
    return meds
