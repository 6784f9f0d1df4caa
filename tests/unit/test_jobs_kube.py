"""Notebook jobs on Kubernetes: the ``batch/v1`` Job rendered from the profile's notebook pod (KubeSpawner's own
``get_pod_manifest``, offline) and validated against the Kubernetes 1.30 schema like the notebook pods (strict
``kubernetes-validate``), and :class:`KubeEngine`'s submit/poll/cancel.

Mocked: the Kubernetes API server only (``FakeKube``, a named stand-in for kubernetes_asyncio's ``BatchV1Api`` and
``CoreV1Api``: no cluster here). The Job objects it returns are the ones the engine created, with the status
fields the Job controller and kubelet would write, set by each test.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path

import kubernetes_validate
import pytest
from kubernetes_asyncio.client.exceptions import ApiException
from tornado import web

from workbench.jobs.engines import Observation
from workbench.jobs.kube import (
    LABEL_GROUP,
    LABEL_JOB,
    LABEL_USER,
    KubeEngine,
    job_object_name,
    label_value,
    render_job_async,
)
from workbench.policy import load_policy
from workbench.spawn.kube import render_pod

ROOT = Path(__file__).resolve().parents[2]
CENTRE = ROOT / "hub_config" / "examples" / "centre.yaml"
DEMO = ROOT / "hub_config" / "demo.yaml"
K8S_VERSION = "1.30.0"


def a_job(user="ada", group="climate-lab", profile="a100-x1", job_id="0123456789ab", **kw) -> dict:
    return {
        "id": job_id,
        "user": user,
        "submitter": user,
        "grp": group,
        "profile": profile,
        "notebook": "analysis/fit.ipynb",
        "name": "fit",
        "run": "20261204-220000-012345",
        "run_dir": "/home/jovyan/jobs/fit/20261204-220000-012345",
        "time_limit": 7200,
        "state": "queued",
        "started": None,
        **kw,
    }


def render(policy, job, groups, params=None, **kw) -> dict:
    return asyncio.run(render_job_async(policy, job, groups, params or {"lr": 0.1}, **kw))


def test_a_gpu_job_is_the_notebook_pod_of_its_profile_run_as_a_batch_job():
    policy = load_policy(CENTRE)
    job = a_job()
    manifest = render(policy, job, ["climate-lab"])
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)

    pod = render_pod(policy, "ada", ["climate-lab"], "a100-x1")
    spec, tpl = manifest["spec"], manifest["spec"]["template"]["spec"]
    assert manifest["kind"] == "Job" and manifest["apiVersion"] == "batch/v1"
    assert manifest["metadata"]["name"] == "wb-job-0123456789ab"
    assert spec["activeDeadlineSeconds"] == 7200 and spec["backoffLimit"] == 0
    assert spec["ttlSecondsAfterFinished"] == 24 * 3600
    # the same pod as a notebook of the profile: image, resources with the GPU, placement, volumes, identity
    [c] = tpl["containers"]
    [nb] = pod["spec"]["containers"]
    assert c["image"] == nb["image"] and c["resources"] == nb["resources"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert tpl["nodeSelector"] == pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert tpl["tolerations"] == pod["spec"]["tolerations"]
    assert tpl["volumes"] == pod["spec"]["volumes"] and c["volumeMounts"] == nb["volumeMounts"]
    assert {"name": "home", "persistentVolumeClaim": {"claimName": "claim-ada"}} in tpl["volumes"]
    assert c["securityContext"] == nb["securityContext"] and c["securityContext"]["runAsUser"] == 1000
    assert tpl["securityContext"] == pod["spec"]["securityContext"] and tpl["automountServiceAccountToken"] is False
    assert tpl["restartPolicy"] == "Never"
    # what runs: the notebook from the user's home, the run folder on the home PVC, the parameters
    assert c["command"] == ["python", "-m", "workbench.jobs.execute"]
    assert c["args"] == [
        "--notebook",
        "/home/jovyan/analysis/fit.ipynb",
        "--run-dir",
        "/home/jovyan/jobs/fit/20261204-220000-012345",
        "--parameters",
        json.dumps({"lr": 0.1}),
        "--log",
    ]
    assert "ports" not in c
    env = {e["name"]: e for e in c["env"]}
    assert env["WORKBENCH_JOB_ID"]["value"] == "0123456789ab"
    assert not [n for n in env if n.startswith(("JUPYTERHUB_", "JPY_"))]  # no server token or OAuth settings
    assert env["MEM_LIMIT"] == next(e for e in nb["env"] if e["name"] == "MEM_LIMIT")
    # labels: the user, the charged group and the job id; not selected as a notebook server
    labels = tpl_labels = manifest["spec"]["template"]["metadata"]["labels"]
    assert labels == manifest["metadata"]["labels"]
    assert tpl_labels[LABEL_JOB] == "0123456789ab" and tpl_labels[LABEL_USER] == "ada"
    assert tpl_labels[LABEL_GROUP] == "climate-lab" and tpl_labels["component"] == "notebook-job"
    assert tpl_labels["hub.jupyter.org/username"] == "ada"


def test_group_volumes_and_a_refused_profile_follow_the_notebook_rules():
    policy = load_policy(DEMO)
    job = a_job(user="student1", group="course-ml101", profile="cpu-small")
    manifest = render(policy, job, ["course-ml101"])
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    names = [v["name"] for v in manifest["spec"]["template"]["spec"]["volumes"]]
    assert names == ["datasets", "home", "materials-course-ml101", "shared-course-ml101"]
    with pytest.raises(web.HTTPError) as e:
        render(policy, a_job(user="student1", group="course-ml101", profile="h100-x1"), ["course-ml101"])
    assert e.value.status_code == 403


def test_odd_user_names_become_valid_labels():
    manifest = render(
        load_policy(DEMO), a_job(user="Jane.Doe@uni.example", group="physics-lab", profile="cpu-large"), ["physics-lab"]
    )
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    value = manifest["metadata"]["labels"][LABEL_USER]
    assert value == label_value("Jane.Doe@uni.example") and value.startswith("Jane.Doe-uni.example-")
    assert manifest["metadata"]["annotations"]["workbench.io/username"] == "Jane.Doe@uni.example"
    assert label_value("x" * 80) != label_value("x" * 81) and len(label_value("x" * 80)) <= 63


def test_the_validator_rejects_a_broken_job():
    manifest = render(load_policy(DEMO), a_job(user="ada", group="physics-lab", profile="cpu-large"), ["physics-lab"])
    broken = {**manifest, "spec": {**manifest["spec"], "backofLimit": 0}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


# ---------------------------------------------------------------------------
# The engine against a mocked Kubernetes API
# ---------------------------------------------------------------------------


class FakeKube:
    """MOCK of the Kubernetes API server (BatchV1Api + CoreV1Api methods the engine calls): no cluster here."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.pods: dict[str, dict] = {}  # job name -> its pod
        self.calls: list[tuple] = []

    def _get(self, name):
        if name not in self.jobs:
            raise ApiException(status=404, reason="Not Found")
        return self.jobs[name]

    async def create_namespaced_job(self, namespace, body):
        self.calls.append(("create", namespace, body["metadata"]["name"]))
        self.jobs[body["metadata"]["name"]] = {**body, "status": {}}
        return body

    async def read_namespaced_job_status(self, name, namespace):
        return self._get(name)

    async def patch_namespaced_job(self, name, namespace, body):
        self.calls.append(("patch", namespace, name, body))
        job = self._get(name)
        job["metadata"].setdefault("annotations", {}).update(body["metadata"]["annotations"])
        job["spec"].update(body["spec"])
        return job

    async def delete_namespaced_job(self, name, namespace, propagation_policy=None):
        self.calls.append(("delete", namespace, name, propagation_policy))
        self._get(name)
        del self.jobs[name]

    async def list_namespaced_pod(self, namespace, label_selector):
        name = label_selector.removeprefix("job-name=")
        return {"items": [self.pods[name]] if name in self.pods else []}


