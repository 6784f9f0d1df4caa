"""The hub service ``jobs`` (``/services/jobs``): notebooks run as batch jobs that survive logout, charged to budgets.

It runs as root (the embedded workbench as root), so it can start each job as its user's own account; the
REST API takes the caller's hub token (HubAuth, ``access:services!service=jobs``):

- ``POST api/jobs`` ``{"notebook", "profile", "parameters", "time", "name"}`` — checked (profile the caller is
  entitled to, time within the group's limit, parameters), admitted by the quota service (item
  ``job-admit:<user>/<id>``, kind ``job``: budgets and caps) *before* it is submitted, then submitted to the
  engine (Slurm, or a local process). ``"course": C`` (instructors of C and admins) submits one job per student
  of course C, each run as the student in the student's home, charged to C.
- ``GET api/jobs`` — the caller's jobs (and those they submitted for students; admins: all): state, Slurm's
  pending reason, duration, GPU- and CPU-hours; ``GET/DELETE api/jobs/<id>`` one job / cancel it;
  ``POST api/jobs/<id>/rerun``; ``GET api/jobs/<id>/log`` and ``.../output`` (the executed notebook).
- ``GET api/profiles`` — the profiles the caller may run jobs with, each with its time limits (JupyterLab's form).
- ``GET/POST api/definitions``, ``GET/PATCH/DELETE api/definitions/<id>``, ``POST api/definitions/<id>/jobs`` —
  scheduled jobs (a job request plus a cron ``schedule``; a bad one is a 422 naming the field), run when due by
  :func:`workbench.jobs.schedules.run_due`, admitted and charged like any job.

Results land in the user's home, ``~/jobs/<name>/<run>``. The run is charged for its real run time (Slurm's
``StartTime``..``EndTime``; a local process's start and exit) as the ledger item ``job:<user>/<id>``; jobs of
spent budgets are cancelled when the quota service's enforcement plan says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from tornado import web

from workbench.jobs import runend, schedules
from workbench.jobs.engines import Account, LocalEngine, SlurmEngine, run_as
from workbench.jobs.model import (
    JobError,
    SlurmPlacement,
    check_notebook_path,
    check_parameters,
    job_name,
    max_job_seconds,
    resolve_time_limit,
    run_id,
)
from workbench.jobs.runend import GatewayAccess, write_token_file
from workbench.jobs.schedules import DefinitionStore, ScheduleError, definition_doc
from workbench.jobs.store import FINAL_STATES, JobStore
from workbench.names import JOBS_ACCESS_SCOPE, JOBS_SERVICE, QUOTA_SERVICE
from workbench.services.base import HubClient, JsonHandler, add_common_args, log_request, service_setup
from workbench.services.quota.client import QuotaClient, QuotaUnavailable
from workbench.services.quota.views import charge_group
from workbench.sysusers import system_username

log = logging.getLogger("workbench.jobs")


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z") if t else None


def job_doc(job: dict, now: float | None = None) -> dict:
    """The API's view of a job row (pure)."""
    now = time.time() if now is None else now
    started, ended = job.get("started"), job.get("ended")
    seconds = ((ended or now) - started) if started else 0.0
    return {
        "id": job["id"],
        "user": job["user"],
        "submitter": job["submitter"],
        "name": job["name"],
        "run": job["run"],
        "folder": f"jobs/{job['name']}/{job['run']}",
        "notebook": job["notebook"],
        "profile": job["profile"],
        "group": job["grp"],
        "parameters": json.loads(job["params"]),
        "engine": job["engine"],
        "engine_id": job["engine_id"],
        "state": job["state"],
        "reason": job["reason"] or "",
        "time_limit": job["time_limit"],
        "submitted": _iso(job["submitted"]),
        "started": _iso(started),
        "ended": _iso(ended),
        "duration_seconds": round(max(seconds, 0.0), 3),
        "gpu_hours": round(max(seconds, 0.0) * job["gpu_count"] / 3600, 6),
        "cpu_hours": round(max(seconds, 0.0) * job["cpu"] / 3600, 6),
        "exit_code": job["exit_code"],
    }


