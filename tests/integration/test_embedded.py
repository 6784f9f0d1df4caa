"""The embedded workbench end to end, with real processes only (no mocks).

hub + configurable-http-proxy + JupyterLab single-user servers + dask-gateway-server (local
backend) + idle culler, all started by `workbench up` on free ports.

The full flow runs `workbench up` as `make up` does (its default: each user's server on its own origin,
``http://<user>.localhost:<port>/user/<user>/``, reached through tests/conftest.py's ``*.localhost`` resolver);
the other tests share ``demo_wb`` (tests/integration/conftest.py, ``--no-subdomains``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import psutil
import pytest
import requests

from workbench.sysusers import USER_PREFIX

from .harness import PASSWORD, VENV_BIN, Workbench, state_dir

pytestmark = pytest.mark.integration


@pytest.fixture
def wb(default_wb):
    """The shared default workbench (tests/integration/conftest.py)."""
    return default_wb


def server_process(w: Workbench, username: str) -> psutil.Process:
    return w.server_process(username)


def test_full_flow_login_server_gateway_xarray_and_clean_stop():
    w = Workbench(state_dir(), subdomains=True).start()
    try:
        out = w.output()
        assert f"Workbench is ready:  http://localhost:{w.port}/" in out
        assert f"(http://127.0.0.1:{w.port}/ redirects to http://localhost:{w.port}/" in out
        for name in ("researcher", "instructor", "student1", "student2", "startup", "admin"):
            assert name in out, f"demo login {name} not printed"

        # log in through the login form
        s = w.login("researcher")
        assert s.login_status == 302, s.login_status
        token = w.new_token(s, "researcher")

        # start the server through the REST API and reach JupyterLab through the proxy
        w.start_server(token, "researcher")
        auth = {"Authorization": f"token {token}"}
        assert w.server_url("researcher") == f"http://researcher.localhost:{w.port}/user/researcher/"
        r = requests.get(f"{w.server_url('researcher')}lab", headers=auth, timeout=30)
        assert r.status_code == 200 and "JupyterLab" in r.text, r.status_code
        status = requests.get(f"{w.server_url('researcher')}api/status", headers=auth, timeout=30)
        assert status.status_code == 200, status.text

        proc = server_process(w, "researcher")
        expected_user = f"{USER_PREFIX}researcher"
        assert proc.username() == expected_user
        env = proc.environ()
        assert env["DASK_GATEWAY__ADDRESS"] == f"{w.url}/services/dask-gateway"
        assert env["DASK_GATEWAY__AUTH__TYPE"] == "jupyterhub"
        home = Path(env["HOME"])
        # the starter notebook for a research group is in the home folder
        assert (home / "climatology-with-dask.ipynb").exists()

        # `Gateway()` with no arguments, as in a notebook: the server's own environment and token
        probe = subprocess.run(
            [
                str(VENV_BIN / "python"),
                "-c",
                "from dask_gateway import Gateway; g = Gateway(); print('clusters', len(g.list_clusters()))",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            user=expected_user,
        )
        assert probe.returncode == 0 and "clusters 0" in probe.stdout, probe.stderr

        # a Dask Gateway cluster with the user's token through the hub's proxy
        gw = w.gateway(token)
        cluster = gw.new_cluster()
        try:
            cluster.scale(2)
            client = cluster.get_client()
            client.wait_for_workers(2, timeout=180)
            w.snapshot()
            users = set(client.run(lambda: __import__("getpass").getuser()).values())
            assert users == {expected_user}

            import dask.array as da
            import xarray as xr

            data = np.arange(24 * 10 * 8, dtype=float).reshape(24, 10, 8)
            arr = xr.DataArray(
                da.from_array(data, chunks=(6, 10, 8)),
                dims=("time", "lat", "lon"),
                coords={"time": np.arange(24) % 12},
            )
            monthly = arr.groupby("time").mean().mean("lon").compute()
            expected = np.stack([data[[m, m + 12]].mean(axis=0).mean(axis=-1) for m in range(12)])
            np.testing.assert_allclose(monthly.values, expected)
            assert float(arr.sum().compute()) == data.sum()
            client.close()
        finally:
            cluster.shutdown()
        assert gw.list_clusters() == []
        gw.close()

        w.stop_server(token, "researcher")
        with pytest.raises(psutil.NoSuchProcess):
            psutil.Process(proc.pid).status()
    finally:
        w.snapshot()
        code = w.stop()
    assert code == 0, w.output()
    assert "stopped; no processes left behind" in w.output()
    assert w.leftovers() == []
    # every process of the user's account is gone
    owned = [p.pid for p in psutil.process_iter(["username"]) if p.info["username"] == f"{USER_PREFIX}researcher"]
    assert owned == []


def test_other_user_cannot_reach_server_or_cluster(wb):
    owner = wb.login("researcher")
    owner_token = wb.new_token(owner, "researcher")
    wb.start_server(owner_token, "researcher")
    cluster = wb.gateway(owner_token).new_cluster()
    other = wb.login("student1")
    other_token = wb.new_token(other, "student1")
    try:
        wb.start_server(other_token, "student1")
        hdr = {"Authorization": f"token {other_token}"}
        # the server knows the token's owner and refuses them (it needs access:servers!user=researcher)
        r = requests.get(f"{wb.url}/user/researcher/api/status", headers=hdr, timeout=30)
        assert r.status_code == 403, r.status_code
        r = requests.get(f"{wb.url}/user/researcher/lab", headers=hdr, timeout=30, allow_redirects=False)
        assert r.status_code == 403, (r.status_code, r.headers.get("Location"))
        assert "JupyterLab" not in r.text
        # the hub hides the user from them, and so refuses to start the user's server as "not found"
        assert wb.token_api(other_token, "GET", "/users/researcher").status_code == 404
        r = wb.token_api(other_token, "POST", "/users/researcher/server")
        assert r.status_code == 404, (r.status_code, r.text)
        assert "No access to resources or resources not found" in r.text

        other_gw = wb.gateway(other_token)
        assert [c.name for c in other_gw.list_clusters()] == []
        with pytest.raises(aiohttp.ClientResponseError) as refused:
            other_gw.connect(cluster.name)
        assert refused.value.status == 403, refused.value
        with pytest.raises(aiohttp.ClientResponseError) as refused:
            other_gw.stop_cluster(cluster.name)
        assert refused.value.status == 403, refused.value
        other_gw.close()
        # the client keeps only the status line ("Forbidden"); the gateway's body says why
        api = f"{wb.url}/services/dask-gateway/api/v1/clusters/{cluster.name}"
        as_other = {"Authorization": f"jupyterhub {other_token}"}
        r = requests.get(api, headers=as_other, timeout=30)
        assert r.status_code == 403 and f"User student1 lacks permissions to view cluster {cluster.name}" in r.text
        r = requests.delete(api, headers=as_other, timeout=30)
        assert r.status_code == 403 and f"User student1 lacks permissions to stop cluster {cluster.name}" in r.text
        # the owner's view, over plain HTTP: starting yet another dask-gateway client loop here has been
        # seen to deadlock inside distributed's LoopRunner start
        listed = requests.get(
            f"{wb.url}/services/dask-gateway/api/v1/clusters/",
            headers={"Authorization": f"jupyterhub {owner_token}"},
            timeout=30,
        ).json()
        assert list(listed) == [cluster.name]

        # homes are private
        probe = subprocess.run(
            ["ls", f"/home/{USER_PREFIX}researcher"], user=f"{USER_PREFIX}student1", capture_output=True, text=True
        )
        assert probe.returncode != 0 and "Permission denied" in probe.stderr
    finally:
        cluster.shutdown()
        wb.stop_server(other_token, "student1")
        wb.stop_server(owner_token, "researcher")


def test_gateway_refuses_token_without_gateway_scope(wb):
    s = wb.login("researcher")
    full = wb.new_token(s, "researcher")
    limited = wb.new_token(s, "researcher", scopes=["read:users!user"])
    url = f"{wb.url}/services/dask-gateway/api/v1/clusters/"
    ok = requests.get(url, headers={"Authorization": f"jupyterhub {full}"}, timeout=30)
    assert ok.status_code == 200, ok.text
    denied = requests.get(url, headers={"Authorization": f"jupyterhub {limited}"}, timeout=30)
    assert denied.status_code in (401, 403), denied.status_code
    with wb.gateway(limited) as gw, pytest.raises(Exception, match="401|403"):
        gw.list_clusters()


def test_group_without_dask_policy_has_no_gateway_access(demo_gpus_wb):
    """Gateway access is granted by role to groups whose policy has a `dask` section, and only to them.

    On the shared workbench ``demo_gpus_wb`` (tests/conftest.py): ``nodask``'s group ``lab-nodask`` has no dask
    section, the researcher's ``physics-lab`` has one."""
    w = demo_gpus_wb
    url = f"{w.url}/services/dask-gateway/api/v1/clusters/"
    nodask = w.new_token(w.login("nodask"), "nodask")
    r = requests.get(url, headers={"Authorization": f"jupyterhub {nodask}"}, timeout=30)
    # dask_gateway_server.auth.JupyterHubAuthenticator: a valid token without access:services!service=dask-gateway
    # is answered like no token at all, 401
    assert r.status_code == 401, r.status_code
    researcher = w.new_token(w.login("researcher"), "researcher")
    r = requests.get(url, headers={"Authorization": f"jupyterhub {researcher}"}, timeout=30)
    assert r.status_code == 200


