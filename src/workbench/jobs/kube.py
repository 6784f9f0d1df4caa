"""Notebook jobs on Kubernetes: a ``batch/v1`` Job per run, built from the notebook pod of the profile.

- :func:`job_manifest` (pure) turns the pod KubeSpawner would create for the user and profile (image, CPU and
  memory, GPU resources, node selectors and tolerations, home PVC, group and dataset volumes, non-root uid,
  no service-account token) into the Job: the container runs ``python -m workbench.jobs.execute`` with the
  notebook, run folder (``~/jobs/<name>/<run>`` on the home PVC) and parameters; the hub's single-user
  variables (``JUPYTERHUB_*``, the server's port) are dropped; ``restartPolicy: Never``, ``backoffLimit: 0``,
  ``activeDeadlineSeconds`` = the job's time limit, ``ttlSecondsAfterFinished``; labels name the user, the
  charged group and the job id.
- :func:`render_job_async` builds that pod with the same builders as notebook pods
  (:func:`workbench.spawn.kube.render_pod_async`: a real KubeSpawner, no API call), so a job gets exactly what
  a notebook of the profile gets, and a profile the user may not use is refused the same way.
- :class:`KubeEngine`: submit (create the Job), poll (the Job's conditions and its pod's phase: pending reason,
  the container's real start, the end), cancel (suspend the Job, which ends its pod and keeps the record,
  marked with the time; the Job is deleted once that is reported). It talks to the Kubernetes API through
  kubernetes_asyncio's ``BatchV1Api`` / ``CoreV1Api`` (passed in; the unit tests pass a named mock).
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from workbench.jobs.engines import Account, Observation
from workbench.jobs.model import execute_command
from workbench.names import GATEWAY_SERVICE
from workbench.policy import Policy

__all__ = [
    "DEFAULT_TTL_SECONDS",
    "KubeEngine",
    "LABEL_GROUP",
    "LABEL_JOB",
    "LABEL_USER",
    "gateway_secret",
    "gateway_secret_name",
    "job_manifest",
    "job_object_name",
    "job_spawner_config",
    "kubernetes_parts",
    "label_value",
    "render_job_async",
    "with_gateway_env",
]

#: how long a finished Job (and its pod, with its log) stays before Kubernetes deletes it
DEFAULT_TTL_SECONDS = 24 * 3600
LABEL_JOB = "workbench.io/job-id"
LABEL_USER = "workbench.io/user"
LABEL_GROUP = "workbench.io/group"
COMPONENT = "notebook-job"
CANCELLED_AT = "workbench.io/cancelled-at"
_LABEL_OK = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_DROP_ENV = re.compile(r"^(JUPYTERHUB_|JPY_)")


def label_value(value: str) -> str:
    """``value`` as a Kubernetes label value (pure): itself when valid, else a cleaned prefix and a hash."""
    if len(value) <= 63 and _LABEL_OK.match(value):
        return value
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", value).strip("-_.")[:52].strip("-_.")
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    return f"{clean}-{digest}" if clean else digest


def job_object_name(job_id: str) -> str:
    """The Job's name (``wb-job-<id>``): the service's ids are 12 hex digits, a valid DNS label."""
    return f"wb-job-{job_id}"


def job_manifest(pod: dict, job: dict, params: dict, *, ttl_seconds: int = DEFAULT_TTL_SECONDS) -> dict:
    """The ``batch/v1`` Job of ``job`` (a row of the jobs service) from a notebook ``pod`` manifest (pure)."""
    spec = copy.deepcopy(pod["spec"])
    meta = pod.get("metadata", {})
    labels = {
        **{
            k: v for k, v in (meta.get("labels") or {}).items() if k not in ("component", "app.kubernetes.io/component")
        },
        "component": COMPONENT,
        "app.kubernetes.io/component": COMPONENT,
        LABEL_JOB: job["id"],
        LABEL_USER: label_value(job["user"]),
        LABEL_GROUP: label_value(job["grp"]),
    }
    annotations = {
        **(meta.get("annotations") or {}),
        "workbench.io/username": job["user"],
        "workbench.io/notebook": job["notebook"],
        "workbench.io/submitter": job["submitter"],
    }
    home = _home_mount(spec)
    command = execute_command("python", f"{home}/{job['notebook']}", job["run_dir"], params)
    container = spec["containers"][0]
    container["name"] = "job"
    container["command"] = command[:3]
    container["args"] = [*command[3:], "--log"]
    container.pop("ports", None)
    container.pop("lifecycle", None)
    container.pop("readinessProbe", None)
    container.pop("livenessProbe", None)
    env = [e for e in container.get("env", []) if not _DROP_ENV.match(e["name"])]
    env.append({"name": "WORKBENCH_JOB_ID", "value": job["id"]})
    container["env"] = env
    spec["restartPolicy"] = "Never"
    spec.pop("hostname", None)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_object_name(job["id"]), "labels": labels, "annotations": annotations},
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": int(job["time_limit"]),
            "ttlSecondsAfterFinished": int(ttl_seconds),
            "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": spec},
        },
    }


def gateway_secret_name(job_id: str) -> str:
    """The per-run Secret holding a job's gateway token (pure): named after its Job."""
    return f"{job_object_name(job_id)}-gateway"