class JobsService:
    def __init__(
        self,
        policy,
        store: JobStore,
        engine,
        hub: HubClient,
        quota: QuotaClient | None,
        accounts,
        definitions=None,
        gateway: GatewayAccess | None = None,
    ):
        self.gateway = gateway  # the runs' Dask Gateway access (workbench.jobs.runend); None: no gateway
        self.definitions: DefinitionStore | None = definitions  # scheduled jobs (workbench.jobs.schedules)
        self.policy = policy
        self.store = store
        self.engine = engine
        self.hub = hub
        self.quota = quota
        self.accounts = accounts  # hub name -> Account
        self.lock = asyncio.Lock()

    # -- submission ---------------------------------------------------------------------

    async def targets(self, caller: dict, body: dict) -> tuple[list[str], str | None]:
        """Whom the job runs as, and the course charged (None: the user's own group)."""
        course = body.get("course")
        if not course:
            return [caller["name"]], None
        g = self.policy.groups.get(course)
        if g is None or g.kind != "course":
            raise web.HTTPError(400, f"course: {course!r} is not a course of the policy")
        if caller["name"] not in g.instructors and not caller.get("admin"):
            raise web.HTTPError(403, f"only instructors of {course} and admins may run jobs for its students")
        model = await self.hub.get(f"/groups/{course}")
        students = [u for u in model.get("users", []) if u not in g.instructors]
        if not students:
            raise web.HTTPError(400, f"course {course} has no students")
        return sorted(students), course

    async def submit(self, caller: dict, body: dict) -> list[dict]:
        if not isinstance(body, dict):
            raise web.HTTPError(400, "the body must be a JSON object with notebook, profile, parameters, time")
        users, course = await self.targets(caller, body)
        jobs = []
        for user in users:
            groups = caller["groups"] if user == caller["name"] else (await self.hub.user_groups(user) or [])
            jobs.append(await self.submit_one(user, caller["name"], groups, body, course))
        return jobs

    def checked(self, user: str, groups: list[str], body: dict, course: str | None = None) -> tuple:
        """A job request's (notebook, params, profile, group, seconds, name), or the HTTP error naming the field."""
        try:
            notebook = check_notebook_path(body.get("notebook"))
            params = check_parameters(body.get("parameters"))
            profile = body.get("profile")
            allowed = self.policy.groups[course].profiles if course else self.policy.profiles_for(groups)
            if not profile or profile not in allowed:
                raise web.HTTPError(
                    403,
                    f"profile: {profile!r} is not one {user} may use; choose one of: {', '.join(allowed) or 'none'}",
                )
            group = course or charge_group(self.policy, groups, profile)
            seconds = resolve_time_limit(body.get("time"), self.policy, group, profile)
            name = job_name(body.get("name"), notebook)
        except JobError as e:
            raise web.HTTPError(400, str(e)) from None
        return notebook, params, profile, group, seconds, name

    async def submit_one(self, user: str, submitter: str, groups: list[str], body: dict, course: str | None) -> dict:
        notebook, params, profile, group, seconds, name = self.checked(user, groups, body, course)
        prof = self.policy.profiles[profile]
        if self.engine.name == "local" and prof.gpu:
            raise web.HTTPError(
                400, f"profile: {profile} has GPUs; GPU jobs need the Slurm engine here, choose a CPU profile"
            )
        account = self.accounts(user)
        job_id = uuid.uuid4().hex[:12]
        now = time.time()
        run = run_id(datetime.fromtimestamp(now), job_id)
        job = {
            "id": job_id,
            "user": user,
            "submitter": submitter,
            "grp": group,
            "profile": profile,
            "notebook": notebook,
            "name": name,
            "run": run,
            "run_dir": str(Path(account.home, "jobs", name, run)),
            "params": json.dumps(params),
            "time_limit": seconds,
            "engine": self.engine.name,
            "state": "queued",
            "submitted": now,
            "cpu": prof.cpu,
            "gpu_type": prof.gpu.type if prof.gpu else None,
            "gpu_count": prof.gpu.count if prof.gpu else 0,
        }
        await self.admit(job)
        env, extra, takes = {}, {}, getattr(self.engine, "takes_token", False)  # Kubernetes: a per-run Secret
        try:
            if self.gateway is not None and self.policy.dask_group_for(groups):  # the run's gateway token
                env, token = await self.gateway.grant(job, groups)
                extra = {"token": token} if takes else await asyncio.to_thread(write_token_file, account, job, token)
            if self.engine.name == "slurm":
                gpu_part = getattr(self.engine, "gpu_partition", "")
                placement = SlurmPlacement.of(self.policy, group, profile, gpu_part)
                job["engine_id"] = await self.engine.submit(job, account, placement, params, env=env)
            else:
                job["engine_id"] = await self.engine.submit(job, account, prof, params, env=env, **extra)
        except Exception as e:
            log.warning("submitting %s's job %s failed: %s", user, job_id, e)
            if job.get("gateway_token"):
                await self.gateway.delete_token(user, job["gateway_token"])
            raise web.HTTPError(500, f"the job could not be submitted: {e}") from None
        self.store.add(job)
        log.info(
            "job %s of %s (%s, %s, %ss) submitted: %s %s",
            job_id,
            user,
            profile,
            group,
            seconds,
            self.engine.name,
            job["engine_id"],
        )
        return job_doc(self.store.get(job_id))

    async def admit(self, job: dict) -> None:
        """Budgets and caps before anything is submitted; the admission row is closed at once (the run is
        charged from its real start)."""
        if self.quota is None:
            return
        item = f"job-admit:{job['user']}/{job['id']}"
        try:
            decision = await self.quota.admit(
                item=item, kind="job", user=job["user"], group=job["grp"], profile=job["profile"]
            )
        except QuotaUnavailable as e:
            log.error("refusing %s's job: %s", job["user"], e)
            raise web.HTTPError(
                503, "The quota service does not answer, so no job can start now; try again in a minute."
            ) from None
        if not decision.allowed:
            raise web.HTTPError(403, decision.message)
        await self.quota.stop(item)

    async def submit_definition(self, d: dict) -> dict:
        """One run of a job definition (:mod:`workbench.jobs.schedules`), as its user, checked and admitted
        like any job (the user's groups are asked again: entitlements are those of the run's time)."""
        groups = await self.hub.user_groups(d["user"]) or []
        return await self.submit_one(d["user"], d["user"], groups, json.loads(d["request"]), None)

    # -- following the jobs ----------------------------------------------------------------

    async def tick(self) -> None:
        async with self.lock:
            active = self.store.active(self.engine.name)
            for jid, obs in (await self.engine.poll(active)).items():
                job = self.store.get(jid)
                values = {"state": obs.state, "reason": obs.reason}
                if obs.started and not job["started"]:
                    values["started"] = obs.started
                if obs.state in FINAL_STATES:
                    start = values.get("started") or job["started"]
                    values["ended"] = max(obs.ended or time.time(), start or 0) if start else None
                    values["exit_code"] = obs.exit_code
                if job["reason"] and job["reason"].startswith("budget"):  # kept while the cancel takes effect
                    values["reason"] = job["reason"]
                if (job["state"], job["reason"]) != (values["state"], values["reason"]):
                    log.info("job %s of %s: %s %s", jid, job["user"], values["state"], values["reason"])
                self.store.update(jid, **values)
            await self.charge()
            if self.gateway is not None:  # any end: stop the run's clusters, delete its token
                await runend.end_gateway_access(self.store, self.gateway)

    async def charge(self) -> None:
        """Start and stop events of the runs in the quota ledger (:func:`workbench.jobs.runend.charge`)."""
        await runend.charge(self.store, self.quota)

    async def enforce(self) -> None:
        """Cancel running jobs whose budget is spent (:func:`workbench.jobs.runend.enforce`)."""
        await runend.enforce(self.store, self.quota, self.engine)

    async def cancel(self, job: dict) -> dict:
        if job["state"] not in FINAL_STATES:
            await self.engine.cancel(job)
            await self.tick()
        return job_doc(self.store.get(job["id"]))

    def read_result(self, job: dict, which: str) -> bytes:
        """The job's log or executed notebook, read as the job's user (root opens nothing the user controls)."""
        account = self.accounts(job["user"])
        path = os.path.join(job["run_dir"], "job.log" if which == "log" else os.path.basename(job["notebook"]))
        res = run_as(account, ["cat", "--", path], timeout=30)
        if res.returncode != 0:
            raise web.HTTPError(404, f"no {which} yet in ~/jobs/{job['name']}/{job['run']}")
        return res.stdout


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------