@pytest.fixture
def kube():
    return FakeKube()


@pytest.fixture
def engine(kube):
    async def groups_of(user):
        return {"ada": ["physics-lab"]}.get(user, [])

    return KubeEngine(load_policy(DEMO), "wb", kube, kube, groups_of, ttl_seconds=600)


def run(coro):
    return asyncio.run(coro)


def pod(phase, **state):
    return {"status": {"phase": phase, "containerStatuses": [{"name": "job", "state": state}]}}


def test_submit_creates_the_job_in_the_namespace(engine, kube):
    job = a_job(group="physics-lab", profile="cpu-large")
    assert run(engine.submit(job, engine.account("ada"), None, {"n": 1})) == "wb-job-0123456789ab"
    assert kube.calls == [("create", "wb", "wb-job-0123456789ab")]
    body = kube.jobs["wb-job-0123456789ab"]
    assert body["spec"]["ttlSecondsAfterFinished"] == 600
    kubernetes_validate.validate({k: v for k, v in body.items() if k != "status"}, K8S_VERSION, strict=True)


def test_poll_follows_a_job_from_pending_to_complete(engine, kube):
    job = a_job(group="physics-lab", profile="cpu-large")
    name = run(engine.submit(job, engine.account("ada"), None, {}))
    job["engine_id"] = name
    assert run(engine.poll([job])) == {job["id"]: Observation("queued", "waiting for its pod")}
    kube.pods[name] = {
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                }
            ],
        }
    }
    obs = run(engine.poll([job]))[job["id"]]
    assert (
        obs.state == "queued" and obs.reason == "Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    )
    kube.pods[name] = pod("Running", running={"startedAt": "2026-12-04T22:00:05Z"})
    obs = run(engine.poll([job]))[job["id"]]
    assert obs.state == "running" and obs.started == 1796421605.0
    kube.pods[name] = pod(
        "Succeeded",
        terminated={"startedAt": "2026-12-04T22:00:05Z", "finishedAt": "2026-12-04T22:10:05Z", "exitCode": 0},
    )
    kube.jobs[name]["status"] = {
        "completionTime": "2026-12-04T22:10:06Z",
        "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": "2026-12-04T22:10:06Z"}],
    }
    obs = run(engine.poll([job]))[job["id"]]
    assert (obs.state, obs.started, obs.ended, obs.exit_code) == ("completed", 1796421605.0, 1796422206.0, 0)


