"""Notebook jobs on Kubernetes with Dask Gateway access (issue 15): the run's token reaches the Job's container
through a per-run Secret (``secretKeyRef``, never a literal value), created before the Job and deleted when the
run ends; the Job and the Secret are validated against the Kubernetes 1.30 schema (strict).

Mocked: the Kubernetes API server only (``FakeKubeSecrets``: test_jobs_kube's named stand-in for
kubernetes_asyncio's ``BatchV1Api``/``CoreV1Api`` plus the Secret calls): no cluster here.
"""

from __future__ import annotations

import kubernetes_validate
import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from workbench.jobs.kube import KubeEngine, gateway_secret_name
from workbench.policy import load_policy

from .test_jobs_kube import DEMO, K8S_VERSION, FakeKube, a_job, pod, run

ENV = {
    "DASK_GATEWAY__ADDRESS": "http://proxy-public/services/dask-gateway",
    "DASK_GATEWAY__CLUSTER__OPTIONS__WORKBENCH_JOB": "job-0123456789ab",
}


class FakeKubeSecrets(FakeKube):
    """MOCK of the Kubernetes API server: FakeKube plus ``create/delete_namespaced_secret``."""

    def __init__(self, fail_job: bool = False):
        super().__init__()
        self.secrets: dict[str, dict] = {}
        self.fail_job = fail_job

    async def create_namespaced_secret(self, namespace, body):
        self.calls.append(("create-secret", namespace, body["metadata"]["name"]))
        self.secrets[body["metadata"]["name"]] = body
        return body

    async def delete_namespaced_secret(self, name, namespace):
        self.calls.append(("delete-secret", namespace, name))
        if name not in self.secrets:
            raise ApiException(status=404, reason="Not Found")
        del self.secrets[name]

    async def create_namespaced_job(self, namespace, body):
        if self.fail_job:
            raise ApiException(status=403, reason="Forbidden")
        return await super().create_namespaced_job(namespace, body)


def engine_of(kube) -> KubeEngine:
    async def groups_of(user):
        return {"ada": ["physics-lab"]}.get(user, [])

    return KubeEngine(load_policy(DEMO), "wb", kube, kube, groups_of, ttl_seconds=600)


def test_the_token_reaches_the_job_from_its_own_secret_and_never_as_a_value():
    kube = FakeKubeSecrets()
    job = a_job(group="physics-lab", profile="cpu-large")
    name = run(engine_of(kube).submit(job, KubeEngine.account("ada"), None, {}, env=ENV, token="s3cret"))
    secret = gateway_secret_name(job["id"])
    assert kube.calls[:2] == [("create-secret", "wb", secret), ("create", "wb", name)]
    body = {k: v for k, v in kube.jobs[name].items() if k != "status"}
    kubernetes_validate.validate(body, K8S_VERSION, strict=True)
    kubernetes_validate.validate(kube.secrets[secret], K8S_VERSION, strict=True)
    env = {e["name"]: e for e in body["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["JUPYTERHUB_API_TOKEN"] == {
        "name": "JUPYTERHUB_API_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}},
    }
    for k, v in ENV.items():
        assert env[k]["value"] == v
    assert "s3cret" not in repr(body)
    assert kube.secrets[secret]["stringData"] == {"token": "s3cret"}
    assert kube.secrets[secret]["metadata"]["labels"]["workbench.io/job-id"] == job["id"]


@pytest.mark.parametrize(
    "ending",
    [
        pod("Succeeded", terminated={"exitCode": 0, "startedAt": "2026-12-04T22:00:00Z"}),
        pod("Failed", terminated={"exitCode": 1, "startedAt": "2026-12-04T22:00:00Z"}),
    ],
)
def test_the_secret_is_deleted_when_the_run_ends(ending):
    kube = FakeKubeSecrets()
    eng = engine_of(kube)
    job = a_job(group="physics-lab", profile="cpu-large")
    name = run(eng.submit(job, KubeEngine.account("ada"), None, {}, env=ENV, token="s3cret"))
    job.update(engine_id=name, gateway_token="a7")  # the service records the token's id
    kube.pods[name] = pod("Running", running={"startedAt": "2026-12-04T22:00:00Z"})
    assert run(eng.poll([job]))[job["id"]].state == "running"
    assert gateway_secret_name(job["id"]) in kube.secrets
    kube.pods[name] = ending
    ok = ending["status"]["phase"] == "Succeeded"
    kube.jobs[name]["status"] = {
        "conditions": [{"type": "Complete" if ok else "Failed", "status": "True", "reason": "BackoffLimitExceeded"}],
        **({"completionTime": "2026-12-04T22:05:00Z"} if ok else {}),
    }
    assert run(eng.poll([job]))[job["id"]].state in ("completed", "failed")
    assert kube.secrets == {}


def test_a_cancelled_run_loses_its_secret_and_a_job_refused_by_the_api_leaves_none():
    kube = FakeKubeSecrets()
    eng = engine_of(kube)
    job = a_job(group="physics-lab", profile="cpu-large")
    job["engine_id"] = run(eng.submit(job, KubeEngine.account("ada"), None, {}, env=ENV, token="s3cret"))
    job["gateway_token"] = "a7"
    run(eng.cancel(job))
    assert run(eng.poll([job]))[job["id"]].state == "cancelled"
    assert kube.secrets == {}
    refused = FakeKubeSecrets(fail_job=True)
    with pytest.raises(ApiException):
        run(engine_of(refused).submit(job, KubeEngine.account("ada"), None, {}, env=ENV, token="s3cret"))
    assert refused.secrets == {}


def test_without_a_token_no_secret_is_made():
    kube = FakeKubeSecrets()
    job = a_job(group="physics-lab", profile="cpu-large")
    name = run(engine_of(kube).submit(job, KubeEngine.account("ada"), None, {}))
    assert kube.secrets == {} and [c[0] for c in kube.calls] == ["create"]
    env = [e["name"] for e in kube.jobs[name]["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert "JUPYTERHUB_API_TOKEN" not in env