class BaseHandler(JsonHandler):
    @property
    def svc(self) -> JobsService:
        return self.settings["svc"]

    async def caller(self) -> dict:
        model = await self.token_model(self.settings["hub_auth"], self.svc.hub)
        if model.get("kind", "user") != "user":
            raise web.HTTPError(403, "jobs belong to users: call with a user's token")
        return model

    async def job(self, job_id: str) -> tuple[dict, dict]:
        caller = await self.caller()
        job = self.svc.store.get(job_id)
        if job is None or not (caller.get("admin") or caller["name"] in (job["user"], job["submitter"])):
            raise web.HTTPError(404, f"no job {job_id} of yours")
        return caller, job


class JobsHandler(BaseHandler):
    async def get(self):
        caller = await self.caller()
        await self.svc.tick()
        jobs = self.svc.store.visible_to(caller["name"], bool(caller.get("admin")))
        docs = [job_doc(j) for j in jobs]
        if self.svc.definitions is not None:  # scheduled runs name their definition
            of = self.svc.definitions.definition_of([d["id"] for d in docs])
            for d in docs:
                d["definition"] = of.get(d["id"])
        self.write_json({"jobs": docs})

    async def post(self):
        caller = await self.caller()
        docs = await self.svc.submit(caller, self.body_json())
        self.write_json({"jobs": docs}, 201)