def gateway_secret(job: dict, token: str, labels: dict[str, str]) -> dict:
    """The per-run Secret of the job's gateway token (pure; :mod:`workbench.jobs.runend` mints the token)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": gateway_secret_name(job["id"]), "labels": dict(labels)},
        "stringData": {"token": token},
    }


def with_gateway_env(body: dict, env: dict[str, str], secret: str | None) -> dict:
    """The Job ``body`` with the run's gateway settings in its container's environment and, with ``secret``,
    ``JUPYTERHUB_API_TOKEN`` from that Secret's ``token`` key (``secretKeyRef``: never a literal value) (pure)."""
    body = copy.deepcopy(body)
    container = body["spec"]["template"]["spec"]["containers"][0]
    entries = [e for e in container.get("env", []) if e["name"] not in env and e["name"] != "JUPYTERHUB_API_TOKEN"]
    entries += [{"name": k, "value": v} for k, v in sorted(env.items())]
    if secret:
        ref = {"secretKeyRef": {"name": secret, "key": "token"}}
        entries.append({"name": "JUPYTERHUB_API_TOKEN", "valueFrom": ref})
    container["env"] = entries
    return body


def _home_mount(spec: dict) -> str:
    from workbench.spawn.kube import HOME_MOUNT

    for m in spec["containers"][0].get("volumeMounts", []):
        if m.get("name") == "home":
            return m["mountPath"]
    return HOME_MOUNT


async def render_job_async(
    policy: Policy,
    job: dict,
    user_groups: Iterable[str],
    params: dict,
    *,
    ttl_seconds: int = DEFAULT_TTL_SECONDS,
    spawner_config: dict | None = None,
) -> dict:
    """The Job of ``job`` for its user with ``user_groups``: the notebook pod of ``job["profile"]`` as KubeSpawner
    builds it (``spawner_config``: the hub's WorkbenchKubeSpawner traits, e.g. the GPU runtime class), made a Job.

    Raises ``tornado.web.HTTPError(403)`` when the groups may not use the profile, as a notebook spawn would.
    """
    from workbench.spawn.kube import render_pod_async

    pod = await render_pod_async(policy, job["user"], list(user_groups), job["profile"], config=spawner_config)
    return job_manifest(pod, job, params, ttl_seconds=ttl_seconds)


def _time(value) -> float | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def _plain(obj) -> Any:
    """A kubernetes_asyncio model (or a plain dict from a mock) as JSON-like data with the API's field names."""
    if obj is None or isinstance(obj, dict | list | str | int | float | bool):
        return obj
    from kubernetes_asyncio.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def _not_found(e: Exception) -> bool:
    return getattr(e, "status", None) == 404


