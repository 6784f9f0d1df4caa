"""Where notebook jobs run: Slurm jobs (``sbatch`` as the user) or local processes (the embedded engine).

Both run :mod:`workbench.jobs.execute` as the user's own Unix account, never as root; the service (root)
only creates the run folder *as the user* and reads results *as the user* (:func:`run_as`), so no path a
user controls is ever opened by root.

An engine's :meth:`poll` returns, per job, an :class:`Observation`: the state (``queued``, ``running``,
``completed``, ``failed``, ``cancelled``, ``timeout``), Slurm's pending reason, and the real start and
end times (Slurm's own ``StartTime``/``EndTime``; for local processes when the service saw them).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from workbench.jobs.model import SlurmPlacement, execute_command, parse_scontrol, sbatch_args, sbatch_script

__all__ = ["Observation", "LocalEngine", "SlurmEngine", "run_as", "Account"]

_FINAL = {
    "COMPLETED": "completed",
    "FAILED": "failed",
    "CANCELLED": "cancelled",
    "TIMEOUT": "timeout",
    "NODE_FAIL": "failed",
    "OUT_OF_MEMORY": "failed",
    "PREEMPTED": "cancelled",
    "BOOT_FAIL": "failed",
    "DEADLINE": "timeout",
}


@dataclass(frozen=True)
class Account:
    """The Unix account a job runs as, and its home (``uid`` None: the service's own user, not root)."""

    name: str
    home: str
    uid: int | None = None

    @classmethod
    def system(cls, name: str) -> Account:
        e = pwd.getpwnam(name)
        return cls(e.pw_name, e.pw_dir, e.pw_uid)

    def preexec(self):
        if self.uid is None:
            return None
        from jupyterhub.spawner import set_user_setuid

        return set_user_setuid(self.name, chdir=False)

    def env(self, python_bin: str) -> dict[str, str]:
        return {
            "HOME": self.home,
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": f"{python_bin}:/usr/local/bin:/usr/bin:/bin",
            "LANG": os.environ.get("LANG", "C.UTF-8"),
        }


def run_as(account: Account, cmd: list[str], stdin: str | None = None, env=None, timeout: float = 60):
    """Run ``cmd`` as ``account`` (setuid before exec), from ``/``; returns the CompletedProcess (bytes)."""
    return subprocess.run(
        cmd,
        input=stdin.encode() if stdin is not None else None,
        capture_output=True,
        env=env if env is not None else account.env("/usr/bin"),
        cwd="/",
        preexec_fn=account.preexec(),
        timeout=timeout,
    )


@dataclass(frozen=True)
class Observation:
    state: str
    reason: str = ""
    started: float | None = None
    ended: float | None = None
    exit_code: int | None = None


def _slurm_time(value: str | None) -> float | None:
    if not value or value in ("Unknown", "None", "N/A"):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()  # Slurm writes local time
    except ValueError:
        return None


class SlurmEngine:
    """Jobs as Slurm batch jobs of the user's account, with the profile's CPUs, memory, GPUs (GRES) and time."""

    name = "slurm"

    def __init__(self, slurm_conf: str, python_bin: str, gpu_partition: str = ""):
        self.slurm_conf = slurm_conf
        self.python_bin = python_bin
        self.gpu_partition = gpu_partition

    def _env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(base if base is not None else {"PATH": "/usr/local/bin:/usr/bin:/bin"})
        env["SLURM_CONF"] = self.slurm_conf
        return env

    async def submit(self, job: dict, account: Account, placement: SlurmPlacement, params: dict) -> str:
        run_dir = job["run_dir"]
        made = await asyncio.to_thread(run_as, account, ["mkdir", "-p", "--", run_dir])
        if made.returncode != 0:
            raise RuntimeError(f"cannot create {run_dir} as {account.name}: {made.stderr.decode().strip()}")
        args = sbatch_args(placement, name=job["name"], time_limit=job["time_limit"], run_dir=run_dir)
        command = execute_command(
            str(Path(self.python_bin, "python")), str(Path(account.home, job["notebook"])), run_dir, params
        )
        script = sbatch_script(command, {"WORKBENCH_JOB_ID": job["id"]})
        res = await asyncio.to_thread(
            run_as, account, ["sbatch", *args], script, self._env(account.env(self.python_bin))
        )
        if res.returncode != 0:
            raise RuntimeError(f"sbatch refused the job: {res.stderr.decode().strip()}")
        return res.stdout.decode().strip().split(";")[0]

    async def cancel(self, job: dict) -> None:
        if job.get("engine_id"):
            await asyncio.to_thread(
                subprocess.run, ["scancel", job["engine_id"]], capture_output=True, env=self._env(), timeout=30
            )

    async def poll(self, jobs: list[dict]) -> dict[str, Observation]:
        """Observations of ``jobs`` from one ``scontrol show job -o`` (a job Slurm has forgotten: ended)."""
        if not jobs:
            return {}
        res = await asyncio.to_thread(
            subprocess.run,
            ["scontrol", "show", "job", "-o"],
            capture_output=True,
            text=True,
            env=self._env(),
            timeout=30,
        )
        if res.returncode != 0 and "No jobs" not in (res.stdout + res.stderr):
            raise RuntimeError(f"scontrol show job failed: {res.stderr.strip()}")
        known = {}
        for line in res.stdout.splitlines():
            d = parse_scontrol(line)
            if d.get("JobId"):
                known[d["JobId"]] = d
        out = {}
        for job in jobs:
            d = known.get(job.get("engine_id") or "")
            if d is None:  # purged after MinJobAge: ended when last seen
                out[job["id"]] = Observation("failed" if job["state"] == "queued" else "completed", "gone from Slurm")
                continue
            state = d.get("JobState", "")
            started, ended = _slurm_time(d.get("StartTime")), _slurm_time(d.get("EndTime"))
            code = d.get("ExitCode", "0:0").split(":")[0]
            if state == "PENDING":
                out[job["id"]] = Observation("queued", d.get("Reason", ""))
            elif state in ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED"):
                out[job["id"]] = Observation("running", "", started)
            else:
                final = _FINAL.get(state, "failed")
                out[job["id"]] = Observation(
                    final, d.get("Reason", ""), started, ended, int(code) if code.isdigit() else None
                )
        return out


class LocalEngine:
    """Jobs as local processes of the user's account under the profile's CPU and memory limits (embedded)."""

    name = "local"

    def __init__(self, python_bin: str, poll_every: float = 1.0):
        self.python_bin = python_bin
        self.procs: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}
        self.cancelled: set[str] = set()
        self.timed_out: set[str] = set()
        self._limiter = None

    @property
    def limiter(self):
        if self._limiter is None:
            from workbench.limits import Limiter, detect_cgroups, own_cgroups

            mode = detect_cgroups()
            self._limiter = Limiter(mode, own=own_cgroups(Path("/proc/self/cgroup").read_text()) if mode else {})
        return self._limiter

    async def submit(self, job: dict, account: Account, profile, params: dict) -> str:
        from workbench.limits import Limiter, local_limits

        limits = local_limits(profile)
        key = f"job-{job['id']}"
        dirs = self.limiter.prepare(key, limits) if account.uid is not None else []
        join = Limiter.preexec(dirs, limits)
        setuid = account.preexec()

        def preexec():
            join()
            if setuid is not None:
                setuid()

        env = account.env(self.python_bin)
        env.update(profile.env)
        env.update(limits.env(self.limiter.mechanism))
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["WORKBENCH_JOB_ID"] = job["id"]
        cmd = execute_command(
            str(Path(self.python_bin, "python")), str(Path(account.home, job["notebook"])), job["run_dir"], params
        )
        proc = subprocess.Popen(
            [*cmd, "--log"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd="/",
            preexec_fn=preexec,
            start_new_session=True,
        )
        self.procs[job["id"]] = proc
        self.started[job["id"]] = time.time()
        return str(proc.pid)

    def _signal(self, job_id: str, sig: int) -> None:
        proc = self.procs.get(job_id)
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass

    async def cancel(self, job: dict) -> None:
        self.cancelled.add(job["id"])
        self._signal(job["id"], signal.SIGTERM)
        proc = self.procs.get(job["id"])
        if proc is not None:
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                self._signal(job["id"], signal.SIGKILL)

    async def poll(self, jobs: list[dict]) -> dict[str, Observation]:
        out, now = {}, time.time()
        for job in jobs:
            jid = job["id"]
            proc = self.procs.get(jid)
            if proc is None:  # the service restarted: the process is not ours any more
                out[jid] = Observation("failed", "lost when the jobs service restarted", None, now)
                continue
            started = self.started[jid]
            code = proc.poll()
            if code is None and now - started > job["time_limit"]:
                self.timed_out.add(jid)
                self._signal(jid, signal.SIGKILL)
                code = proc.wait()
            if code is None:
                out[jid] = Observation("running", "", started)
                continue
            self.procs.pop(jid, None)
            self.limiter.remove(f"job-{jid}")
            state = (
                "cancelled"
                if jid in self.cancelled
                else "timeout"
                if jid in self.timed_out
                else "completed"
                if code == 0
                else "failed"
            )
            out[jid] = Observation(state, "", started, now, code)
        return out
