"""README claim: on the Slurm backend, a user's Dask cluster (its Slurm jobs) is cancelled when their notebook
server stops, when the server is culled, when their budget runs out, and when `workbench up` stops.

One real `workbench up --gateway-backend slurm` on the real one-node Slurm (`make slurm`; started here when
`sinfo` does not answer, as test_slurm.py does), shared by the module. Each case has its own user and
Unix account (``wb-sq-…``), so the jobs checked with ``squeue -u`` are that case's only, whatever else runs on
the shared Slurm. Nothing is mocked. The last test stops `workbench up` itself.

Fixtures (module): ``slurm`` (a Slurm that answers), ``wb`` (the workbench), ``tokens`` (API tokens).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import requests
import yaml

from workbench.sysusers import USER_PREFIX

from .harness import DEMO, REPO, Workbench, state_dir

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the Slurm backend submits jobs as per-user accounts: needs root"),
]

DASK = {
    "max_cores": 2,
    "max_memory": "4G",
    "max_workers": 1,
    "max_clusters": 1,
    "worker_max_cores": 1,
    "worker_max_memory": "1G",
    "slurm": {"partition": "cpu", "account": "claims", "walltime": "1h"},
}
GRACE = 5  # seconds: the budget case waits for the stop itself, not for a window


def slurm_env() -> dict:
    """The environment of Slurm's commands here: the cluster at the default path (as the gateway's)."""
    return {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}


def sinfo_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15, env=slurm_env())
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0 and any(
        s.startswith(("idle", "mix", "alloc")) and "*" not in s for s in res.stdout.split()
    )


@pytest.fixture(scope="module")
def slurm():
    if not sinfo_answers():
        res = subprocess.run([str(REPO / "scripts/slurm-up.sh")], capture_output=True, text=True, timeout=600)
        if res.returncode != 0 or not sinfo_answers():
            pytest.fail(f"no usable Slurm cluster (run `make slurm` as root):\n{res.stdout}\n{res.stderr}")


def jobs_of(user: str) -> list[str]:
    """``squeue`` lines (id, name, state) of the Unix account of hub user ``user``, in any state."""
    res = subprocess.run(
        ["squeue", "-h", "-u", f"{USER_PREFIX}{user}", "-o", "%i|%j|%T"],
        capture_output=True,
        text=True,
        timeout=30,
        env=slurm_env(),
    )
    if res.returncode != 0 and "Invalid user" in res.stderr:
        return []  # no such account (yet): no job either
    assert res.returncode == 0, res.stderr
    return [line for line in res.stdout.splitlines() if line.strip()]


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def policy_data() -> dict:
    data = yaml.safe_load(DEMO.read_text())
    data["culling"] = {"timeout": "1h", "every": "2s"}
    data["profiles"]["cpu-cull"] = {"cpu": 1, "memory": "1G", "image": "base", "idle_timeout": "30s"}
    users = data["auth"]["demo_users"]
    for case in ("stop", "cull", "budget", "up"):
        users[f"sq-{case}"] = {"groups": [f"sq-{case}"]}
        data["groups"][f"sq-{case}"] = {"kind": "research", "profiles": ["cpu-small"], "dask": DASK}
    data["groups"]["sq-cull"]["profiles"] = ["cpu-cull"]
    data["groups"]["sq-budget"]["budget"] = {"cpu_hours": 5, "period": "month", "grace": f"{GRACE}s"}
    return data


@pytest.fixture(scope="module")
def wb(slurm):
    for case in ("stop", "cull", "budget", "up"):
        assert jobs_of(f"sq-{case}") == [], f"{USER_PREFIX}sq-{case} already has Slurm jobs; cancel them first"
    sd = state_dir("wb-it-claims-slurm-")
    config = sd.parent / "platform.yaml"
    config.write_text(yaml.safe_dump(policy_data()))
    w = Workbench(sd, config=config, extra_args=("--gateway-backend", "slurm", "--quota-every", "2")).start()
    yield w
    code = w.stop()  # the last test stopped it already (then: its exit code again)
    assert code == 0, w.output()[-3000:]
    assert not w.leftovers(), w.leftovers()
    for case in ("stop", "cull", "budget", "up"):
        wait_for(lambda c=case: jobs_of(f"sq-{c}") == [], 60, f"no job of {USER_PREFIX}sq-{case} after the module")


@pytest.fixture(scope="module")
def tokens(wb):
    return {name: wb.new_token(wb.login(name), name) for name in ("sq-stop", "sq-cull", "sq-budget", "sq-up")}


def server(wb: Workbench, token: str, user: str) -> dict | None:
    return wb.token_api(token, "GET", f"/users/{user}").json().get("servers", {}).get("")


def running_cluster(wb: Workbench, token: str, user: str) -> str:
    """A cluster kept alive by nothing but the platform (``shutdown_on_close=False``); its scheduler is a running
    Slurm job of the user's account. Returns the cluster's name."""
    with wb.gateway(token) as gw:
        cluster = gw.new_cluster(shutdown_on_close=False)
        name = cluster.name
        cluster.close()
    jobs = wait_for(lambda: [j for j in jobs_of(user) if j.endswith("|RUNNING")], 120, f"{user}'s scheduler job")
    assert [j.split("|")[1] for j in jobs] == ["dask-scheduler"], jobs
    return name


def test_the_jobs_are_cancelled_when_the_server_stops(wb, tokens):
    token = tokens["sq-stop"]
    wb.start_server(token, "sq-stop")
    running_cluster(wb, token, "sq-stop")
    wb.stop_server(token, "sq-stop")
    wait_for(lambda: jobs_of("sq-stop") == [], 120, "the cluster's Slurm jobs to leave the queue")
    assert "Stopped 1 Dask cluster(s) of sq-stop with their server" in wb.hub_log()


def test_the_jobs_are_cancelled_when_the_server_is_culled(wb, tokens):
    token = tokens["sq-cull"]
    wb.start_server(token, "sq-cull", profile="cpu-cull")
    running_cluster(wb, token, "sq-cull")
    # nobody uses the server: the sessions service culls it at its profile's idle_timeout (30 s)
    wait_for(lambda: server(wb, token, "sq-cull") is None, 180, "the sessions service to cull the server")
    wait_for(lambda: jobs_of("sq-cull") == [], 120, "the cluster's Slurm jobs to leave the queue")
    assert "Stopped 1 Dask cluster(s) of sq-cull with their server" in wb.hub_log()


def test_the_jobs_are_cancelled_when_the_budget_runs_out(wb, tokens):
    token = tokens["sq-budget"]
    name = running_cluster(wb, token, "sq-budget")
    secrets = json.loads((wb.state_dir / "secrets.json").read_text())
    quota = f"{wb.url}/services/quota/api"
    used = requests.get(
        f"{quota}/usage/groups/sq-budget", headers={"Authorization": f"token {token}"}, timeout=30
    ).json()["usage"]["cpu_hours"]
    stop = datetime.now(UTC) - timedelta(seconds=5)
    item = f"dask-worker:earlier/{uuid.uuid4().hex}"
    start = {"type": "start", "item": item, "kind": "dask-worker", "user": "sq-budget", "group": "sq-budget"}
    events = [  # usage the group already had: a minute of cores that spends the rest of the budget and a bit
        {"id": f"s-{item}", **start, "time": (stop - timedelta(seconds=60)).isoformat(), "cpu": (5 - used) * 60 + 1},
        {"id": f"e-{item}", "type": "stop", "item": item, "time": stop.isoformat()},
    ]
    r = requests.post(
        f"{quota}/events",
        json={"events": events},
        headers={"Authorization": f"token {secrets['gateway_api_token']}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    wait_for(lambda: jobs_of("sq-budget") == [], GRACE + 180, "the gateway to stop the cluster of the spent budget")
    assert f"Stopping cluster {name}" in wb.hub_log() and "budget of group sq-budget is spent" in wb.hub_log()


def test_the_jobs_are_cancelled_when_workbench_up_stops(wb, tokens):
    token = tokens["sq-up"]
    running_cluster(wb, token, "sq-up")
    assert wb.stop() == 0, wb.output()[-3000:]  # SIGTERM, as Ctrl-C
    wait_for(lambda: jobs_of("sq-up") == [], 120, "the cluster's Slurm jobs to leave the queue")