class KubeEngine:
    """Jobs as Kubernetes Jobs in ``namespace`` (the release's), one per run; see the module's docstring.

    ``batch``/``core``: kubernetes_asyncio ``BatchV1Api`` and ``CoreV1Api`` (or the unit tests' mock);
    ``groups_of``: an async function giving a user's hub groups (the profile's entitlement and the group volumes
    of the pod come from them).
    """

    name = "kubernetes"

    def __init__(
        self,
        policy: Policy,
        namespace: str,
        batch,
        core,
        groups_of,
        *,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        spawner_config: dict | None = None,
    ):
        self.policy = policy
        self.namespace = namespace
        self.batch = batch
        self.core = core
        self.groups_of = groups_of
        self.ttl_seconds = ttl_seconds
        self.spawner_config = spawner_config

    @staticmethod
    def account(user: str) -> Account:
        """Who a job runs as on Kubernetes: the pod's non-root uid, with the user's home PVC at the home mount."""
        from workbench.spawn.kube import HOME_MOUNT

        return Account(user, HOME_MOUNT, None)

    #: the service hands this engine the run's gateway token (a per-run Secret), not a file in the run folder
    takes_token = True

    async def submit(
        self, job: dict, account: Account, profile, params: dict, env: dict | None = None, token: str | None = None
    ) -> str:
        """Create the Job; with ``token`` (the run's gateway token) first its Secret, which the Job's
        ``JUPYTERHUB_API_TOKEN`` refers to, deleted again when the Job cannot be created."""
        groups = await self.groups_of(job["user"]) or []
        body = await render_job_async(
            self.policy, job, groups, params, ttl_seconds=self.ttl_seconds, spawner_config=self.spawner_config
        )
        secret = gateway_secret_name(job["id"]) if token else None
        if env or secret:
            body = with_gateway_env(body, env or {}, secret)
        if secret:
            manifest = gateway_secret(job, token, body["metadata"]["labels"])
            await self.core.create_namespaced_secret(namespace=self.namespace, body=manifest)
        try:
            await self.batch.create_namespaced_job(namespace=self.namespace, body=body)
        except Exception:
            if secret:
                await self._delete_secret(job["id"])
            raise
        return body["metadata"]["name"]

    async def _delete_secret(self, job_id: str) -> None:
        """Delete the run's gateway Secret (one never made or already gone counts as deleted)."""
        try:
            await self.core.delete_namespaced_secret(name=gateway_secret_name(job_id), namespace=self.namespace)
        except Exception as e:
            if not _not_found(e):
                raise

    async def cancel(self, job: dict) -> None:
        """Suspend the Job (Kubernetes ends its pod) and mark when; poll reports it cancelled at that time."""
        name = job.get("engine_id") or job_object_name(job["id"])
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        patch = {"metadata": {"annotations": {CANCELLED_AT: now}}, "spec": {"suspend": True}}
        try:
            await self.batch.patch_namespaced_job(name=name, namespace=self.namespace, body=patch)
        except Exception as e:
            if not _not_found(e):
                raise

    async def _pod(self, name: str) -> dict | None:
        pods = _plain(await self.core.list_namespaced_pod(namespace=self.namespace, label_selector=f"job-name={name}"))
        items = (pods or {}).get("items") or []
        return items[-1] if items else None

    async def _delete(self, name: str) -> None:
        try:
            await self.batch.delete_namespaced_job(name=name, namespace=self.namespace, propagation_policy="Background")
        except Exception as e:
            if not _not_found(e):
                raise

    async def poll(self, jobs: list[dict]) -> dict[str, Observation]:
        out: dict[str, Observation] = {}
        for job in jobs:
            name = job.get("engine_id") or job_object_name(job["id"])
            try:
                k8s = _plain(await self.batch.read_namespaced_job_status(name=name, namespace=self.namespace))
            except Exception as e:
                if not _not_found(e):
                    raise
                # deleted (by someone, or after its TTL) before its end was seen: ended when last seen
                out[job["id"]] = Observation(
                    "failed" if job["state"] == "queued" else "completed", "gone from Kubernetes"
                )
                continue
            out[job["id"]] = await self._observe(job, name, k8s)
        for job in jobs:  # a run with gateway access (its token's id in the table) ended: its Secret goes with it
            if job.get("gateway_token") and out[job["id"]].state in ("completed", "failed", "cancelled", "timeout"):
                await self._delete_secret(job["id"])
        return out

    async def _observe(self, job: dict, name: str, k8s: dict) -> Observation:
        status = k8s.get("status") or {}
        meta = k8s.get("metadata") or {}
        pod = await self._pod(name)
        started = _container_started(pod) or job.get("started")
        cancelled_at = (meta.get("annotations") or {}).get(CANCELLED_AT)
        conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
        if cancelled_at:
            await self._delete(name)
            ended = _time(cancelled_at)
            return Observation("cancelled", "cancelled", started, max(ended, started) if started else ended)
        if "Complete" in conditions or "SuccessCriteriaMet" in conditions:
            c = conditions.get("Complete") or conditions["SuccessCriteriaMet"]
            ended = _time(status.get("completionTime")) or _time(c.get("lastTransitionTime"))
            return Observation("completed", "", started, ended, 0)
        if "Failed" in conditions or "FailureTarget" in conditions:
            c = conditions.get("Failed") or conditions["FailureTarget"]
            reason = c.get("reason") or ""
            state = "timeout" if reason == "DeadlineExceeded" else "failed"
            ended = _container_finished(pod) or _time(c.get("lastTransitionTime"))
            return Observation(state, c.get("message") or reason, started, ended, _exit_code(pod))
        if pod is None or (pod.get("status") or {}).get("phase") == "Pending":
            return Observation("queued", _pending_reason(pod))
        return Observation("running", "", started)


def _container(pod: dict | None) -> dict:
    statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
    return next((s for s in statuses if s.get("name") == "job"), statuses[0] if statuses else {})


def _container_started(pod: dict | None) -> float | None:
    state = _container(pod).get("state") or {}
    for key in ("running", "terminated"):
        if state.get(key) and state[key].get("startedAt"):
            return _time(state[key]["startedAt"])
    return None


def _container_finished(pod: dict | None) -> float | None:
    term = (_container(pod).get("state") or {}).get("terminated") or {}
    return _time(term.get("finishedAt"))


