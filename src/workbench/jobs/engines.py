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

__all__ = ["Observation", "LocalEngine", "SlurmEngine", "run_as", "Account", "find_process", "local_job_processes"]

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

    async def submit(
        self, job: dict, account: Account, placement: SlurmPlacement, params: dict, env: dict | None = None
    ) -> str:
        """Submit with ``sbatch`` as the user; ``env``: non-secret settings (the gateway's) for the batch script
        (the run's token travels in a 0600 file of its run folder, not here: Slurm shows a job's script and
        environment to root and the user)."""
        run_dir = job["run_dir"]
        made = await asyncio.to_thread(run_as, account, ["mkdir", "-p", "--", run_dir])
        if made.returncode != 0:
            raise RuntimeError(f"cannot create {run_dir} as {account.name}: {made.stderr.decode().strip()}")
        args = sbatch_args(placement, name=job["name"], time_limit=job["time_limit"], run_dir=run_dir)
        command = execute_command(
            str(Path(self.python_bin, "python")), str(Path(account.home, job["notebook"])), run_dir, params
        )
        script = sbatch_script(command, {**(env or {}), "WORKBENCH_JOB_ID": job["id"]})
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


def _process_key(pid: int) -> str:
    """``<pid>@<start time>``: a process named so that a reused pid never matches (psutil's create time)."""
    import psutil

    return f"{pid}@{psutil.Process(pid).create_time():.2f}"


def find_process(engine_id: str | None):
    """The live (not zombie) process an ``<pid>@<start time>`` engine id names, or None."""
    import psutil

    pid, _, created = (engine_id or "").partition("@")
    if not pid.isdigit() or not created:
        return None
    try:
        p = psutil.Process(int(pid))
        if abs(p.create_time() - float(created)) > 0.05 or p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except (psutil.Error, ValueError):
        return None


def local_job_processes(state_dir: str | os.PathLike) -> set[int]:
    """Pids of the embedded engine's running notebook jobs (each job's process and its descendants, e.g. the
    kernel), found from the jobs service's table (written only by the platform: a user cannot add a pid).

    ``workbench up`` leaves these alone when it stops or when the hub crashes, so a job outlives the platform
    (its ``timeout`` ends it at its time limit) and the next ``workbench up`` follows it again.
    """
    import sqlite3

    import psutil

    path = Path(state_dir, "jobs.sqlite")
    if not path.is_file():
        return set()
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            rows = db.execute(
                "SELECT engine_id FROM jobs WHERE engine = 'local' AND state IN ('queued', 'running')"
            ).fetchall()
    except sqlite3.Error:
        return set()
    pids: set[int] = set()
    for (engine_id,) in rows:
        p = find_process(engine_id)
        if p is None:
            continue
        pids.add(p.pid)
        try:
            pids.update(c.pid for c in p.children(recursive=True))
        except psutil.Error:
            pass
    return pids