def test_poll_reports_a_deadline_as_timeout_and_a_failure_with_its_exit_code(engine, kube):
    job = a_job(group="physics-lab", profile="cpu-large")
    job["engine_id"] = name = run(engine.submit(job, engine.account("ada"), None, {}))
    kube.jobs[name]["status"] = {
        "conditions": [
            {
                "type": "Failed",
                "status": "True",
                "reason": "DeadlineExceeded",
                "message": "Job was active longer than specified deadline",
                "lastTransitionTime": "2026-12-04T23:00:05Z",
            }
        ]
    }
    kube.pods[name] = pod("Failed", terminated={"startedAt": "2026-12-04T22:00:05Z", "exitCode": 137})
    obs = run(engine.poll([job]))[job["id"]]
    assert obs.state == "timeout" and obs.reason == "Job was active longer than specified deadline"
    assert obs.ended == 1796425205.0 and obs.exit_code == 137
    kube.jobs[name]["status"]["conditions"][0].update(
        reason="BackoffLimitExceeded", message="Job has reached the specified backoff limit"
    )
    kube.pods[name] = pod(
        "Failed", terminated={"startedAt": "2026-12-04T22:00:05Z", "finishedAt": "2026-12-04T22:01:05Z", "exitCode": 1}
    )
    obs = run(engine.poll([job]))[job["id"]]
    assert (obs.state, obs.exit_code, obs.ended) == ("failed", 1, 1796421665.0)


def test_cancel_suspends_the_job_and_poll_reports_it_cancelled_at_that_time_then_deletes_it(engine, kube):
    job = a_job(group="physics-lab", profile="cpu-large")
    job["engine_id"] = name = run(engine.submit(job, engine.account("ada"), None, {}))
    kube.pods[name] = pod("Running", running={"startedAt": "2026-12-04T22:00:05Z"})
    run(engine.cancel(job))
    [patch] = [c for c in kube.calls if c[0] == "patch"]
    assert patch[1:3] == ("wb", name) and patch[3]["spec"] == {"suspend": True}
    at = patch[3]["metadata"]["annotations"]["workbench.io/cancelled-at"]
    obs = run(engine.poll([job]))[job["id"]]
    assert obs.state == "cancelled" and obs.started == 1796421605.0
    assert abs(obs.ended - datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()) < 1e-3
    assert ("delete", "wb", name, "Background") in kube.calls and name not in kube.jobs
    run(engine.cancel(job))  # cancelling a job that is gone is not an error


def test_a_job_deleted_behind_the_services_back_ends(engine, kube):
    job = a_job(group="physics-lab", profile="cpu-large", state="running", engine_id="wb-job-0123456789ab")
    assert run(engine.poll([job]))[job["id"]] == Observation("completed", "gone from Kubernetes")
    queued = {**job, "state": "queued"}
    assert run(engine.poll([queued]))[job["id"]].state == "failed"


def test_the_api_s_other_errors_are_not_taken_for_an_ended_job(engine, kube):
    async def boom(name, namespace):
        raise ApiException(status=403, reason="Forbidden")

    kube.read_namespaced_job_status = boom
    with pytest.raises(ApiException):
        run(engine.poll([a_job(engine_id="wb-job-x")]))


def test_job_object_names_are_dns_labels():
    assert job_object_name("0123456789ab") == "wb-job-0123456789ab"