class JobHandler(BaseHandler):
    async def get(self, job_id):
        _, job = await self.job(job_id)
        await self.svc.tick()
        self.write_json(job_doc(self.svc.store.get(job_id)))

    async def delete(self, job_id):
        _, job = await self.job(job_id)
        self.write_json(await self.svc.cancel(job))


class RerunHandler(BaseHandler):
    async def post(self, job_id):
        caller, job = await self.job(job_id)
        body = {
            "notebook": job["notebook"],
            "profile": job["profile"],
            "parameters": json.loads(job["params"]),
            "time": job["time_limit"],
            "name": job["name"],
        }
        course = job["grp"] if job["submitter"] != job["user"] else None
        groups = (
            caller["groups"] if job["user"] == caller["name"] else (await self.svc.hub.user_groups(job["user"]) or [])
        )
        doc = await self.svc.submit_one(job["user"], caller["name"], groups, body, course)
        self.write_json({"jobs": [doc]}, 201)


class ResultHandler(BaseHandler):
    async def get(self, job_id, which):
        _, job = await self.job(job_id)
        data = await asyncio.to_thread(self.svc.read_result, job, which)
        if which == "log":
            self.set_header("Content-Type", "text/plain; charset=utf-8")
        else:
            self.set_header("Content-Type", "application/x-ipynb+json")
            self.set_header("Content-Disposition", f'attachment; filename="{os.path.basename(job["notebook"])}"')
        self.finish(data)


class ProfilesHandler(BaseHandler):
    """``GET api/profiles``: the profiles the caller may run jobs with (the JupyterLab form's environments)."""

    async def get(self):
        caller = await self.caller()
        policy, out = self.svc.policy, []
        for name in policy.profiles_for(caller["groups"]):
            prof = policy.profiles[name]
            if self.svc.engine.name == "local" and prof.gpu:
                continue  # refused at submission on this engine (GPU jobs need Slurm)
            group = charge_group(policy, caller["groups"], name)
            out.append(
                {
                    "name": name,
                    "display_name": prof.display_name or name,
                    "description": prof.description,
                    "group": group,
                    "cpu": prof.cpu,
                    "memory": prof.memory,
                    "gpu": {"type": prof.gpu.type, "count": prof.gpu.count} if prof.gpu else None,
                    "max_seconds": max_job_seconds(policy, group, name),
                    "default_seconds": resolve_time_limit(None, policy, group, name),
                }
            )
        self.write_json({"profiles": out, "engine": self.svc.engine.name})


