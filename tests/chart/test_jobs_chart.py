"""Notebook jobs in the chart (templates/jobs/jobs.yaml, ``jobs.enabled``): the jobs service's Deployment, Service,
claim, its Role (batch/jobs and pods in the release's namespace only), its NetworkPolicies and those of the job
pods, the hub's wiring (the external service ``jobs``, its roles, the scope in notebook tokens), every object
valid against the Kubernetes schema, and a Job the service would create selected by the job pods' policy.

Rendered with the real ``helm template``; no cluster (nothing is applied).
"""

from __future__ import annotations

import asyncio

import kubernetes_validate
import pytest

from workbench.jobs.kube import job_spawner_config, render_job_async
from workbench.kubernetes.hub import k8s_hub_settings
from workbench.names import JOBS_ACCESS_SCOPE, JOBS_SERVICE

from .conftest import K8S_VERSION, NAMESPACE, PRODUCTION, RELEASE, container_env, find, helm_template, one
from .test_chart import OAUTH_SECRET, platform_policy


@pytest.fixture(scope="module")
def jobs_objects(helm) -> list[dict]:
    return helm_template(helm, "--values", str(PRODUCTION), "--set", "jobs.enabled=true")


def mine(objects, kind):
    return [o for o in find(objects, kind) if o["metadata"]["labels"].get("app.kubernetes.io/component") == "jobs"]


def test_off_by_default_renders_nothing_of_it(default_objects):
    assert not [o for o in default_objects if "jobs" in o["metadata"]["name"]]
    env = container_env(default_objects, f"{RELEASE}-hub")
    assert "WORKBENCH_JOBS_URL" not in env


def test_every_object_is_valid_and_the_role_is_namespaced_to_jobs_and_pods(jobs_objects):
    for obj in [o for o in jobs_objects if "jobs" in o["metadata"]["name"]]:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert not find(jobs_objects, "ClusterRole") and not find(jobs_objects, "ClusterRoleBinding")
    role = one(jobs_objects, "Role", f"{RELEASE}-jobs")
    assert [(r["apiGroups"], r["resources"], sorted(r["verbs"])) for r in role["rules"]] == [
        (["batch"], ["jobs"], ["create", "delete", "get", "list", "patch", "watch"]),
        (["batch"], ["jobs/status"], ["get"]),
        ([""], ["pods"], ["get", "list", "watch"]),
    ]
    binding = one(jobs_objects, "RoleBinding", f"{RELEASE}-jobs")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-jobs", "namespace": NAMESPACE}]
    assert binding["roleRef"]["kind"] == "Role"