def test_wrong_password_and_unknown_user_are_refused(wb):
    assert wb.login("researcher", "not-the-password").login_status == 403
    assert wb.login("mallory", PASSWORD).login_status == 403


def _run_up(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "workbench"), "up", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, WORKBENCH_DEMO_PASSWORD=PASSWORD),
    )


def test_broken_yaml_fails_fast_naming_file_field_and_fix(tmp_path):
    bad = tmp_path / "platform.yaml"
    text = Path(__file__).resolve().parents[2].joinpath("hub_config/demo.yaml").read_text()
    bad.write_text(text.replace("profiles: [cpu-large, h100-x1]", "profiles: [cpu-large, h200-x8]"))
    state = tmp_path / "state"
    t0 = time.monotonic()
    res = _run_up("--config", str(bad), "--state-dir", str(state), "--port", "0")
    assert time.monotonic() - t0 < 20
    assert res.returncode == 2
    assert str(bad) in res.stderr
    assert "groups.physics-lab.profiles[1]" in res.stderr
    assert "unknown profile 'h200-x8'" in res.stderr and "cpu-large" in res.stderr
    assert not state.exists(), "nothing may start (or be written) for a broken policy"


def test_yaml_syntax_error_names_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("groups:\n  physics-lab: {kind: research\n")
    res = _run_up("--config", str(bad), "--state-dir", str(tmp_path / "s"))
    assert res.returncode == 2
    assert str(bad) in res.stderr and "not valid YAML at line" in res.stderr


