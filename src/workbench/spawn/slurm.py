"""Supercomputer mode: each notebook server is a Slurm job of the user's own account (``workbench up --spawner slurm``).

:class:`WorkbenchSlurmSpawner` is batchspawner's ``SlurmSpawner`` (jupyterhub/batchspawner 1.3, which works
with JupyterHub 6.1: job submission through ``sudo -u``, the ``batchspawner-singleuser`` wrapper that
reports the server's port to the hub's ``/hub/api/batchspawner``, job id in the spawner state) plus
what the policy and the other engines guarantee:

- only entitled profiles start (403 otherwise, :func:`workbench.spawn.common.choose_profile`);
- the job's sbatch options come from the policy (:func:`workbench.spawn.slurm_jobs.server_job`:
  partition, account, QoS, constraint, ``--time`` = the session limit, cores, memory, GRES);
- budgets and caps are admitted by the quota service before ``sbatch`` (refused: 403; service down:
  503; nothing is submitted); the usage row is re-opened at the job's real ``StartTime`` once it runs
  and closed at its ``EndTime`` from ``scontrol show job``, so queue time is not charged and a job
  that Slurm ends early is charged only what it ran;
- while the job waits, the spawn page shows its id, state and Slurm's reason (:meth:`progress`); a
  pending job that is abandoned or outlives ``start_timeout`` is cancelled (``scancel``);
- after a hub restart the job is found again from the hub's state (job id) and Slurm's; a job that
  ended meanwhile is recorded as stopped;
- GPU jobs run :mod:`workbench.services.sessions.report` next to the server, which reports the GPUs'
  utilisation to the sessions service, so GPU-idle culling works for servers on compute nodes;
- the user's Dask clusters stop with the server, and servers get their group folders (same paths
  as the other engines) and course material.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import shlex
import sys
import time
from datetime import UTC, datetime

from batchspawner import JobStatus, SlurmSpawner
from batchspawner.api import BatchSpawnerAPIHandler
from jupyterhub import apihandlers
from tornado import web
from traitlets import Bool, Dict, Float, List, Unicode, default

from workbench.courses.material import prepare_courses
from workbench.services.quota.client import QuotaUnavailable
from workbench.spawn.common import (
    PolicySpawnerMixin,
    QuotaAdmissionMixin,
    StopsDaskClustersMixin,
    choose_profile,
    dask_environment,
    options_form_html,
)
from workbench.spawn.slurm_jobs import JobInfo, ServerJob, parse_scontrol, server_job
from workbench.spawn.starters import install_starters
from workbench.sysusers import (
    ensure_folder,
    ensure_group_membership,
    ensure_system_user,
    unix_group_name,
)

__all__ = ["BATCH_SCRIPT", "PortReportHandler", "WorkbenchSlurmSpawner", "port_report", "slurm_spawner_settings"]

#: the job script (jinja2, rendered by batchspawner): options from the policy, the server as the job's only process
BATCH_SCRIPT = """#!/bin/bash
#SBATCH --job-name={{job_name}}
#SBATCH --output={{homedir}}/.workbench-server.log
#SBATCH --chdir={{homedir}}
#SBATCH --export={{keepvars}}
{% for option in sbatch_options %}#SBATCH {{option}}
{% endfor %}
export PATH={{path}}
{% if gres %}{{gpu_reporter}} &  # the GPUs' utilisation, for GPU-idle culling (workbench.services.sessions.report)
{% else %}export CUDA_VISIBLE_DEVICES=  # no GPU profile: no device, even on a GPU node
{% endif %}exec {{cmd}}
"""


def port_report(data) -> int:
    """The port a server's ``batchspawner-singleuser`` reports, or ValueError (pure).

    Upstream's handler sets *any* attribute the body names on the caller's spawner, and the caller is the
    server, i.e. the user (its token is in the user's environment): ``{"batch_submit_cmd": ...}`` would make
    the hub run the user's command as root at the next start. Only ``port`` is accepted here.
    """
    if not isinstance(data, dict) or set(data) != {"port"}:
        raise ValueError("only {'port': <1-65535>} may be reported")
    port = data["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be an integer 1-65535, got {port!r}")
    return port


class PortReportHandler(BatchSpawnerAPIHandler):
    """``POST /hub/api/batchspawner``: the server's port, and nothing else (see :func:`port_report`)."""

    @web.authenticated
    def post(self):
        token = self.get_auth_token()
        spawner = next((s for s in self.current_user.spawners.values() if s.api_token == token), None)
        if spawner is None:
            raise web.HTTPError(403, "only a server's own token may report its port")
        try:
            spawner.port = port_report(self.get_json_body())
        except ValueError as e:
            raise web.HTTPError(400, str(e)) from None
        self.set_status(201)
        self.finish({"message": "port recorded"})


# replace upstream's handler (registered when batchspawner is imported) before the hub builds its routes
apihandlers.default_handlers[:] = [
    (route, PortReportHandler if handler is BatchSpawnerAPIHandler else handler)
    for route, handler in apihandlers.default_handlers
]


#: stop events waiting for the quota service (kept referenced until delivered)
_pending_stops: set[asyncio.Future] = set()


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


class WorkbenchSlurmSpawner(PolicySpawnerMixin, QuotaAdmissionMixin, StopsDaskClustersMixin, SlurmSpawner):
    """batchspawner's SlurmSpawner driven by the platform policy (see the module's docstring)."""

    system_users = Bool(
        True, help="Jobs run as each user's own Unix account (needs root; the only supported mode)."
    ).tag(config=True)
    dask_env = Dict(help="Gateway address settings added to every server's environment.").tag(config=True)
    slurm_conf = Unicode("", help="slurm.conf for scontrol (SLURM_CONF); empty: Slurm's default.").tag(config=True)
    scontrol_command = Unicode("scontrol", help="scontrol, to read a job's state, reason and times.").tag(config=True)

    batch_script = Unicode(BATCH_SCRIPT).tag(config=True)
    batch_submit_cmd = Unicode("sbatch --parsable").tag(config=True)
    batch_cancel_cmd = Unicode("scancel {{job_id}}").tag(config=True)
    exec_prefix = Unicode("sudo -E -u {{username}}").tag(config=True)
    req_srun = Unicode("").tag(config=True)
    startup_poll_interval = Float(1.0, help="Seconds between job state checks while it starts.").tag(config=True)
    queue_margin = Float(
        5.0,
        help="A job still pending this many seconds before start_timeout is cancelled with Slurm's reason.",
    ).tag(config=True)
    gpu_reporter_cmd = List(
        Unicode(),
        help="What a GPU job runs next to its server to report the GPUs' utilisation for GPU-idle culling "
        "(the sessions service cannot read a compute node's GPUs); --every=<seconds> is appended.",
    ).tag(config=True)

    @default("gpu_reporter_cmd")
    def _default_gpu_reporter_cmd(self):
        return [sys.executable, "-m", "workbench.services.sessions.report"]

    stop_delivery_timeout = Float(
        900.0, help="How long the end of a job that the quota service could not take is retried (seconds)."
    ).tag(config=True)

    profile_name: str = ""
    job_info: JobInfo | None = None
    _queue_deadline: float | None = None  # while starting: when a job still pending is given up (monotonic)
    admitted_at: datetime | None = None
    job_started: bool = False

    # -- who and what ------------------------------------------------------------

    @property
    def home(self) -> str:
        return pwd.getpwnam(self.system_user).pw_dir

    @default("req_username")
    def _default_req_username(self):
        return self.system_user

    @default("req_homedir")
    def _default_req_homedir(self):
        return self.home

    @property
    def job(self) -> ServerJob:
        return server_job(self.policy, self.user_groups, self.profile_name)

    # -- form --------------------------------------------------------------------

    def _options_form(self, spawner=None):
        return (
            options_form_html(self.policy, self.user_groups)
            if len(self.policy.profiles_for(self.user_groups)) > 1
            else ""
        )

    @default("options_form")
    def _default_options_form(self):
        return self._options_form

    def options_from_form(self, formdata):
        profile = (formdata.get("profile") or [""])[0]
        choose_profile(self.policy, self.user_groups, profile or None)
        return {"profile": profile} if profile else {}

    # -- environment and script ------------------------------------------------------

    def user_env(self, env):
        entry = pwd.getpwnam(self.system_user)
        env.update(USER=entry.pw_name, HOME=entry.pw_dir, SHELL="/bin/bash")
        return env

    def get_env(self):
        env = super().get_env()
        if self.dask_env:
            env.update(dask_environment(self.policy, self.user_groups, **self.dask_env))
        if self.profile_name:
            profile = self.policy.profiles[self.profile_name]
            env.update(profile.env)
            env["WORKBENCH_PROFILE"] = self.profile_name
            if not profile.gpu:
                env["CUDA_VISIBLE_DEVICES"] = ""  # GPU profiles: Slurm sets it from the GRES it grants
        return env

    def get_req_subvars(self):
        subvars = super().get_req_subvars()
        subvars["keepvars"] = ",".join(sorted(self.get_env()))  # computed per start (the trait caches its first value)
        subvars["sbatch_options"] = self.job.sbatch_args()
        subvars["gres"] = self.job.gres or ""
        subvars["job_name"] = f"jupyter-{self.system_user}"
        subvars["path"] = self.get_env().get("PATH", "/usr/local/bin:/usr/bin:/bin")
        every = min(float(self.policy.culling.every), 20.0)
        subvars["gpu_reporter"] = " ".join(shlex.quote(a) for a in [*self.gpu_reporter_cmd, f"--every={every:g}"])
        return subvars

    # -- Slurm's view of the job -------------------------------------------------------

    async def read_job(self, job_id: str) -> JobInfo | None:
        """The job as ``scontrol show job`` shows it; None when Slurm no longer knows it; raises RuntimeError when
        Slurm does not answer."""
        env = {**os.environ, **({"SLURM_CONF": self.slurm_conf} if self.slurm_conf else {})}
        proc = await asyncio.create_subprocess_exec(
            self.scontrol_command,
            "show",
            "job",
            "-o",
            job_id,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip()
            if "Invalid job id" in text:
                return None
            raise RuntimeError(text or f"scontrol exited with {proc.returncode}")
        return parse_scontrol(out.decode(errors="replace"))

    async def query_job_status(self):
        if not self.job_id:
            self.job_status = ""
            return JobStatus.NOTFOUND
        try:
            info = await self.read_job(self.job_id)
        except RuntimeError as e:
            self.log.warning("Slurm does not answer about job %s: %s", self.job_id, e)
            return JobStatus.UNKNOWN
        self.job_info = info
        if info is None:
            self.job_status = ""
            return JobStatus.NOTFOUND
        self.job_status = f"{info.state} {info.host}"
        if info.running:
            if not self.job_started:
                await self._record_job_start(info)
            return JobStatus.RUNNING
        if info.pending:
            if self._queue_deadline is not None and time.monotonic() > self._queue_deadline:
                raise web.HTTPError(
                    503,
                    f"{info.describe()}: still waiting in Slurm's queue after {self.start_timeout} s (the start "
                    "timeout), so it was cancelled and nothing was charged; try again later or pick another profile",
                )
            return JobStatus.PENDING
        return JobStatus.NOTFOUND  # ended (COMPLETED, CANCELLED, TIMEOUT, FAILED, ...)

    def state_gethost(self):
        return self.job_info.host if self.job_info else ""

    async def progress(self):
        """Honest progress while the job waits: its id, its state and Slurm's reason, each time they change."""
        last = None
        while True:
            info = self.job_info
            if not self.job_id:
                event = {"progress": 10, "message": "Submitting your server's job to Slurm"}
            elif info is None or info.job_id != self.job_id:
                event = {"progress": 20, "message": f"Slurm job {self.job_id}: submitted"}
            elif info.running:
                event = {"progress": 60, "message": f"{info.describe()}; waiting for JupyterLab to answer"}
            else:
                event = {"progress": 30, "message": info.describe()}
            if event["message"] != last:
                last = event["message"]
                yield event
            if info is not None and info.running and info.job_id == self.job_id:
                return
            await asyncio.sleep(self.startup_poll_interval)

    # -- state ---------------------------------------------------------------------------

    def get_state(self):
        state = super().get_state()
        if self.profile_name:
            state["profile"] = self.profile_name
        if self.admitted_at:
            state["admitted_at"] = _iso(self.admitted_at)
        if self.job_started:
            state["job_started"] = True
        return state

    def load_state(self, state):
        super().load_state(state)
        self.profile_name = state.get("profile", "")
        at = state.get("admitted_at")
        self.admitted_at = datetime.fromisoformat(at.replace("Z", "+00:00")) if at else None
        self.job_started = bool(state.get("job_started"))

    def clear_state(self):
        super().clear_state()
        self.admitted_at = None
        self.job_started = False

    # -- accounting ----------------------------------------------------------------------

    async def _send_events(self, events: list[dict]) -> list[dict] | None:
        """The quota service's results for ``events``; None (logged) when it does not answer."""
        try:
            return await self.quota.events(events)
        except QuotaUnavailable as e:
            self.log.warning("Could not record %s (the quota service's reconcile will): %s", self.quota_item, e)
            return None

    async def _record_job_start(self, info: JobInfo) -> None:
        """Charge from the job's real start: the admission's row ends unused, a row opens at Slurm's StartTime."""
        self.job_started = True
        if self.quota is None or self.admitted_at is None:
            return
        start = info.start or datetime.now(UTC)
        job = self.job
        await self._send_events(
            [
                {"id": f"slurm-queued:{self.quota_item}:{info.job_id}", "type": "stop", "item": self.quota_item,
                 "time": _iso(self.admitted_at)},
                {"id": f"slurm-start:{self.quota_item}:{info.job_id}", "type": "start", "item": self.quota_item,
                 "time": _iso(max(start, self.admitted_at)), "kind": "server", "user": self.user.name,
                 "group": job.group, "profile": self.profile_name},
            ]
        )  # fmt: skip
        self.log.info("Slurm job %s of %s runs since %s on %s", info.job_id, self.user.name, _iso(start), info.host)

    async def _record_job_stop(self, job_id: str, info: JobInfo | None, started: bool, admitted_at) -> None:
        """Close the usage row at Slurm's EndTime (a job that never ran: at its admission, so nothing is charged)."""
        if self.quota is None:
            return
        if started:
            end = info.end if info is not None and info.ended and info.end else datetime.now(UTC)
        else:
            end = admitted_at or datetime.now(UTC)
        stop = {"id": f"slurm-stop:{self.quota_item}:{job_id or _iso(end)}", "type": "stop", "item": self.quota_item,
                "time": _iso(end)}  # fmt: skip
        resume = None
        if started and job_id and info is not None and info.start:
            job = self.job
            resume = {"id": f"slurm-resume:{self.quota_item}:{job_id}", "type": "start", "item": self.quota_item,
                      "time": _iso(info.start), "kind": "server", "user": self.user.name, "group": job.group,
                      "profile": self.profile_name}  # fmt: skip
        if not await self._deliver_stop(stop, resume):
            # the hub checks its servers before it starts its services: after a restart, a job that ended while
            # the hub was down is polled before the quota service answers. Deliver it when it does.
            task = asyncio.ensure_future(self._deliver_stop_later(stop, resume))
            _pending_stops.add(task)
            task.add_done_callback(_pending_stops.discard)
            return
        self.log.info("Usage of %s's job %s recorded until %s", self.user.name, job_id or "(none)", _iso(end))

    async def _deliver_stop(self, stop: dict, resume: dict | None) -> bool:
        """Send ``stop``; False when the quota service does not answer.

        When the row was closed already (``not-open``: the quota service's reconcile closed it at the last time
        it knew the server alive, e.g. when the hub was down as the job ended), the job's remaining run is
        recorded as its own row: ``resume`` (a start at Slurm's StartTime, which the ledger moves to the end of
        the item's last row, so nothing counts twice) and ``stop`` again at Slurm's EndTime.
        """
        results = await self._send_events([stop])
        if results is None:
            return False
        if resume is not None and results and results[0].get("status") == "not-open":
            again = {**stop, "id": stop["id"].replace("slurm-stop:", "slurm-end:", 1)}
            if await self._send_events([resume, again]) is None:
                return False
            self.log.info("Usage of %s until Slurm's EndTime %s recorded after the reconcile", self.user.name,
                          stop["time"])  # fmt: skip
        return True

    async def _deliver_stop_later(self, stop: dict, resume: dict | None) -> None:
        delay, deadline = 1.0, asyncio.get_running_loop().time() + self.stop_delivery_timeout
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(delay)
            if await self._deliver_stop(stop, resume):
                self.log.info("Usage of %s recorded until %s (delivered late)", self.user.name, stop["time"])
                return
            delay = min(delay * 2, 15.0)
        self.log.error("Could not record the end of %s at %s: the quota service never answered", self.quota_item,
                       stop["time"])  # fmt: skip

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self):
        self.profile_name = choose_profile(self.policy, self.user_groups, self.user_options.get("profile"))
        if not self.system_users:
            raise web.HTTPError(500, "The Slurm spawner runs servers as each user's own account: run the hub as root")
        self.job_info = None
        self.job_started = False
        self.admitted_at = None
        entry = ensure_system_user(self.system_user, comment=f"Workbench user {self.user.name}")
        if self.quota is not None:
            self.admitted_at = datetime.now(UTC)
            await self._admit()
        try:
            install_starters(entry.pw_dir, self.policy.kinds_of(self.user_groups), entry.pw_uid, entry.pw_gid)
            self._prepare_shared_folders()
            await prepare_courses(self)
            self.log.info("Submitting %s's server as a Slurm job: %s", self.user.name, " ".join(self.job.sbatch_args()))
            # a job still queued shortly before the hub's start_timeout will not make it: give up with Slurm's
            # reason (the hub's own timeout would only say "timeout")
            self._queue_deadline = time.monotonic() + max(1.0, self.start_timeout - self.queue_margin)
            return await super().start()
        except BaseException:
            await self._abandon()
            raise
        finally:
            self._queue_deadline = None

    async def _abandon(self) -> None:
        """A start that failed, timed out or was abandoned: cancel the job, charge only what it ran."""
        job_id, started, admitted = self.job_id, self.job_started, self.admitted_at
        info = None
        try:
            if job_id:
                await self.cancel_batch_job()
                info = await self.read_job(job_id)
        except Exception as e:  # never hide the start's own error
            self.log.warning("Could not cancel Slurm job %s of %s: %s", job_id, self.user.name, e)
        await self._record_job_stop(job_id, info, started, admitted)

    async def poll(self):
        job_id, started, admitted = self.job_id, self.job_started, self.admitted_at
        status = await super().poll()  # clears the state when the job is gone
        if status is not None and job_id:
            await self._record_job_stop(job_id, self.job_info, started, admitted)
        return status

    async def stop(self, now=False):
        job_id, started, admitted = self.job_id, self.job_started, self.admitted_at
        if not job_id:  # no job (its end was recorded when poll found it gone): only the clusters to stop
            if self._owns_dask_clusters():
                await self._stop_dask_clusters()
            return
        try:
            await super().stop(now=now)
        finally:
            info = None
            if job_id:
                try:
                    info = await self.read_job(job_id)
                except RuntimeError as e:
                    self.log.warning("Slurm does not answer about job %s: %s", job_id, e)
            await self._record_job_stop(job_id, info, started, admitted)
            if self._owns_dask_clusters():
                await self._stop_dask_clusters()

    def _prepare_shared_folders(self) -> None:
        """Group folders (members only, setgid) and the read-only datasets folder, at the paths of the other
        engines (on a real cluster: on the file system the nodes share)."""
        storage = self.policy.storage
        for group in self.policy.groups_of(self.user_groups):
            unix_group = unix_group_name(group)
            ensure_group_membership(self.system_user, unix_group)
            ensure_folder(storage.shared.format(group=group), 0o2770, grp.getgrnam(unix_group).gr_gid)
        ensure_folder(storage.datasets, 0o755)


def slurm_spawner_settings(local: dict, venv_bin: str, slurm_conf: str) -> dict:
    """The ``WorkbenchSlurmSpawner`` section from the embedded hub's local spawner section (pure)."""
    keep = ("policy_path", "user_prefix", "gateway_api_url", "dask_env", "env_keep", "environment",
            "quota_api_url", "quota_api_token")  # fmt: skip
    out = {k: v for k, v in local.items() if k in keep}
    out.update(
        batchspawner_singleuser_cmd=os.path.join(venv_bin, "batchspawner-singleuser"),
        slurm_conf=slurm_conf,
        start_timeout=300,  # a job may wait in the queue; it is cancelled after this
    )
    return out