class DefinitionsBase(BaseHandler):
    @property
    def defs(self) -> DefinitionStore:
        if self.svc.definitions is None:
            raise web.HTTPError(404, "scheduled jobs are not enabled on this jobs service")
        return self.svc.definitions

    async def definition(self, def_id: str) -> tuple[dict, dict]:
        caller = await self.caller()
        d = self.defs.get(def_id)
        if d is None or not (caller.get("admin") or caller["name"] == d["user"]):
            raise web.HTTPError(404, f"no job definition {def_id} of yours")
        return caller, d

    def schedule_of(self, body: dict) -> tuple[str, str]:
        try:
            return schedules.check_schedule(body.get("schedule")), schedules.check_timezone(body.get("timezone"))
        except ScheduleError as e:
            raise web.HTTPError(422, str(e)) from None


class DefinitionsHandler(DefinitionsBase):
    """``GET api/definitions`` (the caller's; admins: all); ``POST``: a job request + ``schedule``, ``timezone``."""

    async def get(self):
        caller = await self.caller()
        rows = self.defs.of_user(caller["name"], bool(caller.get("admin")))
        self.write_json({"definitions": [definition_doc(d, self.defs.jobs_of(d["id"])) for d in rows]})

    async def post(self):
        caller = await self.caller()
        body = self.body_json()
        if not isinstance(body, dict):
            raise web.HTTPError(400, "the body must be a JSON object with notebook, profile, schedule")
        elif body.get("course"):
            raise web.HTTPError(400, "course: scheduled jobs run for their own user; submit course jobs one by one")
        schedule, tz = self.schedule_of(body)
        notebook, params, profile, _group, seconds, name = self.svc.checked(caller["name"], caller["groups"], body)
        request = {"notebook": notebook, "profile": profile, "parameters": params, "time": seconds, "name": name}
        d = self.defs.add(caller["name"], request, schedule, tz)
        log.info("definition %s of %s: %s (%s) runs %s", d["id"], caller["name"], notebook, profile, schedule)
        self.write_json(definition_doc(d), 201)


class DefinitionHandler(DefinitionsBase):
    """``GET``/``PATCH`` (``active``, ``schedule``, ``timezone``)/``DELETE api/definitions/<id>``."""

    async def get(self, def_id):
        _, d = await self.definition(def_id)
        self.write_json(definition_doc(d, self.defs.jobs_of(def_id)))

    async def patch(self, def_id):
        _, d = await self.definition(def_id)
        try:
            values = schedules.definition_changes(d, self.body_json(), time.time())
        except ScheduleError as e:
            raise web.HTTPError(422, str(e)) from None
        except JobError as e:
            raise web.HTTPError(400, str(e)) from None
        self.defs.update(def_id, **values)
        self.write_json(definition_doc(self.defs.get(def_id), self.defs.jobs_of(def_id)))

    async def delete(self, def_id):
        await self.definition(def_id)
        self.defs.delete(def_id)
        self.set_status(204)
        self.finish()


class DefinitionRunHandler(DefinitionsBase):
    """``POST api/definitions/<id>/jobs``: one run now, as a scheduled run would be."""

    async def post(self, def_id):
        await self.definition(def_id)
        doc = await self.svc.submit_definition(self.defs.get(def_id))
        self.defs.link(def_id, doc["id"])
        self.write_json({"jobs": [doc]}, 201)


class HealthHandler(web.RequestHandler):
    def get(self):
        self.finish({"status": "ok"})


def make_app(svc: JobsService, hub_auth, prefix: str) -> web.Application:
    p = prefix.rstrip("/") + "/"
    return web.Application(
        [
            (rf"{p}api/health", HealthHandler),
            (rf"{p}api/jobs", JobsHandler),
            (rf"{p}api/jobs/([0-9a-f]+)", JobHandler),
            (rf"{p}api/jobs/([0-9a-f]+)/rerun", RerunHandler),
            (rf"{p}api/jobs/([0-9a-f]+)/(log|output)", ResultHandler),
            (rf"{p}api/profiles", ProfilesHandler),
            (rf"{p}api/definitions", DefinitionsHandler),
            (rf"{p}api/definitions/([0-9a-f]+)", DefinitionHandler),
            (rf"{p}api/definitions/([0-9a-f]+)/jobs", DefinitionRunHandler),
        ],
        svc=svc,
        hub_auth=hub_auth,
        log_function=log_request,
    )


