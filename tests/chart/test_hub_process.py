"""The hub pod's entry point, run for real: JupyterHub with hub_config/jupyterhub_config_k8s.py.

The platform YAML and the environment are taken from the rendered chart (its ConfigMap and the hub
Deployment's env, secrets resolved from the rendered Secret), as the kubelet would give them to the
container; configurable-http-proxy runs beside it as the chart's proxy pod does, and so do the dashboard
guard, the quota service and the sessions service, each from its rendered Deployment. Only what needs a cluster differs:
service host names become 127.0.0.1 with free ports, the in-cluster Kubernetes credentials become a
placeholder kube config (KubeSpawner is built at login and watches pods; nothing answers), the
gateway's Traefik proxy is a stand-in that knows one cluster, and no server is spawned.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from workbench.spawn.kube import _PLACEHOLDER_KUBECONFIG

from .conftest import RELEASE, ROOT, container_env, one

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, procs, timeout: float = 60) -> requests.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"{p.args[0]} exited with {p.returncode}"
        try:
            r = requests.get(url, timeout=2)
            if r.status_code == 200:
                return r
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


#: the one Dask cluster the stand-in gateway knows, and the token of its owner (set by the test)
OWNED_CLUSTER = "research.0123abcd"


class FakeGatewayProxy(BaseHTTPRequestHandler):
    """The gateway's Traefik proxy, as the guard sees it: the cluster API and unauthenticated dashboards."""

    owner_token = ""

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path.startswith("/services/dask-gateway/api/v1/clusters/"):
            owned = (
                self.path.endswith(OWNED_CLUSTER)
                and self.headers.get("Authorization") == f"jupyterhub {self.owner_token}"
            )
            code, body = (200, {"name": OWNED_CLUSTER}) if owned else (404, {"error": "not found"})
        elif self.path.startswith("/services/dask-gateway/clusters/"):
            code, body = 200, {"dashboard": self.path}  # what Traefik serves to anyone who gets here
        else:
            code, body = 200, {"api": self.path}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def _command(objects, deployment: str, ports: dict[str, str]) -> list[str]:
    """The rendered container command, run from this checkout (``python`` is this venv's)."""
    [container] = one(objects, "Deployment", f"{RELEASE}-{deployment}")["spec"]["template"]["spec"]["containers"]
    out = [str(VENV_BIN / "python") if arg == "python" else arg for arg in container["command"]]
    for flag, value in ports.items():
        out = [f"{flag}={value}" if a.startswith(f"{flag}=") else a for a in out]
    return out


