"""The chart's values, rendered with a real Helm: secrets kept across upgrades and taken from the operator's
Secret, images from values, each bad value refused with a message naming it and the fix, the install notes."""

from __future__ import annotations

import re

import pytest

from .chartlib import (
    OAUTH_SECRET,
    expect_failure,
    platform_policy,
    pod_specs,
)
from .conftest import (
    CHART,
    NAMESPACE,
    PRODUCTION,
    RELEASE,
    container_env,
    find,
    helm_template,
    secret_data,
)

# ---------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------


def test_secrets_are_kept_across_upgrades(helm, default_objects):
    """The Secret's values survive a second render when the first Secret is fed back.

    On `helm install` / `helm upgrade` the template reads the release's existing Secret with
    ``lookup "v1" "Secret" <namespace> <release>-secrets`` and keeps every key it finds; only missing
    keys are generated. `helm template` has no cluster, so ``lookup`` returns nothing and a render here
    cannot exercise it. The template therefore takes its values in this order: ``.Values.secrets.<key>``
    (which also serves GitOps tools that cannot lookup), then the looked-up Secret, then a new random
    value, all in one helper (workbench.secretData). This test renders once, feeds the generated Secret
    back through ``--set secrets.<key>=...`` as an upgrade would through ``lookup``, renders again and
    asserts the Secret is identical; a third render without it proves values are not constant.
    """
    first = secret_data(default_objects)
    # no culler-api-token: the sessions service culls (sessions.enabled false brings the culler's back)
    assert set(first) == {
        "cookie-secret",
        "proxy-token",
        "crypt-key",
        "gateway-api-token",
        "sessions-api-token",
        "quota-api-token",
        "rosters-api-token",
        "jobs-api-token",
        "guard-cookie-secret",
        "demo-password",
    }
    for key, value in first.items():
        if key != "demo-password":
            assert re.fullmatch(r"[0-9a-f]{64}", value), key
    names = {
        "cookie-secret": "cookieSecret",
        "proxy-token": "proxyToken",
        "crypt-key": "cryptKey",
        "gateway-api-token": "gatewayApiToken",
        "sessions-api-token": "sessionsApiToken",
        "quota-api-token": "quotaApiToken",
        "guard-cookie-secret": "guardCookieSecret",
        "demo-password": "demoPassword",
        "rosters-api-token": "rostersApiToken",
        "jobs-api-token": "jobsApiToken",
    }
    args = [a for key, value in first.items() for a in ("--set", f"secrets.{names[key]}={value}")]
    second = secret_data(helm_template(helm, *args))
    assert second == first
    assert secret_data(helm_template(helm)) != first

    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace (include "workbench.secretName" .)' in helpers


def test_every_secret_reference_resolves(objects):
    keys = set(secret_data(objects))
    for _, spec in pod_specs(objects):
        for c in spec["containers"]:
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] == f"{RELEASE}-secrets":
                    assert ref["key"] in keys, var["name"]


def test_sso_secrets_come_from_the_operators_secret(production_objects, default_objects):
    env = container_env(production_objects, f"{RELEASE}-hub", OAUTH_SECRET)
    assert env["WORKBENCH_OAUTH_CLIENT_SECRET"] == "s3cret"
    assert env["WORKBENCH_DB_URL"] == "postgresql+psycopg://x"
    assert "WORKBENCH_ALLOW_DEMO_AUTH" not in env and "demo-password" not in secret_data(production_objects)
    # postgres, claims made by the platform team; the jobs service's table has no PostgreSQL option (SQLite, kept)
    assert {c["metadata"]["name"] for c in find(production_objects, "PersistentVolumeClaim")} == {f"{RELEASE}-jobs-db"}
    assert container_env(production_objects, f"{RELEASE}-quota", OAUTH_SECRET)["WORKBENCH_QUOTA_DB_URL"] == (
        "postgresql+psycopg://quota@db/quota"
    )
    demo = container_env(default_objects, f"{RELEASE}-hub")
    assert demo["WORKBENCH_ALLOW_DEMO_AUTH"] == "true" and demo["WORKBENCH_DEMO_PASSWORD"]
    assert demo["WORKBENCH_DB_URL"] == "sqlite:////srv/jupyterhub/jupyterhub.sqlite"
    claims = {c["metadata"]["name"] for c in find(default_objects, "PersistentVolumeClaim")}
    assert claims == {
        f"{RELEASE}-hub-db",
        f"{RELEASE}-quota-db",
        f"{RELEASE}-jobs-db",
        "workbench-datasets",
        "workbench-group-research-lab",
        "workbench-group-course-demo",
        "workbench-group-platform-admins",
        # the course's materials folder the demo student's and instructor's pods mount
        "workbench-course-course-demo",
    }