def main(argv: list[str] | None = None) -> int:
    from jupyterhub.services.auth import HubAuth

    from workbench.gateway.slurm import SLURM_UP_GPU_PARTITION, resolve_slurm_conf, written_by_slurm_up
    from workbench.services.base import every, serve_until_signal

    p = add_common_args(argparse.ArgumentParser(prog="python -m workbench.jobs", description=__doc__.splitlines()[0]))
    p.add_argument(
        "--engine",
        choices=["slurm", "local", "kubernetes"],
        help="default: slurm with --gateway-backend slurm, else local; kubernetes: the chart's jobs pod",
    )
    p.add_argument("--every", type=float, default=2.0, help="seconds between looks at the engine's jobs")
    p.add_argument("--state-dir", help="kubernetes: the folder of jobs.sqlite (the chart's volume)")
    p.add_argument("--ttl", type=int, help="kubernetes: seconds a finished Job is kept (ttlSecondsAfterFinished)")
    args = p.parse_args(argv)
    setup = service_setup(JOBS_SERVICE, args, 8016)
    if isinstance(setup, int):
        return setup
    rt = setup.runtime
    if args.engine == "kubernetes":
        from workbench.jobs.kube import kubernetes_parts

        try:
            state_dir, quota_url, make_engine, accounts = kubernetes_parts(setup.policy, args, os.environ)
        except ValueError as e:
            print(f"jobs: {e}", file=sys.stderr)
            return 2
        engine_name = "kubernetes"
    elif rt is None:
        print(
            "jobs: needs the embedded workbench's $WORKBENCH_RUNTIME (state folder, engine, accounts), "
            "or --engine kubernetes",
            file=sys.stderr,
        )
        return 2
    else:
        state_dir = rt.state_dir
        quota_url = f"http://127.0.0.1:{rt.quota_port}/services/{QUOTA_SERVICE}/api" if rt.quota_port else ""
        venv = rt.venv_bin
        engine_name = (
            args.engine or rt.extra.get("jobs_engine") or ("slurm" if rt.gateway_backend == "slurm" else "local")
        )
        if engine_name == "slurm":
            conf = resolve_slurm_conf(rt)
            engine = SlurmEngine(conf, venv, SLURM_UP_GPU_PARTITION if written_by_slurm_up(conf) else "")
        else:
            engine = LocalEngine(venv, accounts=lambda user: accounts(user))

        def make_engine(hub):
            return engine

        def accounts(user: str) -> Account:
            if rt.system_users:
                from workbench.sysusers import ensure_system_user

                e = ensure_system_user(system_username(user, rt.user_prefix), comment=f"Workbench user {user}")
                return Account(e.pw_name, e.pw_dir, e.pw_uid)
            home = Path(rt.state_dir, "homes", user)
            home.mkdir(parents=True, exist_ok=True)
            return Account(os.environ.get("USER", "workbench"), str(home))

    def build():
        hub = HubClient(setup.api_url, setup.token)
        quota = QuotaClient(quota_url, setup.token) if quota_url else None
        store = JobStore(Path(state_dir, "jobs.sqlite"))
        definitions = DefinitionStore(Path(state_dir, "job_schedules.sqlite"))
        gateway = runend.gateway_access(hub, setup.policy, rt, engine_name, os.environ)
        svc = JobsService(setup.policy, store, make_engine(hub), hub, quota, accounts, definitions, gateway)
        hub_auth = HubAuth(
            api_url=setup.api_url, api_token=setup.token, cache_max_age=60, access_scopes={JOBS_ACCESS_SCOPE}
        )

        async def background():
            await asyncio.gather(
                every(args.every, svc.tick, "following jobs"),
                every(max(args.every, 5.0), svc.enforce, "budget enforcement of jobs"),
                every(args.every, lambda: schedules.run_due(definitions, svc.submit_definition), "scheduled jobs"),
            )

        log.info("jobs engine: %s", engine_name)
        return make_app(svc, hub_auth, setup.prefix), background

    serve_until_signal(setup, build)
    return 0
