"""The hub pod's entry point, run for real: JupyterHub with hub_config/jupyterhub_config_k8s.py.

The platform YAML and the environment are taken from the rendered chart (its ConfigMap and the hub
Deployment's env, secrets resolved from the rendered Secret), as the kubelet would give them to the
container; configurable-http-proxy runs beside it as the chart's proxy pod does. Only what needs a
cluster differs: service host names become 127.0.0.1 with free ports, the in-cluster Kubernetes
credentials become a placeholder kube config (KubeSpawner is built at login and watches pods; nothing
answers), and no server is spawned.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from workbench.kube import _PLACEHOLDER_KUBECONFIG

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


@pytest.mark.timeout(120)
def test_the_hub_starts_from_the_charts_configmap_and_environment(default_objects, tmp_path):
    chp = shutil.which("configurable-http-proxy") or str(VENV_BIN / "configurable-http-proxy")
    if not Path(chp).exists():
        pytest.skip("configurable-http-proxy is not installed (make install puts it into .venv)")
    platform = tmp_path / "platform.yaml"
    platform.write_text(one(default_objects, "ConfigMap", f"{RELEASE}-platform")["data"]["platform.yaml"])
    env = container_env(default_objects, f"{RELEASE}-hub")
    public, api, hub = free_port(), free_port(), free_port()
    env.update(
        WORKBENCH_PLATFORM=str(platform),
        WORKBENCH_DB_URL=f"sqlite:///{tmp_path / 'jupyterhub.sqlite'}",
        WORKBENCH_PROXY_API_URL=f"http://127.0.0.1:{api}",
        WORKBENCH_HUB_CONNECT_URL=f"http://127.0.0.1:{hub}",
    )
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKBENCH_", "JUPYTERHUB_", "KUBECONFIG"))}
    base_env["PATH"] = f"{VENV_BIN}:{base_env.get('PATH', '')}"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(_PLACEHOLDER_KUBECONFIG)
    base_env["KUBECONFIG"] = str(kubeconfig)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []
    with open(logs / "chp.log", "w") as chp_log, open(logs / "hub.log", "w") as hub_log_file:
        _run(procs, chp, public, api, hub, base_env, env, tmp_path, logs, chp_log, hub_log_file)
    _check_logs(logs, env)


def _run(procs, chp, public, api, hub, base_env, env, tmp_path, logs, chp_log, hub_log_file):
    try:
        procs.append(
            subprocess.Popen(
                [chp, "--ip=127.0.0.1", f"--port={public}", "--api-ip=127.0.0.1", f"--api-port={api}",
                 f"--default-target=http://127.0.0.1:{hub}"],
                env={**base_env, "CONFIGPROXY_AUTH_TOKEN": env["CONFIGPROXY_AUTH_TOKEN"]},
                stdout=chp_log, stderr=subprocess.STDOUT,
            )
        )
        procs.append(
            subprocess.Popen(
                [str(VENV_BIN / "jupyterhub"), f"--config={ROOT / 'hub_config' / 'jupyterhub_config_k8s.py'}",
                 "--upgrade-db", f"--JupyterHub.hub_bind_url=http://127.0.0.1:{hub}"],
                env={**base_env, **env}, cwd=tmp_path,
                stdout=hub_log_file, stderr=subprocess.STDOUT,
            )
        )
        try:
            wait_for(f"http://127.0.0.1:{public}/hub/health", procs)
            page = wait_for(f"http://127.0.0.1:{public}/hub/login", procs).text
            assert "Workbench (try-out): log in with a demo account" in page

            session = requests.Session()
            session.get(f"http://127.0.0.1:{public}/hub/login")
            xsrf = session.cookies.get("_xsrf")
            form = {"username": "researcher", "password": env["WORKBENCH_DEMO_PASSWORD"], "_xsrf": xsrf}
            bad = session.post(f"http://127.0.0.1:{public}/hub/login", data={**form, "password": "wrong"}, allow_redirects=False)
            assert bad.status_code == 403
            ok = session.post(f"http://127.0.0.1:{public}/hub/login", data=form, allow_redirects=False)
            assert ok.status_code == 302, ok.text[:500]
            me = session.get(f"http://127.0.0.1:{public}/hub/api/user", headers={"X-XSRFToken": xsrf})
            assert me.status_code == 200
            assert me.json()["name"] == "researcher" and me.json()["groups"] == ["research-lab"]
        except BaseException:
            for name in ("hub.log", "chp.log"):
                print(f"--- {name}\n" + (logs / name).read_text()[-6000:])
            raise
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def _check_logs(logs, env):
    hub_log = (logs / "hub.log").read_text()
    assert "Using Spawner: workbench.kube.WorkbenchKubeSpawner" in hub_log
    assert "Using Authenticator: workbench.auth.DemoAuthenticator" in hub_log
    assert "Starting managed service idle-culler" in hub_log  # the culler runs in the hub pod
    for name in ("JPY_COOKIE_SECRET", "CONFIGPROXY_AUTH_TOKEN", "JUPYTERHUB_CRYPT_KEY", "WORKBENCH_GATEWAY_API_TOKEN",
                 "WORKBENCH_CULLER_API_TOKEN", "WORKBENCH_DEMO_PASSWORD"):
        assert env[name] not in hub_log, f"{name} leaked into the hub's log"


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
        assert command[:4] == ["python", "-m", "workbench.k8s_hub", "kube-controller"]
        app, argv = "workbench.k8s_hub.NamespacedKubeController", command[4:]
        show = "type(app).__name__, app.watch_namespace, app.gateway_instance, app.proxy_prefix, app.completed_cluster_max_age"
        expected = f"NamespacedKubeController research {RELEASE}-gateway /services/dask-gateway 86400.0"
    module, _, cls = app.rpartition(".")
    code = (
        f"from {module} import {cls}\napp = {cls}.instance()\napp.initialize({argv!r})\n"
        f"print('APP', *({show}))\n"
    )
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKBENCH_", "JUPYTERHUB_"))}
    proc = subprocess.run([sys.executable, "-c", code], env={**base_env, **env}, capture_output=True, text=True, timeout=100, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("APP ")]
    assert line == f"APP {expected}"