# ---------------------------------------------------------------------------
# Values: images, bad values
# ---------------------------------------------------------------------------


def _images(objects) -> dict[str, str]:
    return {comp: spec["containers"][0]["image"] for comp, spec in pod_specs(objects)}


def test_images_come_from_values(helm, default_objects):
    assert _images(default_objects) == {
        "hub": "registry.example.edu/workbench/hub:0.1.0",
        "gateway-api": "registry.example.edu/workbench/hub:0.1.0",
        "gateway-controller": "registry.example.edu/workbench/hub:0.1.0",
        "gateway-guard": "registry.example.edu/workbench/hub:0.1.0",
        "quota": "registry.example.edu/workbench/hub:0.1.0",
        "sessions": "registry.example.edu/workbench/hub:0.1.0",
        "rosters": "registry.example.edu/workbench/hub:0.1.0",
        "jobs": "registry.example.edu/workbench/hub:0.1.0",
        "proxy": "quay.io/jupyterhub/configurable-http-proxy:5.3.0",
        "gateway-proxy": "docker.io/library/traefik:v3.3.5",
    }
    objects = helm_template(
        helm,
        "--set",
        "images.registry=harbor.example.org/wb",
        "--set",
        "images.tag=2025.1",
        "--set",
        "images.gatewayProxy.registry=mirror.example.org",
        "--set",
        "images.pullSecrets={regcred}",
    )
    images = _images(objects)
    assert images["hub"] == images["jobs"] == "harbor.example.org/wb/hub:2025.1"
    assert images["gateway-proxy"] == "mirror.example.org/library/traefik:v3.3.5"
    assert platform_policy(objects).images["base"].image == "harbor.example.org/wb/base:2025.1"
    for _, spec in pod_specs(objects):
        assert spec["imagePullSecrets"] == [{"name": "regcred"}]