class LocalEngine:
    """Jobs as local processes of the user's account under the profile's CPU and memory limits (embedded).

    Each job runs in its own session under coreutils' ``timeout`` (its time limit, enforced even while the
    jobs service or the whole platform is down); its engine id is ``<pid>@<start time>``. A restarted service
    follows the jobs its predecessor started (:func:`find_process`); a job that ended while no service
    watched reports the exit status ``execute`` wrote into its run folder (``job.exit``, read as the user),
    and its end is counted from when it was last seen alive onwards no earlier than that file's time.
    """

    name = "local"

    def __init__(self, python_bin: str, poll_every: float = 1.0, accounts=None):
        self.python_bin = python_bin
        self.accounts = accounts  # hub name -> Account, to read job.exit of jobs adopted after a restart
        self.procs: dict[str, subprocess.Popen] = {}
        self.adopted: dict[str, object] = {}  # job id -> psutil.Process of a job a predecessor started
        self.seen: dict[str, float] = {}  # job id -> when this service last saw an adopted job alive
        self.started: dict[str, float] = {}  # job id -> when this service started it
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

    async def submit(self, job: dict, account: Account, profile, params: dict, env: dict | None = None) -> str:
        """Start the job's process as the user; ``env``: non-secret extra settings (the gateway's)."""
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

        extra, env = env, account.env(self.python_bin)
        env.update(extra or {})
        env.update(profile.env)
        env.update(limits.env(self.limiter.mechanism))
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["WORKBENCH_JOB_ID"] = job["id"]
        cmd = execute_command(
            str(Path(self.python_bin, "python")), str(Path(account.home, job["notebook"])), job["run_dir"], params
        )
        proc = subprocess.Popen(
            [*local_timeout(job["time_limit"]), *cmd, "--log"],
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
        try:
            return _process_key(proc.pid)
        except Exception:  # it ended already: poll() reports it from the Popen
            return f"{proc.pid}@0"

    def _adopted(self, job: dict):
        """The live process of a job a predecessor started (its pid and start time still match), or None."""
        import psutil

        p = self.adopted.get(job["id"])
        try:
            if p is not None and p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                return p
        except psutil.Error:
            pass
        p = find_process(job.get("engine_id"))
        if p is None:
            self.adopted.pop(job["id"], None)
        else:
            self.adopted[job["id"]] = p
        return p

    def _pgid(self, job: dict) -> int | None:
        proc = self.procs.get(job["id"])
        if proc is not None:
            return proc.pid if proc.poll() is None else None
        p = self._adopted(job)
        return p.pid if p is not None else None

    def _signal(self, job: dict, sig: int) -> None:
        pgid = self._pgid(job)
        if pgid is not None:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass

    async def cancel(self, job: dict) -> None:
        self.cancelled.add(job["id"])
        self._signal(job, signal.SIGTERM)
        proc = self.procs.get(job["id"]) or self._adopted(job)
        if proc is not None:
            try:
                await asyncio.to_thread(proc.wait, 10)
            except Exception:  # subprocess.TimeoutExpired / psutil.TimeoutExpired
                self._signal(job, signal.SIGKILL)

    def _exit_status(self, job: dict) -> tuple[int | None, float | None]:
        """The exit code and time ``execute`` wrote into the run folder (read as the job's user), or Nones."""
        if self.accounts is None:
            return None, None
        try:
            res = run_as(self.accounts(job["user"]), ["cat", "--", f"{job['run_dir']}/job.exit"], timeout=30)
            if res.returncode != 0:
                return None, None
            code, at = res.stdout.decode().split()[:2]
            return int(code), float(at)
        except (ValueError, IndexError, OSError, subprocess.SubprocessError):
            return None, None

    def _poll_adopted(self, job: dict, now: float) -> Observation:
        jid = job["id"]
        started = job.get("started") or job["submitted"]
        p = self._adopted(job)
        if p is not None:
            self.seen[jid] = now
            if now - started > job["time_limit"] + 60:  # its timeout should have ended it
                self.timed_out.add(jid)
                self._signal(job, signal.SIGKILL)
            return Observation("running", "", started)
        self.adopted.pop(jid, None)
        self.limiter.remove(f"job-{jid}")
        code, at = self._exit_status(job)
        # it ended after it was last seen alive and before now; the user's own file says when (a file the user
        # can write: it is believed only within those bounds)
        last_seen = self.seen.pop(jid, None) or started
        ended = min(max(at or now, last_seen), now)
        state = self._final_state(jid, code)
        if code is None and jid not in self.cancelled:
            reason = "ended while the jobs service was down; no exit status"
            return Observation("timeout" if now - started >= job["time_limit"] else "failed", reason, started, ended)
        return Observation(state, "", started, ended, code)

    def _final_state(self, jid: str, code: int | None) -> str:
        if jid in self.cancelled:
            return "cancelled"
        if jid in self.timed_out or code == TIMEOUT_EXIT:
            return "timeout"
        return "completed" if code == 0 else "failed"

    async def poll(self, jobs: list[dict]) -> dict[str, Observation]:
        out, now = {}, time.time()
        for job in jobs:
            jid = job["id"]
            proc = self.procs.get(jid)
            if proc is None:  # started by the service before a restart: follow it by pid and start time
                out[jid] = await asyncio.to_thread(self._poll_adopted, job, now)
                continue
            started = self.started.get(jid) or job.get("started") or job["submitted"]
            code = proc.poll()
            if code is None and now - started > job["time_limit"] + 60:  # its timeout should have ended it
                self.timed_out.add(jid)
                self._signal(job, signal.SIGKILL)
                code = proc.wait()
            if code is None:
                out[jid] = Observation("running", "", started)
                continue
            self.procs.pop(jid, None)
            self.started.pop(jid, None)
            self.limiter.remove(f"job-{jid}")
            out[jid] = Observation(self._final_state(jid, code), "", started, now, code)
        return out


#: the exit status of coreutils' ``timeout`` when the time limit ended the command
TIMEOUT_EXIT = 124


def local_timeout(seconds: int) -> list[str]:
    """The ``timeout`` prefix of a local job (pure): SIGTERM at the limit, SIGKILL 30 s later."""
    return ["timeout", "--signal=TERM", "--kill-after=30", f"{int(seconds)}s"]
