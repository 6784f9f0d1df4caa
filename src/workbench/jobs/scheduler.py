"""JupyterLab's "Create Notebook Job" (jupyter-scheduler) on the hub's ``jobs`` service: the Workbench backend.

jupyter-scheduler's server extension keeps its own job table and runs notebooks in the single-user server's
process pool. Here it does neither: every call goes to the hub service ``jobs`` (:mod:`workbench.jobs.service`)
with the server's own token (``$JUPYTERHUB_API_TOKEN``, which holds ``access:services!service=jobs``), at the
services URL the other lab extensions use (:func:`workbench.lab.notifications.services_base_url`). So a job
from the form is a Workbench job: run as the user's account by the deployment's engine (Slurm, a local
process under the profile's limits, …), admitted and charged by the quota service, and it survives the
server stopping.

Configured for every jupyter_server of the installation by ``jupyter-config/jupyter_jupyter_scheduler_config.json``
(installed as ``etc/jupyter/jupyter_jupyter_scheduler_config.json``, also in the notebook images: jupyter-scheduler
reads its own ``jupyter_<extension name>_config`` file; JSON in ``jupyter_server_config.d`` configures only
``ServerApp``):

- :class:`WorkbenchScheduler` (``SchedulerApp.scheduler_class``) — create/list/get/stop jobs, job
  definitions (cron schedules, kept and run by the service: :mod:`workbench.jobs.schedules`);
- :class:`WorkbenchEnvironments` (``SchedulerApp.environment_manager_class``) — the form's "Environment"
  choices are the profiles the user may run jobs with (``GET api/profiles``); each profile's "Compute type"
  choices are time limits within the group's limit (``1h``, ``2h``, …, the longest allowed);
- :class:`WorkbenchExecution` (``Scheduler.execution_manager_class``) — the features the form shows; it
  never executes anything here;
- :class:`WorkbenchJobFiles` (``SchedulerApp.job_files_manager_class``) — nothing to download: the job
  writes its executed notebook into the user's home, ``~/jobs/<name>/<run>/``, which the job's detail links.

Mapping: a jupyter-scheduler job id is ``wb-<service id>``, a definition id ``wbdef-<service id>``; the
service's states ``queued``/``running``/``completed``/``failed``/``timeout``/``cancelled`` are
QUEUED/IN_PROGRESS/COMPLETED/FAILED/FAILED/STOPPED, with Slurm's pending reason as the status message;
parameters (strings in the form) are read as JSON when they are JSON (``3`` is a number), as
``workbench job submit -p`` does. Deleting a job cancels it if it still runs and hides it from this list
(the service keeps every job: it is the usage record).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from urllib.parse import quote

from jupyter_scheduler.environments import EnvironmentManager, EnvironmentRetrievalError
from jupyter_scheduler.exceptions import SchedulerError
from jupyter_scheduler.executors import ExecutionManager
from jupyter_scheduler.job_files_manager import JobFilesManager
from jupyter_scheduler.models import (
    CountJobsQuery,
    CreateJob,
    CreateJobDefinition,
    CreateJobFromDefinition,
    DescribeJob,
    DescribeJobDefinition,
    JobFeature,
    JobFile,
    ListJobDefinitionsQuery,
    ListJobDefinitionsResponse,
    ListJobsQuery,
    ListJobsResponse,
    RuntimeEnvironment,
    Status,
    UpdateJob,
    UpdateJobDefinition,
)
from jupyter_scheduler.scheduler import BaseScheduler
from tornado import httpclient
from traitlets import Float, Unicode, default

from workbench.jobs.model import JobError, parse_parameters
from workbench.names import JOBS_SERVICE

JOB_PREFIX = "wb-"
DEFINITION_PREFIX = "wbdef-"
#: the time limits offered as "Compute type", as far as the group's limit allows (the limit itself is added)
TIME_CHOICES = ("30m", "1h", "2h", "4h", "8h", "12h", "24h")
STATUS = {
    "queued": Status.QUEUED,
    "running": Status.IN_PROGRESS,
    "completed": Status.COMPLETED,
    "failed": Status.FAILED,
    "timeout": Status.FAILED,
    "cancelled": Status.STOPPED,
}


def _seconds(label: str) -> int:
    from workbench.policy import parse_duration

    return int(parse_duration(label))


def _label(seconds: int) -> str:
    h, rest = divmod(int(seconds), 3600)
    if rest == 0:
        return f"{h}h"
    return f"{int(seconds) // 60}m"


def time_choices(max_seconds: int) -> list[str]:
    """The "Compute type" choices of a profile: :data:`TIME_CHOICES` up to ``max_seconds``, and that (pure)."""
    out = [c for c in TIME_CHOICES if _seconds(c) <= max_seconds]
    top = _label(max_seconds)
    if top not in out:
        out.append(top)
    return out


def _ms(iso: str | None) -> int | None:
    if not iso:
        return None
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def service_id(job_id: str, prefix: str = JOB_PREFIX) -> str:
    """``wb-<hex>`` -> ``<hex>``; anything else is a :class:`SchedulerError` (pure)."""
    if not job_id.startswith(prefix) or not all(c in "0123456789abcdef" for c in job_id[len(prefix) :]):
        raise SchedulerError(f"{job_id!r} is not a Workbench job id")
    return job_id[len(prefix) :]


def form_parameters(params: dict | None) -> dict:
    """The form's parameters (strings) as the service's (JSON values where they parse); errors name the field."""
    try:
        return parse_parameters(f"{k}={v}" for k, v in (params or {}).items())
    except JobError as e:
        raise SchedulerError(str(e)) from None


def _as_strings(params: dict) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in (params or {}).items()}


def notebook_in_home(root_dir: str, input_uri: str, home: str) -> str:
    """The form's notebook (relative to the server's root) as the service wants it: relative to the home (pure)."""
    path = os.path.normpath(os.path.join(root_dir, input_uri))
    rel = os.path.relpath(path, os.path.normpath(home))
    if rel.startswith("..") or os.path.isabs(rel):
        raise SchedulerError(f"notebook: {input_uri} is outside your home; jobs run notebooks from your home")
    return rel


def service_url(*parts: str, env=None) -> str:
    from workbench.lab.notifications import services_base_url

    base = services_base_url(os.environ if env is None else env)
    if not base:
        raise SchedulerError("the hub's services URL is unknown here (set WORKBENCH_SERVICES_URL)")
    return f"{base}{JOBS_SERVICE}/api/" + "/".join(quote(p, safe="") for p in parts)


async def call(method: str, *parts: str, body=None, token: str = "", timeout: float = 60.0, query: str = ""):
    """One request to the jobs service; its error message (``{"message": …}``) becomes a :class:`SchedulerError`."""
    url = service_url(*parts) + (f"?{query}" if query else "")
    req = httpclient.HTTPRequest(
        url,
        method=method,
        headers={"Authorization": f"token {token or os.environ.get('JUPYTERHUB_API_TOKEN', '')}"},
        body=json.dumps(body) if body is not None else (b"" if method in ("POST", "PATCH") else None),
        request_timeout=timeout,
        allow_nonstandard_methods=True,
    )
    try:
        resp = await httpclient.AsyncHTTPClient().fetch(req, raise_error=False)
    except OSError as e:
        raise SchedulerError(f"the Workbench jobs service does not answer ({e}); try again in a minute") from None
    if resp.code == 599:
        raise SchedulerError(f"the Workbench jobs service does not answer ({resp.error}); try again in a minute")
    text = resp.body.decode("utf-8", "replace") if resp.body else ""
    if resp.code >= 400:
        try:
            message = json.loads(text).get("message") or text
        except ValueError:
            message = text or resp.reason
        raise SchedulerError(message)
    return json.loads(text) if text else None


class WorkbenchExecution(ExecutionManager):
    """Declares what the form offers; Workbench jobs never execute in the single-user server."""

    def execute(self):
        raise SchedulerError("Workbench jobs run through the hub's jobs service, not in this server")

    def supported_features(cls) -> dict:  # called unbound by jupyter-scheduler, like upstream's
        return {
            JobFeature.job_name: True,
            JobFeature.parameters: True,
            JobFeature.output_formats: True,
            JobFeature.job_definition: True,
            JobFeature.idempotency_token: False,
            JobFeature.tags: False,
            JobFeature.email_notifications: False,
            JobFeature.timeout_seconds: False,
            JobFeature.retry_on_timeout: False,
            JobFeature.max_retries: False,
            JobFeature.min_retry_interval_millis: False,
            JobFeature.output_filename_template: False,
            JobFeature.stop_job: True,
            JobFeature.delete_job: True,
        }

    def validate(cls, input_path: str) -> bool:
        return True


class WorkbenchEnvironments(EnvironmentManager):
    """The user's entitled profiles (from the jobs service) as jupyter-scheduler environments."""

    async def list_environments(self) -> list[RuntimeEnvironment]:
        try:
            doc = await call("GET", "profiles")
        except SchedulerError as e:
            raise EnvironmentRetrievalError(str(e)) from None
        out = []
        for p in doc.get("profiles", []):
            gpu = f", {p['gpu']['count']}× {p['gpu']['type']}" if p.get("gpu") else ""
            choices = time_choices(p["max_seconds"])
            default = _label(p["default_seconds"])
            out.append(
                RuntimeEnvironment(
                    name=p["name"],
                    label=p["name"],  # the form's select submits the label as the environment's name
                    description=(
                        f"{p.get('display_name') or p['name']} ({p.get('description') or p['name']}): {p['cpu']:g} CPU, {p['memory'] / 2**30:g} GiB{gpu}; "
                        f"charged to {p['group']}; time limit up to {_label(p['max_seconds'])} (Compute type)"
                    ),
                    file_extensions=["ipynb"],
                    output_formats=["ipynb"],
                    metadata={"group": p["group"], "engine": doc.get("engine", "")},
                    compute_types=choices,
                    default_compute_type=default if default in choices else choices[0],
                    utc_only=False,
                )
            )
        if not out:  # the form needs at least one
            raise EnvironmentRetrievalError(
                "no profile you may run notebook jobs with here; your groups' profiles need GPUs, which jobs get "
                "only on the Slurm engine"
            )
        return out

    def manage_environments_command(self) -> str:
        return ""

    def output_formats_mapping(self) -> dict[str, str]:
        return {"ipynb": "Notebook"}


