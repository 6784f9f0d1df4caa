"""Deploy the chart to a real cluster, log in, spawn a notebook pod, run and scale a Dask Gateway cluster from it,
open its dashboard through the dashboard guard and stop everything: the scenario the embedded mode passes.

Skipped unless KUBECONFIG, WORKBENCH_K8S_REGISTRY and WORKBENCH_K8S_TAG are set (see conftest.py). Uses
the chart's built-in try-out policy (demo logins, reachable through `kubectl port-forward` only), in a
namespace of its own that is deleted afterwards.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "workbench"
RELEASE = "wb"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, tools: Path, namespace: str):
        self.helm = str(tools / "helm")
        self.kubectl = str(tools / "kubectl")
        self.namespace = namespace

    def k(self, *args: str, check: bool = True, timeout: float = 300) -> str:
        proc = subprocess.run(
            [self.kubectl, "--namespace", self.namespace, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode:
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr}")
        return proc.stdout

    def port_forward(self, target: str, port: int) -> subprocess.Popen:
        local = free_port()
        proc = subprocess.Popen(
            [self.kubectl, "--namespace", self.namespace, "port-forward", target, f"{local}:{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert "Forwarding from" in proc.stdout.readline()
        proc.local_port = local  # type: ignore[attr-defined]
        return proc

    def diagnostics(self) -> str:
        return "\n".join(
            self.k(*args, check=False)
            for args in (
                ["get", "all,pvc,daskclusters"],
                ["get", "events", "--sort-by=.lastTimestamp"],
                ["logs", f"deployment/{RELEASE}-hub", "--tail=80"],
                ["logs", f"deployment/{RELEASE}-gateway-api", "--tail=40"],
                ["logs", f"deployment/{RELEASE}-gateway-controller", "--tail=40"],
            )
        )


@pytest.fixture(scope="module")
def deployed(tools):
    namespace = f"workbench-e2e-{secrets.token_hex(3)}"
    cluster = Cluster(tools, namespace)
    subprocess.run([cluster.kubectl, "create", "namespace", namespace], check=True, capture_output=True)
    args = [
        cluster.helm,
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        namespace,
        "--wait",
        "--timeout",
        "15m",
        "--set",
        f"images.registry={os.environ['WORKBENCH_K8S_REGISTRY']}",
        "--set",
        f"images.tag={os.environ['WORKBENCH_K8S_TAG']}",
        "--set",
        "storage.accessModes={ReadWriteOnce}",
    ]
    if os.environ.get("WORKBENCH_K8S_VALUES"):
        args += ["--values", os.environ["WORKBENCH_K8S_VALUES"]]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=1000, check=False)
        assert proc.returncode == 0, proc.stderr + cluster.diagnostics()
        yield cluster
    finally:
        subprocess.run(
            [cluster.helm, "uninstall", RELEASE, "--namespace", namespace, "--wait"], capture_output=True, check=False
        )
        subprocess.run(
            [cluster.kubectl, "delete", "namespace", namespace, "--wait=false"], capture_output=True, check=False
        )


@pytest.mark.timeout(1800)
def test_spawn_and_gateway_cluster(deployed):
    cluster = deployed
    encoded = cluster.k("get", "secret", f"{RELEASE}-secrets", "-o", "jsonpath={.data.demo-password}")
    password = base64.b64decode(encoded).decode()
    forward = cluster.port_forward(f"service/{RELEASE}-proxy-public", 80)
    base = f"http://127.0.0.1:{forward.local_port}"
    try:
        session = requests.Session()
        session.get(f"{base}/hub/login").raise_for_status()
        xsrf = session.cookies.get("_xsrf")
        r = session.post(
            f"{base}/hub/login",
            data={"username": "researcher", "password": password, "_xsrf": xsrf},
            allow_redirects=False,
        )
        assert r.status_code == 302, r.text[:500]
        r = session.post(f"{base}/hub/api/users/researcher/tokens", json={"note": "e2e"}, headers={"X-XSRFToken": xsrf})
        assert r.status_code in (200, 201), r.text
        api = {"Authorization": f"token {r.json()['token']}"}

        # a profile the researcher's group may not use is refused, the entitled one starts
        assert (
            requests.post(
                f"{base}/hub/api/users/researcher/server", headers=api, json={"profile": "no-such-profile"}
            ).status_code
            == 403
        )
        r = requests.post(f"{base}/hub/api/users/researcher/server", headers=api, json={"profile": "cpu-medium"})
        assert r.status_code in (201, 202), r.text
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            user = requests.get(f"{base}/hub/api/users/researcher", headers=api).json()
            server = user.get("servers", {}).get("", {})
            if server.get("ready"):
                break
            time.sleep(5)
        else:
            raise AssertionError("the notebook server did not become ready\n" + cluster.diagnostics())
        assert requests.get(f"{base}/user/researcher/api/status", headers=api).status_code == 200

        pod = json.loads(cluster.k("get", "pods", "-l", "hub.jupyter.org/username=researcher", "-o", "json"))["items"][
            0
        ]
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert pod["spec"]["containers"][0]["securityContext"]["runAsUser"] == 1000

        # from inside the notebook pod, as a user would: Gateway() with no arguments; create, scale, compute
        code = (
            "from dask_gateway import Gateway\n"
            "g = Gateway()\n"
            "c = g.new_cluster(worker_cores=1, worker_memory=1)\n"
            "c.scale(2)\n"
            "client = c.get_client()\n"
            "client.wait_for_workers(2, timeout=600)\n"
            "print('RESULT', client.submit(lambda x: x + 1, 41).result(), len(client.scheduler_info()['workers']))\n"
            "print('CLUSTER', c.name)\n"
            "client.close()\n"
        )
        out = cluster.k("exec", pod["metadata"]["name"], "--", "python", "-c", code, timeout=900)
        assert "RESULT 42 2" in out, out + cluster.diagnostics()
        name = out.split("CLUSTER", 1)[1].split()[0]
        instance = f"{RELEASE}-gateway"
        workers = cluster.k(
            "get",
            "pods",
            "-l",
            f"gateway.dask.org/instance={instance},app.kubernetes.io/component=dask-worker",
            "-o",
            "name",
        ).split()
        assert len(workers) == 2, workers

        # its dashboard through the dashboard guard (the hub's proxy -> the guard -> Traefik): the owner's browser
        # session gets it (hub OAuth, then the guard asks the gateway), an anonymous one does not
        r = session.get(f"{base}/services/dask-gateway/clusters/{name}/status", timeout=60)
        assert r.status_code == 200 and "dask" in r.text.lower(), (r.status_code, r.text[:300], cluster.diagnostics())
        anonymous = requests.get(
            f"{base}/services/dask-gateway/clusters/{name}/status", allow_redirects=False, timeout=60
        )
        assert anonymous.status_code in (302, 401, 403)

        # stop everything: the server, and with it the user's Dask clusters (the hub stops them)
        r = requests.delete(f"{base}/hub/api/users/researcher/server", headers=api)
        assert r.status_code in (202, 204)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            left = cluster.k("get", "pods", "-l", f"gateway.dask.org/instance={instance}", "-o", "name").split()
            notebook = cluster.k("get", "pods", "-l", "hub.jupyter.org/username=researcher", "-o", "name").split()
            if not left and not notebook:
                break
            time.sleep(5)
        else:
            raise AssertionError(f"pods left after the server stopped: {left + notebook}\n" + cluster.diagnostics())
    finally:
        forward.terminate()
