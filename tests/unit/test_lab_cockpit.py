"""The cockpit's pure parts (workbench.lab.cockpit, workbench.serverinfo, workbench.spawnpage) and its degraded answer.

The degraded answer is computed with the services absent (a port nobody listens on): nothing of ours is
mocked; the real services are exercised by tests/browser/test_cockpit_browser.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from workbench.gpu_utilisation import FileUtilisation
from workbench.lab.cockpit import (
    NO_GPU,
    WorkbenchCockpit,
    budget_level,
    budgets_view,
    cluster_view,
    options_view,
    server_view,
)
from workbench.lab.notifications import WorkbenchNotifications
from workbench.policy import PolicyError, load_policy, parse_policy
from workbench.serverinfo import INFO_VAR, server_info, server_info_env
from workbench.spawnpage import form_html, profile_rows, template_vars

DEMO = Path(__file__).resolve().parents[2] / "hub_config" / "demo.yaml"

NOW = datetime(2026, 5, 4, 10, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def policy():
    return load_policy(DEMO)


def status(group, resource, used, limit, scope="group", exhausted=False):
    return {
        "group": group,
        "resource": resource,
        "scope": scope,
        "used_hours": used,
        "limit_hours": limit,
        "fraction": used / limit,
        "exhausted": exhausted,
        "resets_at": "2026-06-01T00:00:00Z",
        "period": {"kind": "month", "name": "2026-05"},
    }


# -- budgets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fraction", "exhausted", "warn_at", "level"),
    [
        (0.5, False, [0.8, 0.95], "ok"),
        (0.8, False, [0.8, 0.95], "warning"),
        (0.95, False, [0.8, 0.95], "critical"),
        (0.99, True, [0.8, 0.95], "critical"),
        (0.7, False, [0.6], "critical"),  # one level only: past it is critical
        (0.5, False, [0.6], "ok"),
        (1.2, False, [], "critical"),
    ],
)
def test_budget_levels_follow_warn_at(fraction, exhausted, warn_at, level):
    assert budget_level(fraction, exhausted, warn_at) == level


def test_budgets_are_grouped_gpu_first_group_before_the_users_share():
    usage = {
        "budgets": [
            status("physics-lab", "cpu", 10, 15, scope="user"),
            status("physics-lab", "cpu", 10, 20),
            status("physics-lab", "gpu", 9.6, 10),
            status("course-ml101", "cpu", 1, 10),
        ]
    }
    view = budgets_view(usage, {"physics-lab": [0.8, 0.95]})
    assert [g["group"] for g in view] == ["course-ml101", "physics-lab"]
    lab = view[1]
    assert [(b["resource"], b["scope"], b["level"]) for b in lab["budgets"]] == [
        ("gpu", "group", "critical"),
        ("cpu", "group", "ok"),
        ("cpu", "user", "ok"),
    ]
    assert lab["budgets"][0]["used_hours"] == 9.6 and lab["budgets"][0]["period"] == "2026-05"
    assert view[0]["warn_at"] == []  # unknown levels: the default 0.8/0.95


# -- the server's own facts ------------------------------------------------------------------


def test_server_info_of_a_gpu_profile_with_a_group_session_limit(policy):
    started = NOW
    info = server_info(policy, ["startup-acme"], "h100-x1", "embedded", started, ["GPU-1"])
    assert info["gpu"] == {
        "type": "h100",
        "display_name": policy.gpu_types["h100"].display_name or "h100",
        "count": 1,
        "resource": "nvidia.com/gpu",
        "mig": False,
        "devices": ["GPU-1"],
    }
    assert info["session"]["max_age"] == 8 * 3600
    assert info["session"]["ends_at"] == "2026-05-04T18:00:00Z"
    assert info["session"]["gpu_idle_timeout"] == 20 * 60
    assert info["charged_group"] == "startup-acme"
    assert info["warn_at"] == {"startup-acme": [0.8, 0.95]}


def test_server_info_env_carries_the_limits_and_turns_dask_labextension_to_the_gateway(policy):
    env = server_info_env(policy, ["course-ml101"], "mig-1g", "kubernetes", NOW)
    assert env["MEM_LIMIT"] == str(8 * 10**9) and env["CPU_LIMIT"] == "2"
    assert env["DASK_LABEXTENSION__USE_GATEWAY"] == "True"
    info = json.loads(env[INFO_VAR])
    assert info["engine"] == "kubernetes" and info["gpu"]["mig"] is True
    admins = server_info_env(policy, ["platform-admins"], "cpu-small", "embedded", NOW)
    assert "DASK_LABEXTENSION__USE_GATEWAY" not in admins  # no dask section: dask-labextension stays local
    with pytest.raises(ValueError, match="engine 'docker': use one of embedded, kubernetes, slurm"):
        server_info(policy, ["course-ml101"], "cpu-small", "docker")


def test_server_view_reads_the_environment_and_counts_the_session_down(policy):
    env = server_info_env(policy, ["startup-acme"], "h100-x1", "embedded", NOW, ["GPU-1"])
    env |= {"CUDA_VISIBLE_DEVICES": "GPU-1", "JUPYTERHUB_USER": "startup", "WORKBENCH_LIMITS": "cgroup v2"}
    view = server_view(env, NOW + timedelta(hours=7, minutes=30))
    assert view["user"] == "startup" and view["profile"] == "h100-x1" and view["engine"] == "embedded"
    assert view["gpu_devices"] == ["GPU-1"] and view["limits"] == "cgroup v2"
    assert view["session"]["seconds_left"] == 30 * 60
    bare = server_view({"WORKBENCH_PROFILE": "x", INFO_VAR: "not json"}, NOW)
    assert bare["profile"] == "x" and bare["gpu"] is None and bare["session"] == {}


# -- GPUs ----------------------------------------------------------------------------------------


def test_gpus_say_plainly_when_there_is_none_and_read_the_file_reader(tmp_path, policy):
    cockpit = WorkbenchCockpit(WorkbenchNotifications(token="t"), token="t")
    assert cockpit.gpus({"gpu": None, "gpu_devices": []}) == {"available": True, "devices": [], "message": NO_GPU}
    figures = tmp_path / "gpus.json"
    figures.write_text(json.dumps({"FAKE-0": {"utilisation": 37, "memory_used": 1, "memory_total": 4}, "FAKE-1": 5}))
    cockpit.gpu_utilisation_file = str(figures)
    doc = cockpit.gpus({"gpu": {"type": "h100"}, "gpu_devices": ["FAKE-0", "FAKE-1"]})
    assert doc["devices"] == [
        {"id": "FAKE-0", "utilisation": 37.0, "memory_used": 1, "memory_total": 4},
        {"id": "FAKE-1", "utilisation": 5.0, "memory_used": None, "memory_total": None},
    ]
    assert FileUtilisation(figures).utilisation(["FAKE-0", "FAKE-1", "nope"]) == {"FAKE-0": 37.0, "FAKE-1": 5.0}


# -- Dask ---------------------------------------------------------------------------------------


def test_cluster_view_counts_workers_from_the_schedulers_identity():
    model = {
        "name": "abc",
        "status": "RUNNING",
        "dashboard_route": "/clusters/abc/status",
        "start_time": 1_000_000,
        "options": {"worker_cores": 1, "environment": {"SECRET": "x"}},
    }
    identity = {"workers": {"tcp://a": {"nthreads": 1, "memory_limit": 2**30}, "tcp://b": {"nthreads": 2}}}
    view = cluster_view(model, identity, 1_060.0, "/hub-base/")
    assert (view["workers"], view["cores"], view["memory"], view["age_seconds"]) == (2, 3, 2**30, 60)
    assert view["dashboard_url"] == "/hub-base/services/dask-gateway/clusters/abc/status"
    assert view["options"] == {"worker_cores": 1}  # the environment is not shown
    pending = cluster_view({"name": "p", "status": "PENDING", "dashboard_route": None}, None, 0)
    assert pending["workers"] is None and pending["dashboard_url"] is None


def test_options_view_keeps_the_limits_and_leaves_out_the_environment():
    spec = {
        "cluster_options": [
            {
                "field": "worker_cores",
                "label": "Worker cores",
                "default": 1,
                "spec": {"type": "int", "min": 1, "max": 4},
            },
            {"field": "environment", "label": "Env", "default": {}, "spec": {"type": "mapping"}},
        ]
    }
    assert options_view(spec) == [
        {
            "field": "worker_cores",
            "label": "Worker cores",
            "type": "int",
            "default": 1,
            "min": 1,
            "max": 4,
            "options": None,
        }
    ]
    assert options_view(None) == [] and options_view({"cluster_options": "nonsense"}) == []


# -- degraded: the services are absent ---------------------------------------------------------------


def test_with_the_services_absent_each_part_says_so_and_the_server_part_stays(monkeypatch, policy):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    for k, v in server_info_env(policy, ["physics-lab"], "cpu-large", "embedded", NOW).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("JUPYTERHUB_USER", "researcher")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    url = f"http://127.0.0.1:{port}/services/"
    notifier = WorkbenchNotifications(services_url=url, token="t", timeout=2)
    cockpit = WorkbenchCockpit(notifier, token="t", timeout=2)
    doc = asyncio.run(cockpit.document())
    assert doc["server"]["profile"] == "cpu-large" and doc["server"]["user"] == "researcher"
    assert doc["budgets"] == {"available": False, "groups": []}
    assert doc["dask"] == {"available": False, "clusters": [], "options": []}
    assert doc["gpus"]["message"] == NO_GPU
    sources = sorted(p["source"] for p in doc["problems"])
    assert sources == ["dask-gateway", "quota", "sessions"], doc["problems"]
    assert all(p["message"].startswith("not reachable") for p in doc["problems"]), doc["problems"]


def test_without_a_hub_token_the_parts_say_this_server_is_not_under_jupyterhub():
    cockpit = WorkbenchCockpit(WorkbenchNotifications(token="", services_url="http://127.0.0.1:9/"), token="")
    doc = asyncio.run(cockpit.document())
    assert {p["message"] for p in doc["problems"]} == {"no hub token: this server does not run under JupyterHub"}


# -- the spawn page ------------------------------------------------------------------------------------


def test_spawn_page_rows_disable_what_cannot_start_and_say_why(policy):
    budgets = [status("startup-acme", "gpu", 100, 100, exhausted=True)]
    rows = {r["name"]: r for r in profile_rows(policy, ["startup-acme"], {"h100": 0}, budgets)}
    assert rows["cpu-small"]["can_start"] and rows["cpu-small"]["session_limit"] == 8 * 3600
    h100 = rows["h100-x1"]
    assert not h100["can_start"]
    assert "no free GPU of type" in h100["reason"] and "(0 free, 1 needed)" in h100["reason"]
    assert "the GPU budget of startup-acme is spent (resets 2026-06-01)" in h100["reason"]
    # a spent GPU budget leaves CPU profiles alone
    assert rows["cpu-small"]["reason"] == ""
    # unknown availability (Kubernetes: the scheduler decides) and no budgets known: enabled
    assert all(r["can_start"] for r in profile_rows(policy, ["startup-acme"], None, None))


def test_spawn_page_form_shows_cost_and_what_is_left_and_escapes(policy):
    budgets = [status("physics-lab", "gpu", 9.5, 10), status("physics-lab", "cpu", 5, 20)]
    rows = profile_rows(policy, ["physics-lab"], {"h100": 1}, budgets)
    html = form_html(rows, problem="<b>down</b>")
    assert "&lt;b&gt;down&lt;/b&gt;" in html and "<b>down</b>" not in html
    assert "1 GPU-hours per hour (0.5 left in physics-lab&#x27;s budget: 0.5 h of this)" in html
    assert "8 CPU-hours per hour (15.0 left in physics-lab&#x27;s budget: 1.9 h of this)" in html
    assert html.count(" checked") == 1 and " disabled" not in html


def test_branding_is_validated_and_reaches_the_templates():
    data = yaml.safe_load(DEMO.read_text())
    assert template_vars(parse_policy(data)) == {
        "workbench_branding": {"name": data.get("name", "Workbench"), "logo_url": ""}
    }
    data["branding"] = {"name": "Example Computing Centre", "logo_url": "/hub/static/logo.png"}
    assert template_vars(parse_policy(data))["workbench_branding"]["logo_url"] == "/hub/static/logo.png"
    data["branding"]["logo_url"] = "javascript:alert(1)"
    with pytest.raises(PolicyError) as e:
        parse_policy(data, "platform.yaml")
    assert "branding.logo_url: must be an https:// URL or a path on the hub's own site starting with '/'" in str(
        e.value
    )
    data["branding"] = {"name": ""}
    with pytest.raises(PolicyError, match="branding.name"):
        parse_policy(data, "platform.yaml")


def test_a_kubernetes_pod_carries_the_server_facts_and_its_node():
    from workbench.spawn.kube import render_pod

    centre = load_policy(Path(__file__).resolve().parents[2] / "hub_config" / "examples" / "centre.yaml")
    pod = render_pod(centre, "ada", ["climate-lab"], "a100-x1")
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["WORKBENCH_NODE"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["WORKBENCH_ENGINE"]["value"] == "kubernetes"
    assert env["MEM_LIMIT"]["value"] == str(
        centre.profiles["a100-x1"].memory_limit or centre.profiles["a100-x1"].memory
    )
    info = json.loads(env["WORKBENCH_SERVER_INFO"]["value"])
    assert (info["profile"], info["gpu"]["type"], info["charged_group"]) == ("a100-x1", "a100", "climate-lab")