class WorkbenchJobFiles(JobFilesManager):
    """The executed notebook is written into the user's home by the job itself: nothing to copy."""

    async def copy_from_staging(self, job_id: str, redownload: bool | None = False):
        await self.scheduler.get_job(job_id)  # a job of someone else's is an error, as upstream


class WorkbenchScheduler(BaseScheduler):
    """jupyter-scheduler's API on the hub's jobs service (see the module's docstring)."""

    task_runner = None  # definitions are run by the jobs service, not by this server
    home = Unicode(help="The user's home, where ~/jobs/<name>/<run> lands (default: $HOME)").tag(config=True)
    timeout = Float(60.0, help="Seconds to wait for the jobs service.").tag(config=True)
    hidden_file = Unicode(
        help="Where the ids of jobs deleted from this list are kept (default: <jupyter data dir>/workbench-jobs-hidden.json)"
    ).tag(config=True)

    @default("home")
    def _home_default(self):
        return os.path.expanduser("~")

    @default("hidden_file")
    def _hidden_default(self):
        from jupyter_core.paths import jupyter_data_dir

        return os.path.join(jupyter_data_dir(), "workbench-jobs-hidden.json")

    @default("execution_manager_class")
    def _execution_default(self):
        return WorkbenchExecution

    def __init__(self, root_dir: str, environments_manager, db_url: str = "", config=None, **kwargs):
        super().__init__(root_dir=root_dir, environments_manager=environments_manager, config=config, **kwargs)

    async def _call(self, method: str, *parts: str, body=None, query: str = ""):
        return await call(method, *parts, body=body, timeout=self.timeout, query=query)

    # -- hidden (deleted from the list) -------------------------------------------------------

    def _hidden(self) -> set[str]:
        try:
            with open(self.hidden_file) as f:
                return set(json.load(f))
        except (OSError, ValueError):
            return set()

    def _hide(self, sid: str) -> None:
        ids = sorted(self._hidden() | {sid})
        os.makedirs(os.path.dirname(self.hidden_file), exist_ok=True)
        tmp = f"{self.hidden_file}.tmp"
        with open(tmp, "w") as f:
            json.dump(ids, f)
        os.replace(tmp, self.hidden_file)

    # -- jobs ----------------------------------------------------------------------------

    def _request(self, model, notebook: str) -> dict:
        body = {
            "notebook": notebook,
            "profile": model.runtime_environment_name,
            "parameters": form_parameters(model.parameters),
            "name": model.name,
        }
        if model.compute_type:
            body["time"] = model.compute_type
        return body

    async def create_job(self, model: CreateJob) -> str:
        if model.job_definition_id:  # "run now" of a definition
            return await self.create_job_from_definition(model.job_definition_id, CreateJobFromDefinition())
        notebook = notebook_in_home(self.root_dir, model.input_uri, self.home)
        doc = await self._call("POST", "jobs", body=self._request(model, notebook))
        return JOB_PREFIX + doc["jobs"][0]["id"]

    def describe(self, doc: dict) -> DescribeJob:
        """A service job document as jupyter-scheduler's model, with its files in the home."""
        notebook = doc["notebook"]
        base = os.path.basename(notebook)
        output = os.path.join(self.home, doc["folder"], base)
        final = doc["state"] in ("completed", "failed", "timeout", "cancelled")
        files = [
            JobFile(display_name="Notebook", file_format="ipynb", file_path=self._rel(output) if final else None),
            JobFile(display_name="Input", file_format="input", file_path=self._rel(os.path.join(self.home, notebook))),
        ]
        if files[0].file_path and not os.path.isfile(output):
            files[0].file_path = None
        message = doc.get("reason") or ""
        if doc["state"] == "timeout":
            message = f"time limit reached ({_label(doc['time_limit'])}) {message}".strip()
        elif doc["state"] == "failed" and doc.get("exit_code") is not None:
            message = f"exit code {doc['exit_code']}; see ~/{doc['folder']}/job.log {message}".strip()
        created = _ms(doc["submitted"]) or 0
        return DescribeJob(
            job_id=JOB_PREFIX + doc["id"],
            name=doc["name"],
            input_filename=base,
            runtime_environment_name=doc["profile"],
            runtime_environment_parameters={"group": doc["group"], "folder": doc["folder"]},
            output_formats=["ipynb"],
            parameters=_as_strings(doc.get("parameters") or {}),
            compute_type=_label(doc["time_limit"]),
            job_definition_id=DEFINITION_PREFIX + doc["definition"] if doc.get("definition") else None,
            job_files=files,
            url=f"/jobs/{JOB_PREFIX}{doc['id']}",
            create_time=created,
            update_time=_ms(doc.get("ended")) or _ms(doc.get("started")) or created,
            start_time=_ms(doc.get("started")),
            end_time=_ms(doc.get("ended")),
            status=STATUS.get(doc["state"], Status.QUEUED),
            status_message=message or None,
            downloaded=bool(files[0].file_path),
        )

    def _rel(self, path: str) -> str | None:
        rel = os.path.relpath(path, os.path.normpath(self.root_dir))
        return None if rel.startswith("..") else rel

    async def _jobs(self) -> list[dict]:
        hidden = self._hidden()
        return [d for d in (await self._call("GET", "jobs"))["jobs"] if d["id"] not in hidden]

    async def list_jobs(self, query: ListJobsQuery) -> ListJobsResponse:
        jobs = [self.describe(d) for d in await self._jobs()]
        if query.job_definition_id:
            jobs = [j for j in jobs if j.job_definition_id == query.job_definition_id]
        if query.status:
            jobs = [j for j in jobs if j.status == query.status]
        if query.name:
            jobs = [j for j in jobs if j.name.startswith(query.name)]
        if query.start_time:
            jobs = [j for j in jobs if (j.start_time or 0) >= query.start_time]
        for sort in reversed(query.sort_by or []):
            jobs.sort(key=lambda j, f=sort.name: getattr(j, f, None) or 0, reverse=sort.direction.value == "desc")
        return ListJobsResponse(jobs=jobs[: int(query.max_items or 1000)], total_count=len(jobs))

    async def count_jobs(self, query: CountJobsQuery) -> int:
        return sum(1 for d in await self._jobs() if STATUS.get(d["state"]) == query.status)

    async def get_job(self, job_id: str, job_files: bool | None = True) -> DescribeJob:
        sid = service_id(job_id)
        for d in (await self._call("GET", "jobs"))["jobs"]:  # the list carries the definition of scheduled runs
            if d["id"] == sid:
                return self.describe(d)
        raise SchedulerError(f"no job {job_id} of yours")

    async def stop_job(self, job_id: str):
        await self._call("DELETE", "jobs", service_id(job_id))

    async def delete_job(self, job_id: str):
        sid = service_id(job_id)
        doc = await self._call("GET", "jobs", sid)
        if doc["state"] not in ("completed", "failed", "timeout", "cancelled"):
            await self._call("DELETE", "jobs", sid)
        self._hide(sid)

    async def update_job(self, job_id: str, model: UpdateJob):
        if model.status == Status.STOPPED:
            return await self.stop_job(job_id)
        raise SchedulerError("a Workbench job cannot be renamed or changed once submitted; stop it and submit again")

    # -- definitions (schedules) ---------------------------------------------------------------

    def describe_definition(self, d: dict) -> DescribeJobDefinition:
        return DescribeJobDefinition(
            job_definition_id=DEFINITION_PREFIX + d["id"],
            name=d["name"],
            input_filename=os.path.basename(d["notebook"]),
            runtime_environment_name=d["profile"],
            runtime_environment_parameters={"next_run": d["next_run"] or "", "last_error": d["last_error"]},
            output_formats=["ipynb"],
            parameters=_as_strings(d["parameters"]),
            compute_type=_label(d["time_limit"]) if d.get("time_limit") else None,
            schedule=d["schedule"],
            timezone=d["timezone"],
            create_time=_ms(d["created"]) or 0,
            update_time=_ms(d["updated"]) or 0,
            active=d["active"],
        )

    async def create_job_definition(self, model: CreateJobDefinition) -> str:
        notebook = notebook_in_home(self.root_dir, model.input_uri, self.home)
        body = self._request(model, notebook)
        body.update(schedule=model.schedule, timezone=model.timezone)
        doc = await self._call("POST", "definitions", body=body)
        return DEFINITION_PREFIX + doc["id"]

    async def get_job_definition(self, job_definition_id: str) -> DescribeJobDefinition:
        d = await self._call("GET", "definitions", service_id(job_definition_id, DEFINITION_PREFIX))
        return self.describe_definition(d)

    async def list_job_definitions(self, query: ListJobDefinitionsQuery) -> ListJobDefinitionsResponse:
        defs = [self.describe_definition(d) for d in (await self._call("GET", "definitions"))["definitions"]]
        if query.name:
            defs = [d for d in defs if d.name.startswith(query.name)]
        return ListJobDefinitionsResponse(job_definitions=defs, total_count=len(defs))

    async def update_job_definition(self, job_definition_id: str, model: UpdateJobDefinition):
        body = {k: v for k, v in model.dict(include={"active", "schedule", "timezone"}).items() if v is not None}
        await self._call("PATCH", "definitions", service_id(job_definition_id, DEFINITION_PREFIX), body=body)

    async def delete_job_definition(self, job_definition_id: str):
        await self._call("DELETE", "definitions", service_id(job_definition_id, DEFINITION_PREFIX))

    async def create_job_from_definition(self, job_definition_id: str, model: CreateJobFromDefinition):
        sid = service_id(job_definition_id, DEFINITION_PREFIX)
        doc = await self._call("POST", "definitions", sid, "jobs", body={})
        return JOB_PREFIX + doc["jobs"][0]["id"]

    def get_staging_paths(self, model) -> dict[str, str]:
        return {}