def _cullers_with_token(token: str) -> list[int]:
    """Processes of jupyterhub-idle-culler started with ``token`` (this test's hub's culler, whoever its parent)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if b"jupyterhub_idle_culler" in cmdline and f"JUPYTERHUB_API_TOKEN={token}".encode() in environ.split(b"\0"):
            pids.append(int(proc.name))
    return pids


def _stop(procs) -> None:
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        try:
            p.wait(60)  # the hub stops its services first; a slow 2-core CI machine needs more than 15 s
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


@pytest.fixture
def no_orphan_culler():
    """Stops the hub's idle culler if the hub left it behind, and fails the test if it had to.

    The hub starts the culler in a session of its own; it stops it when it gets SIGTERM, but only once
    its start-up is complete (JupyterHub installs its signal handlers last): a hub stopped earlier
    leaves the culler running as an orphan (parent pid 1).
    """
    tokens: list[str] = []
    yield tokens
    leftover = []
    deadline = time.monotonic() + 30
    for token in tokens:
        while (pids := _cullers_with_token(token)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            leftover.append(pid)
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    assert not leftover, f"the hub left its idle culler running: pids {leftover}"


@pytest.mark.timeout(180)
def test_the_hub_starts_from_the_charts_configmap_and_environment(default_objects, tmp_path, no_orphan_culler):
    chp = shutil.which("configurable-http-proxy") or str(VENV_BIN / "configurable-http-proxy")
    if not Path(chp).exists():
        pytest.skip("configurable-http-proxy is not installed (make install puts it into .venv)")
    platform = tmp_path / "platform.yaml"
    platform.write_text(one(default_objects, "ConfigMap", f"{RELEASE}-platform")["data"]["platform.yaml"])
    env = container_env(default_objects, f"{RELEASE}-hub")
    # the sessions service culls: the hub runs no idle culler (nor may one be left behind with the
    # sessions service's token, the only service token a culler could be given here)
    assert "WORKBENCH_CULLER_API_TOKEN" not in env
    no_orphan_culler.append(env["WORKBENCH_SESSIONS_API_TOKEN"])
    public, api, hub, guard, quota, sessions = (free_port() for _ in range(6))
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), FakeGatewayProxy)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    assert env["WORKBENCH_GATEWAY_URL"] == f"http://{RELEASE}-gateway-guard.research:8000"
    assert env["WORKBENCH_QUOTA_URL"] == f"http://{RELEASE}-quota:8013"
    assert env["WORKBENCH_SESSIONS_URL"] == f"http://{RELEASE}-sessions:8014"
    env.update(
        WORKBENCH_PLATFORM=str(platform),
        WORKBENCH_DB_URL=f"sqlite:///{tmp_path / 'jupyterhub.sqlite'}",
        WORKBENCH_PROXY_API_URL=f"http://127.0.0.1:{api}",
        WORKBENCH_HUB_CONNECT_URL=f"http://127.0.0.1:{hub}",
        WORKBENCH_GATEWAY_URL=f"http://127.0.0.1:{guard}",
        WORKBENCH_QUOTA_URL=f"http://127.0.0.1:{quota}",
        WORKBENCH_SESSIONS_URL=f"http://127.0.0.1:{sessions}",
    )
    hub_api = {
        "WORKBENCH_HUB_API_URL": f"http://127.0.0.1:{hub}/hub/api",
        "JUPYTERHUB_API_URL": f"http://127.0.0.1:{hub}/hub/api",
    }
    guard_env = {
        **container_env(default_objects, f"{RELEASE}-gateway-guard"),
        "WORKBENCH_GUARD_PORT": str(guard),
        "WORKBENCH_GATEWAY_PROXY_URL": f"http://127.0.0.1:{upstream.server_port}",
        **hub_api,
    }
    guard_env = {k: v for k, v in guard_env.items() if k != "JUPYTERHUB_API_URL"}
    quota_env = {
        **container_env(default_objects, f"{RELEASE}-quota"),
        "JUPYTERHUB_API_URL": hub_api["JUPYTERHUB_API_URL"],
    }
    quota_cmd = _command(
        default_objects,
        "quota",
        {"--config": str(platform), "--ip": "127.0.0.1", "--port": str(quota), "--state-dir": str(tmp_path)},
    )
    assert quota_cmd[1:4] == ["-m", "workbench.services.quota", f"--config={platform}"]
    sessions_env = {
        **container_env(default_objects, f"{RELEASE}-sessions"),
        "JUPYTERHUB_API_URL": hub_api["JUPYTERHUB_API_URL"],
        "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{sessions}",
    }
    # checks every second (the policy's culling.every is minutes), so that the test sees some
    sessions_cmd = [
        *_command(
            default_objects, "sessions", {"--config": str(platform), "--ip": "127.0.0.1", "--port": str(sessions)}
        ),
        "--interval=1",
    ]
    assert sessions_cmd[1:4] == ["-m", "workbench.services.sessions", f"--config={platform}"]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKBENCH_", "JUPYTERHUB_", "KUBECONFIG"))}
    base_env["PATH"] = f"{VENV_BIN}:{base_env.get('PATH', '')}"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(_PLACEHOLDER_KUBECONFIG)
    base_env["KUBECONFIG"] = str(kubeconfig)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []
    names = ("chp", "hub", "guard", "quota", "sessions")
    files = {name: open(logs / f"{name}.log", "w") for name in names}  # noqa: SIM115 - closed below
    try:

        def start(name, argv, extra):
            procs.append(
                subprocess.Popen(
                    argv, env={**base_env, **extra}, cwd=tmp_path, stdout=files[name], stderr=subprocess.STDOUT
                )
            )

        start(
            "chp",
            [
                chp,
                "--ip=127.0.0.1",
                f"--port={public}",
                "--api-ip=127.0.0.1",
                f"--api-port={api}",
                f"--default-target=http://127.0.0.1:{hub}",
            ],
            {"CONFIGPROXY_AUTH_TOKEN": env["CONFIGPROXY_AUTH_TOKEN"]},
        )
        start("guard", _command(default_objects, "gateway-guard", {}), guard_env)
        start("quota", quota_cmd, quota_env)
        start("sessions", sessions_cmd, sessions_env)
        start(
            "hub",
            [
                str(VENV_BIN / "jupyterhub"),
                f"--config={ROOT / 'hub_config' / 'jupyterhub_config_k8s.py'}",
                "--upgrade-db",
                f"--JupyterHub.hub_bind_url=http://127.0.0.1:{hub}",
            ],
            env,
        )
        try:
            _check_running_workbench(f"http://127.0.0.1:{public}", env, logs, procs, upstream)
        except BaseException:
            for name in names:
                print(f"--- {name}.log\n" + (logs / f"{name}.log").read_text()[-6000:])
            raise
    finally:
        _stop(procs)
        upstream.shutdown()
        for f in files.values():
            f.close()
    _check_logs(logs, env)


def _wait_for_log(path: Path, text: str, procs, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        for p in procs:
            assert p.poll() is None, f"{p.args[0]} exited with {p.returncode}"
        assert time.monotonic() < deadline, f"{text!r} not in {path.name}"
        time.sleep(0.3)


def _check_running_workbench(url, env, logs, procs, upstream):
    wait_for(f"{url}/hub/health", procs)
    page = wait_for(f"{url}/hub/login", procs).text
    assert "Workbench (try-out): log in with a demo account" in page
    # the hub has started its services (and only now stops them, the culler included, on SIGTERM)
    _wait_for_log(logs / "hub.log", "JupyterHub is now running", procs)

    session = requests.Session()
    session.get(f"{url}/hub/login")
    xsrf = session.cookies.get("_xsrf")
    form = {"username": "researcher", "password": env["WORKBENCH_DEMO_PASSWORD"], "_xsrf": xsrf}
    bad = session.post(f"{url}/hub/login", data={**form, "password": "wrong"}, allow_redirects=False)
    assert bad.status_code == 403
    ok = session.post(f"{url}/hub/login", data=form, allow_redirects=False)
    assert ok.status_code == 302, ok.text[:500]
    me = session.get(f"{url}/hub/api/user", headers={"X-XSRFToken": xsrf})
    assert me.status_code == 200
    assert me.json()["name"] == "researcher" and me.json()["groups"] == ["research-lab"]
    # the login set a new _xsrf cookie (bound to the session)
    xsrf = [c.value for c in session.cookies if c.name == "_xsrf"][-1]
    made = session.post(f"{url}/hub/api/users/researcher/tokens", json={"note": "test"}, headers={"X-XSRFToken": xsrf})
    assert made.status_code == 201, made.text[:500]
    token = made.json()["token"]

    # the quota service: registered in the hub, reached through the hub's proxy, accepting the user's token
    assert wait_for(f"{url}/services/quota/api/health", procs).json()["status"] == "ok"
    usage = requests.get(
        f"{url}/services/quota/api/usage/users/researcher", headers={"Authorization": f"token {token}"}, timeout=10
    )
    assert usage.status_code == 200, usage.text[:500]

    # the sessions service: registered in the hub, reached through the hub's proxy, answering the user's token
    assert wait_for(f"{url}/services/sessions/api/health", procs).json()["status"] == "ok"
    notes = requests.get(
        f"{url}/services/sessions/api/notifications", headers={"Authorization": f"token {token}"}, timeout=10
    )
    assert notes.status_code == 200 and notes.json() == {"notifications": []}, notes.text[:500]
    assert requests.get(f"{url}/services/sessions/api/notifications", timeout=10).status_code == 401

    # ... and its checks list the servers with its own token and role (one check a second; the first ones
    # may have failed before the hub was up): its own counters (api/health with a valid token) show checks
    # that succeed, and none failing once the hub answers
    def counters() -> dict:
        r = requests.get(f"{url}/services/sessions/api/health", headers={"Authorization": f"token {token}"}, timeout=10)
        assert r.status_code == 200, r.text[:500]
        return r.json()

    first = counters()
    deadline = time.monotonic() + 60
    while (now := counters())["checks"] < first["checks"] + 3:
        assert time.monotonic() < deadline, (first, now, (logs / "sessions.log").read_text()[-2000:])
        time.sleep(0.3)
    assert now["failed_checks"] == first["failed_checks"], (first, now)

    # the dashboard guard is the hub service dask-gateway: the API passes, dashboards only to their owner
    FakeGatewayProxy.owner_token = token
    dashboards = f"{url}/services/dask-gateway/clusters"
    assert requests.get(f"{url}/services/dask-gateway/api/health", timeout=10).json() == {
        "api": "/services/dask-gateway/api/health"
    }
    anonymous = requests.get(f"{dashboards}/{OWNED_CLUSTER}/status", allow_redirects=False, timeout=10)
    assert anonymous.status_code == 302 and "/hub/api/oauth2/authorize" in anonymous.headers["Location"]
    auth = {"Authorization": f"jupyterhub {token}"}
    other = requests.get(f"{dashboards}/research.fedcba98/status", headers=auth, timeout=10)
    assert other.status_code == 403 and "another user's cluster" in other.text
    own = requests.get(f"{dashboards}/{OWNED_CLUSTER}/status", headers=auth, timeout=10)
    assert own.status_code == 200 and own.json() == {
        "dashboard": f"/services/dask-gateway/clusters/{OWNED_CLUSTER}/status"
    }


def _check_logs(logs, env):
    hub_log = (logs / "hub.log").read_text()
    assert "Using Spawner: workbench.spawn.kube.WorkbenchKubeSpawner" in hub_log
    assert "Using Authenticator: workbench.auth.demo.DemoAuthenticator" in hub_log
    assert "idle-culler" not in hub_log  # the sessions service culls; no culler in the hub pod
    sessions_log = (logs / "sessions.log").read_text()
    # no NVML, no runtime.json in that pod: no GPU-idle culling, said once at start
    assert sessions_log.count("GPU utilisation from nowhere (no GPUs)") == 1, sessions_log[-2000:]
    for name in (
        "JPY_COOKIE_SECRET",
        "CONFIGPROXY_AUTH_TOKEN",
        "JUPYTERHUB_CRYPT_KEY",
        "WORKBENCH_GATEWAY_API_TOKEN",
        "WORKBENCH_SESSIONS_API_TOKEN",
        "WORKBENCH_QUOTA_API_TOKEN",
        "WORKBENCH_DEMO_PASSWORD",
    ):
        for log in ("hub.log", "guard.log", "quota.log", "sessions.log"):
            assert env[name] not in (logs / log).read_text(), f"{name} leaked into {log}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("deployment", ["gateway-api", "gateway-controller"])
def test_the_gateway_pods_load_their_configuration(production_objects, tmp_path, deployment):
    """The gateway API server and controller, started with the rendered Deployment's command line and
    environment, load hub_config/dask_gateway_config_k8s.py and configure the namespaced backend and
    controller (initialised only: running them needs a Kubernetes API)."""
    platform = tmp_path / "platform.yaml"
    platform.write_text(one(production_objects, "ConfigMap", f"{RELEASE}-platform")["data"]["platform.yaml"])
    dep = one(production_objects, "Deployment", f"{RELEASE}-{deployment}")
    [container] = dep["spec"]["template"]["spec"]["containers"]
    command = [a.replace("/opt/workbench/hub_config", str(ROOT / "hub_config")) for a in container["command"]]
    env = {**container_env(production_objects, f"{RELEASE}-{deployment}"), "WORKBENCH_PLATFORM": str(platform)}
    if deployment == "gateway-api":
        assert command[0] == "dask-gateway-server"
        app, argv = "dask_gateway_server.app.DaskGateway", command[1:]
        show = "type(app.backend).__name__, app.backend.watch_namespace, app.backend.gateway_instance, app.authenticator.jupyterhub_api_url"
        expected = f"NamespacedKubeBackend research {RELEASE}-gateway http://{RELEASE}-hub:8081/hub/api"
    else:
        assert command[:4] == ["python", "-m", "workbench.kubernetes", "kube-controller"]
        app, argv = "workbench.kubernetes.gateway.NamespacedKubeController", command[4:]
        show = "type(app).__name__, app.watch_namespace, app.gateway_instance, app.proxy_prefix, app.completed_cluster_max_age"
        expected = f"NamespacedKubeController research {RELEASE}-gateway /services/dask-gateway 86400.0"
    module, _, cls = app.rpartition(".")
    code = f"from {module} import {cls}\napp = {cls}.instance()\napp.initialize({argv!r})\nprint('APP', *({show}))\n"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKBENCH_", "JUPYTERHUB_"))}
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**base_env, **env}, capture_output=True, text=True, timeout=100, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("APP ")]
    assert line == f"APP {expected}"