BAD_VALUES = {
    "unknown key in platform": (
        ["--set", "platform.groups.lab.kind=research", "--set", "platform.groups.lab.colour=red"],
        ["/platform/groups/lab", "additional properties 'colour' not allowed"],
    ),
    "profile naming a missing GPU type": (
        ["--values", str(PRODUCTION), "--set", "platform.profiles.h100-x1.gpu.type=h200"],
        ["platform.profiles.h100-x1.gpu.type: unknown GPU type 'h200'", "one of: a100, h100, h100-mig-1g"],
    ),
    "group naming a missing profile": (
        ["--values", str(PRODUCTION), "--set", "platform.groups.startup-acme.profiles={cpu-small,h200-x8}"],
        ["platform.groups.startup-acme.profiles[1]: unknown profile 'h200-x8'"],
    ),
    "bad memory size": (
        ["--values", str(PRODUCTION), "--set", "platform.profiles.cpu-small.memory=4GB"],
        ["/platform/profiles/cpu-small/memory", "does not match pattern"],
    ),
    "name that is not a DNS label": (
        ["--values", str(PRODUCTION), "--set", "platform.gpu_types.H200.resource=nvidia.com/gpu"],
        ["'H200' does not match pattern"],
    ),
    "unknown chart value": (["--set", "hub.replicas=2"], ["additional properties 'replicas' not allowed"]),
    "removed value": (
        ["--set", "hub.cookieSecret=abc", "--set", "singleuser.image=x"],
        [
            "hub.cookieSecret: removed; use secrets.cookieSecret",
            "singleuser: removed; notebook pods are described by the platform policy",
        ],
    ),
    "demo logins on a public service": (
        ["--set", "proxy.service.type=LoadBalancer"],
        ["platform.auth.type: 'demo' (one shared password) would be reachable from the network"],
    ),
    "SSO without public URL and client secret": (
        ["--values", str(PRODUCTION), "--set", "publicUrl=", "--set", "hub.oauthClientSecret.existingSecret="],
        [
            "publicUrl: auth type 'generic-oauth' needs the workbench's public URL",
            "hub.oauthClientSecret.existingSecret:",
        ],
    ),
    "client secret in the policy": (
        ["--values", str(PRODUCTION), "--set", "platform.auth.client_secret=hunter2"],
        ["platform.auth.client_secret: secrets never go in the platform YAML"],
    ),
    "postgres without its Secret": (
        ["--set", "hub.db.type=postgres"],
        ["hub.db.postgres.existingSecret: hub.db.type 'postgres' needs the name of a Secret"],
    ),
    "secret that is not 64 hex characters": (["--set", "secrets.cookieSecret=short"], ["/secrets/cookieSecret"]),
    "quota database URL in values": (
        ["--set-json", 'quota.db.url="postgresql+psycopg://quota:hunter2@db:5432/quota"'],
        [
            "quota.db.url: name the Secret that holds the ledger's database URL, not the URL itself",
            "quota.db.url.existingSecret=workbench-quota-db",
        ],
    ),
    "quota database URL and PVC both set": (
        ["--set", "quota.db.url.existingSecret=workbench-quota-db", "--set", "quota.db.pvc.size=5Gi"],
        ["quota.db.url and quota.db.pvc: both are set", "remove quota.db.pvc to use PostgreSQL"],
    ),
    "quota database key without its Secret": (
        ["--set", "quota.db.url.key=dsn"],
        [
            "quota.db.url.existingSecret: quota.db.url.key is 'dsn' but no Secret is named",
            "kubectl create secret generic workbench-quota-db --from-literal=dsn=",
        ],
    ),
    "quota database Secret with an empty key": (
        ["--set", "quota.db.url.existingSecret=workbench-quota-db", "--set", "quota.db.url.key="],
        ["/quota/db/url/key", "minLength"],
    ),
    "quota reconcile interval below zero": (["--set", "quota.reconcileEvery=-1"], ["/quota/reconcileEvery", "minimum"]),
    "quota PVC with a bad size": (["--set", "quota.db.pvc.size=5GB"], ["/quota/db/pvc/size", "does not match pattern"]),
    "sessions interval below zero": (["--set", "sessions.interval=-1"], ["/sessions/interval", "exclusiveMinimum"]),
    "sessions interval of zero": (["--set", "sessions.interval=0"], ["/sessions/interval", "exclusiveMinimum"]),
    "sessions interval not a number": (["--set", "sessions.interval=often"], ["/sessions/interval", "got string"]),
    # issue 17: operator values
    "extraEnv overriding what the chart sets": (
        ["--set", "hub.extraEnv.WORKBENCH_DB_URL=sqlite://", "--set", "gateway.api.extraEnv.JUPYTERHUB_API_TOKEN=x"],
        [
            "hub.extraEnv.WORKBENCH_DB_URL: the chart sets the WORKBENCH_*, JUPYTERHUB_*",
            "gateway.api.extraEnv.JUPYTERHUB_API_TOKEN: the chart sets",
        ],
    ),
    "extraVolumeMount without its volume": (
        ["--set", "quota.extraVolumeMounts.ca.mountPath=/etc/ssl/centre"],
        ["quota.extraVolumeMounts.ca: no volume of that name; add it under quota.extraVolumes.ca"],
    ),
    "extraVolume named like the chart's own": (
        ["--set", "hub.extraVolumes.platform.emptyDir.medium=Memory"],
        ["hub.extraVolumes.platform: the chart's own volume has this name"],
    ),
    "extraEnv name that is not a variable name": (
        ["--set", "hub.extraEnv.1BAD=x"],
        ["hub.extraEnv.1BAD: not an environment variable name"],
    ),
    "extra volume name that is not a DNS label": (
        ["--set", "hub.extraVolumes.Certs.secret.secretName=x", "--set", "hub.extraVolumeMounts.Certs.mountPath=/c"],
        ["hub.extraVolumes.Certs: a volume name must be a DNS label"],
    ),
    "notebook egress to everything": (
        [
            "--set",
            "networkPolicy.singleuser.egress.all.cidrs={0.0.0.0/0}",
            "--set",
            "networkPolicy.singleuser.egress.all.ports={443}",
        ],
        [
            "networkPolicy.singleuser.egress.all.cidrs[0]: 0.0.0.0/0 would open every address",
            "set networkPolicy.singleuser.allowInternet=true for public addresses",
        ],
    ),
    "Dask egress to the metadata service": (
        [
            "--set",
            "networkPolicy.dask.egress.meta.cidrs={169.254.169.254/32}",
            "--set",
            "networkPolicy.dask.egress.meta.ports={80}",
        ],
        ["networkPolicy.dask.egress.meta.cidrs[0]: 169.254.169.254/32 is link-local"],
    ),
    "egress CIDR that is not a CIDR": (
        [
            "--set",
            "networkPolicy.singleuser.egress.s3.cidrs={s3.example.edu}",
            "--set",
            "networkPolicy.singleuser.egress.s3.ports={443}",
        ],
        ["/networkPolicy/singleuser/egress/s3/cidrs/0", "does not match pattern"],
    ),
    "egress without ports": (
        ["--set", "networkPolicy.singleuser.egress.s3.cidrs={10.0.0.0/16}"],
        ["/networkPolicy/singleuser/egress/s3", "ports"],
    ),
    "placeholders of an unknown profile": (
        ["--values", str(PRODUCTION), "--set", "scheduling.userPlaceholder.profiles.h200-x1=2"],
        [
            "scheduling.userPlaceholder.profiles.h200-x1: unknown profile 'h200-x1'; use one of the policy's profiles: a100-x1"
        ],
    ),
    "placeholders enabled for no profile": (
        ["--set", "scheduling.userPlaceholder.enabled=true"],
        ["scheduling.userPlaceholder.profiles: userPlaceholder is enabled but names no profile"],
    ),
    "pre-puller without GPU types": (
        ["--set", "prePuller.continuous.enabled=true"],
        ["prePuller.continuous.enabled: the pre-puller pulls the images of GPU profiles"],
    ),
    "roster service without a course": (
        [
            "--set",
            "rosters.enabled=true",
            "--set-json",
            'platform={"auth":{"type":"demo","demo_users":{"ada":{"groups":["lab"]}}},"images":{"base":{"image":"r/b:1"}},'
            '"profiles":{"p":{}},"groups":{"lab":{"kind":"research","profiles":["p"]}}}',
        ],
        ["rosters.enabled: true, but the policy has no course"],
    ),
    "gateway proxy service of an unknown type": (
        ["--set", "gateway.proxy.service.type=Ingress"],
        ["/gateway/proxy/service/type"],
    ),
    "GPU runtime class that is not a name": (
        ["--set", "gpu.runtimeClassName=NVIDIA Runtime"],
        ["/gpu/runtimeClassName"],
    ),
    "hub probe with a zero timeout": (
        ["--set", "hub.readinessProbe.timeoutSeconds=0"],
        ["/hub/readinessProbe/timeoutSeconds"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_fail_with_a_clear_message(helm, case):
    args, messages = BAD_VALUES[case]
    error = expect_failure(helm, *args)
    for message in messages:
        assert message in error, error
    assert "hunter2" not in error


@pytest.mark.parametrize("values", [None, PRODUCTION], ids=["default", "production"])
def test_install_notes_say_how_to_reach_it(helm, values, tmp_path):
    """NOTES.txt, as `helm install` prints it (a client-side dry run: no cluster)."""
    import subprocess

    args = [helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"]
    if values:
        args += ["--values", str(values)]
    proc = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=120,
        env={"KUBECONFIG": "/dev/null", "HOME": str(tmp_path)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    if values is None:
        assert "built-in TRY-OUT policy" in notes
        assert f"port-forward service/{RELEASE}-proxy-public 8000:80" in notes
        assert f"get secret {RELEASE}-secrets -o jsonpath='{{.data.demo-password}}'" in notes
    else:
        assert "https://workbench.example.edu/hub/oauth_callback" in notes and "Secret workbench-oauth" in notes
        assert "demo" not in notes