def _exit_code(pod: dict | None) -> int | None:
    term = (_container(pod).get("state") or {}).get("terminated") or {}
    return term.get("exitCode")


def _pending_reason(pod: dict | None) -> str:
    """Why the pod waits, in Kubernetes' words (unschedulable: no node with a free GPU; image pull...)."""
    if pod is None:
        return "waiting for its pod"
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            return f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ")
    waiting = (_container(pod).get("state") or {}).get("waiting") or {}
    return waiting.get("reason", "")


# ---------------------------------------------------------------------------
# The jobs service in the chart's pod
# ---------------------------------------------------------------------------

_SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def kube_gateway(policy: Policy, env) -> tuple[str, Callable[[list[str]], dict[str, str]]] | None:
    """The gateway as the chart's notebook pods reach it (through the dashboard guard, as
    :func:`workbench.kubernetes.hub.k8s_hub_settings` gives notebook pods), for the runs' gateway access:
    ``(address, user groups -> the Job's Dask settings)``; None when the jobs pod has no
    ``WORKBENCH_GATEWAY_URL``/``WORKBENCH_GATEWAY_PROXY_ADDRESS`` (pure)."""
    from workbench.spawn.common import dask_environment

    url = (env.get("WORKBENCH_GATEWAY_URL") or "").strip().rstrip("/")
    proxy = (env.get("WORKBENCH_GATEWAY_PROXY_ADDRESS") or "").strip()
    if not url or not proxy:
        return None
    address = f"{url}/services/{GATEWAY_SERVICE}"

    def dask_env(groups: list[str]) -> dict[str, str]:
        return {
            **dask_environment(policy, groups, address, proxy),
            "DASK_GATEWAY__PUBLIC_ADDRESS": f"/services/{GATEWAY_SERVICE}",  # dashboards: through the hub's proxy
        }

    return address, dask_env


def kubernetes_parts(policy: Policy, args, env):
    """What ``python -m workbench.jobs --engine kubernetes`` runs with, from its arguments and environment:
    ``(state_dir, quota_api_url, make_engine(hub), accounts)``; ``ValueError`` naming what is missing.

    ``--state-dir`` (jobs.sqlite, on the chart's volume), ``WORKBENCH_NAMESPACE`` (else the pod's service-account
    namespace), ``WORKBENCH_QUOTA_URL`` (the quota service; unset: no budgets), the in-cluster API credentials
    of the jobs service account (Role: batch/jobs and pods in the namespace only).
    """
    import os

    if not args.state_dir:
        raise ValueError("--state-dir: give the folder for jobs.sqlite (the chart mounts a volume at /srv/jobs)")
    namespace = (env.get("WORKBENCH_NAMESPACE") or "").strip()
    if not namespace and os.path.exists(_SA_NAMESPACE):
        with open(_SA_NAMESPACE) as f:
            namespace = f.read().strip()
    if not namespace:
        raise ValueError("WORKBENCH_NAMESPACE: set it to the namespace the Jobs run in (the chart sets the release's)")
    spawner_config = job_spawner_config(env)
    quota = (env.get("WORKBENCH_QUOTA_URL") or "").strip().rstrip("/")
    quota_url = f"{quota}/services/quota/api" if quota else ""
    ttl = args.ttl if args.ttl is not None else DEFAULT_TTL_SECONDS

    def make_engine(hub) -> KubeEngine:
        from kubernetes_asyncio import client, config

        config.load_incluster_config()
        api = client.ApiClient()
        return KubeEngine(
            policy,
            namespace,
            client.BatchV1Api(api),
            client.CoreV1Api(api),
            hub.user_groups,
            ttl_seconds=ttl,
            spawner_config=spawner_config,
        )

    return args.state_dir, quota_url, make_engine, KubeEngine.account


def job_spawner_config(env) -> dict:
    """The WorkbenchKubeSpawner traits the hub sets from its environment that shape a pod, from the jobs pod's
    (the chart gives both the same ``WORKBENCH_RELEASE``, pull secrets and GPU settings): the release label that
    the chart's NetworkPolicy for job pods selects, image pulls, the GPU runtime class and ``/dev/shm`` (pure)."""
    release = (env.get("WORKBENCH_RELEASE") or "").strip()
    return {
        **({"extra_labels": {"app.kubernetes.io/instance": release}} if release else {}),
        "image_pull_policy": "IfNotPresent",
        "image_pull_secrets": [s.strip() for s in env.get("WORKBENCH_IMAGE_PULL_SECRETS", "").split(",") if s.strip()],
        "gpu_runtime_class": (env.get("WORKBENCH_GPU_RUNTIME_CLASS") or "").strip(),
        "gpu_dev_shm": (env.get("WORKBENCH_GPU_DEV_SHM") or "").strip().lower() in ("1", "true", "yes"),
    }