def test_the_jobs_pod_is_locked_down_and_runs_the_kubernetes_engine(jobs_objects):
    dep = one(jobs_objects, "Deployment", f"{RELEASE}-jobs")
    spec = dep["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == f"{RELEASE}-jobs" and spec["automountServiceAccountToken"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True
    [c] = spec["containers"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["command"][:5] == [
        "python",
        "-m",
        "workbench.jobs",
        "--engine=kubernetes",
        "--config=/etc/workbench/platform.yaml",
    ]
    assert "--state-dir=/srv/jobs" in c["command"] and "--ttl=86400" in c["command"]
    assert {"name": "jobs-db", "mountPath": "/srv/jobs"} in c["volumeMounts"]
    env = container_env(jobs_objects, f"{RELEASE}-jobs")
    assert env["WORKBENCH_NAMESPACE"] == NAMESPACE and env["WORKBENCH_RELEASE"] == RELEASE
    assert env["WORKBENCH_QUOTA_URL"] == f"http://{RELEASE}-quota:8013"
    assert env["JUPYTERHUB_SERVICE_PREFIX"] == "/services/jobs/"
    hub_env = container_env(jobs_objects, f"{RELEASE}-hub", OAUTH_SECRET)
    assert env["JUPYTERHUB_API_TOKEN"] == hub_env["WORKBENCH_JOBS_API_TOKEN"]  # one token, from the Secret
    assert hub_env["WORKBENCH_JOBS_URL"] == f"http://{RELEASE}-jobs:8016"
    [svc] = [s for s in find(jobs_objects, "Service") if s["metadata"]["name"] == f"{RELEASE}-jobs"]
    assert svc["spec"]["ports"][0]["port"] == 8016
    pvc = one(jobs_objects, "PersistentVolumeClaim", f"{RELEASE}-jobs-db")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_the_hub_registers_the_jobs_service_with_its_roles_and_scope(jobs_objects):
    env = container_env(jobs_objects, f"{RELEASE}-hub", OAUTH_SECRET)
    policy = platform_policy(jobs_objects)
    settings = k8s_hub_settings(policy, env)
    [svc] = [s for s in settings["JupyterHub"]["services"] if s["name"] == JOBS_SERVICE]
    assert svc["url"] == f"http://{RELEASE}-jobs:8016" and svc["api_token"] == env["WORKBENCH_JOBS_API_TOKEN"]
    roles = {r["name"]: r for r in settings["JupyterHub"]["load_roles"]}
    assert roles["workbench-jobs-users"]["groups"] == list(policy.groups)
    assert roles["workbench-jobs-service"]["services"] == [JOBS_SERVICE]
    assert JOBS_ACCESS_SCOPE in settings["Spawner"]["server_token_scopes"]


def test_job_pods_get_a_policy_of_their_own_and_the_services_links_are_added(jobs_objects):
    policies = {n["metadata"]["name"]: n["spec"] for n in find(jobs_objects, "NetworkPolicy")}
    pods = policies[f"{RELEASE}-notebook-jobs"]
    assert pods["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/component": "notebook-job"}
    }
    assert pods["policyTypes"] == ["Ingress", "Egress"] and pods["ingress"] == []
    for rule in pods["egress"]:  # DNS, and public addresses only: never pods or the metadata service
        for peer in rule.get("to", []):
            assert "podSelector" not in peer or peer.get("namespaceSelector"), rule
            if "ipBlock" in peer and peer["ipBlock"]["cidr"] == "0.0.0.0/0":
                assert "169.254.0.0/16" in peer["ipBlock"]["except"]
    service = policies[f"{RELEASE}-jobs"]
    assert [p["port"] for r in service["ingress"] for p in r["ports"]] == [8016]
    assert policies[f"{RELEASE}-proxy-to-jobs"]["egress"][0]["ports"] == [{"port": 8016, "protocol": "TCP"}]
    assert policies[f"{RELEASE}-jobs-to-hub"]["ingress"][0]["ports"] == [{"port": 8081, "protocol": "TCP"}]
    assert policies[f"{RELEASE}-jobs-to-quota"]["ingress"][0]["ports"] == [{"port": 8013, "protocol": "TCP"}]

    # a Job the service renders with the jobs pod's environment is selected by the job pods' policy
    env = container_env(jobs_objects, f"{RELEASE}-jobs")
    policy = platform_policy(jobs_objects)
    job = {
        "id": "0123456789ab",
        "user": "ada",
        "submitter": "ada",
        "grp": "vision-lab",
        "profile": "h100-x1",
        "notebook": "fit.ipynb",
        "run_dir": "/home/jovyan/jobs/fit/r1",
        "time_limit": 3600,
    }
    manifest = asyncio.run(render_job_async(policy, job, ["vision-lab"], {}, spawner_config=job_spawner_config(env)))
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    labels = manifest["spec"]["template"]["metadata"]["labels"]
    assert pods["podSelector"]["matchLabels"].items() <= labels.items()
    singleuser = policies[f"{RELEASE}-singleuser"]["podSelector"]["matchLabels"]
    assert not singleuser.items() <= labels.items()  # not taken for a notebook server (no proxy traffic to it)