def test_demo_auth_refused_on_network_bind_without_flag(tmp_path):
    res = _run_up("--bind", "0.0.0.0", "--state-dir", str(tmp_path / "s"), "--port", "0")
    assert res.returncode == 2
    assert "--allow-demo-auth-on-network" in res.stderr and "0.0.0.0" in res.stderr
    assert not (tmp_path / "s").exists()


def test_demo_auth_cannot_be_exposed_by_starting_the_hub_config_directly(tmp_path):
    """Even bypassing `workbench up`, the hub config refuses demo auth on a network address."""
    from workbench.runtime import Runtime

    state = tmp_path / "state"
    state.mkdir()
    rt = Runtime(
        config=str(Path(__file__).resolve().parents[2] / "hub_config/demo.yaml"),
        state_dir=str(state),
        hub_config_dir="x",
        venv_bin=str(VENV_BIN),
        proxy_command="chp",
        bind="0.0.0.0",
    )
    path = rt.write()
    res = subprocess.run(
        [
            str(VENV_BIN / "jupyterhub"),
            "-f",
            str(Path(__file__).resolve().parents[2] / "hub_config/jupyterhub_config.py"),
            "--JupyterHub.db_url=sqlite://",
        ],
        env=dict(os.environ, WORKBENCH_RUNTIME=str(path)),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=state,
    )
    assert res.returncode != 0
    assert "--allow-demo-auth-on-network" in res.stderr + res.stdout


def test_researcher_starter_notebook_runs_in_their_server_environment(wb):
    """The starter notebook as the researcher would run it: their account, their server's environment
    (so `Gateway()` has no arguments), a real adaptive cluster; then the cluster is gone."""
    import json

    token = wb.new_token(wb.login("researcher"), "researcher")
    # a home left by an earlier run keeps its (older) copy: starters never overwrite
    home = wb.home("researcher")
    (home / "climatology-with-dask.ipynb").unlink(missing_ok=True)
    wb.start_server(token, "researcher")
    try:
        env = server_process(wb, "researcher").environ()
        home = Path(env["HOME"])
        res = subprocess.run(
            [
                str(VENV_BIN / "jupyter"),
                "nbconvert",
                "--to",
                "notebook",
                "--execute",
                "--ExecutePreprocessor.timeout=300",
                "--output",
                "executed.ipynb",
                "climatology-with-dask.ipynb",
            ],
            cwd=home,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
            user=f"{USER_PREFIX}researcher",
        )
        assert res.returncode == 0, res.stderr[-3000:]
        nb = json.loads((home / "executed.ipynb").read_text())
        outputs = [
            "".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
            for c in nb["cells"]
            if c["cell_type"] == "code"
            for o in c["outputs"]
        ]
        assert any("dashboard:" in o for o in outputs)
        table = next(o for o in outputs if o.startswith("lat") or "month" in o.splitlines()[0])
        rows = [line.split() for line in table.splitlines()[2:]]
        assert [int(r[0]) for r in rows] == list(range(1, 13))
        south, equator, north = zip(*[(float(r[1]), float(r[2]), float(r[3])) for r in rows])
        # opposite seasons in each hemisphere, warm equator
        assert north[6] > north[0] + 15 and south[0] > south[6] + 15
        assert min(equator) > max(north[0], south[6])
        with wb.gateway(token) as gw:
            assert gw.list_clusters() == []
    finally:
        wb.stop_server(token, "researcher")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
