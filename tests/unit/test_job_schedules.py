"""Scheduled jobs (workbench.jobs.schedules) and the JupyterLab backend's pure parts (workbench.jobs.scheduler)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from jupyter_scheduler.exceptions import SchedulerError
from jupyter_scheduler.models import Status

from workbench.jobs import scheduler as lab
from workbench.jobs.model import JobError
from workbench.jobs.schedules import (
    DefinitionStore,
    ScheduleError,
    check_schedule,
    check_timezone,
    definition_changes,
    definition_doc,
    next_time,
    run_due,
)

REPO = Path(__file__).resolve().parents[2]


def at(*args) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    "expr, words",
    [
        ("0 3 * *", ["schedule:", "has 4 fields", "five", "'0 3 * * *'"]),
        ("61 3 * * *", ["schedule:", "not a valid cron expression", "minute 0-59", "'0 3 * * *'"]),
        ("", ["schedule:", "five fields", "'0 3 * * *'"]),
        (None, ["schedule:", "'0 3 * * *'"]),
        ("0 3 * * * *", ["schedule:", "has 6 fields"]),
    ],
)
def test_bad_schedules_name_the_field_and_give_an_example(expr, words):
    with pytest.raises(ScheduleError) as e:
        check_schedule(expr)
    for w in words:
        assert w in str(e.value)


def test_good_schedules_are_normalised_and_time_zones_checked():
    assert check_schedule("  0   3 * * 1-5 ") == "0 3 * * 1-5"
    assert check_timezone(None) == "UTC"
    assert check_timezone("Europe/Zurich") == "Europe/Zurich"
    with pytest.raises(ScheduleError, match=r"timezone: 'Mars/Olympus' is not a known time zone.*Europe/Zurich"):
        check_timezone("Mars/Olympus")


def test_next_time_follows_the_time_zone():
    after = at(2026, 1, 10, 12, 0)
    assert next_time("0 3 * * *", "UTC", after) == at(2026, 1, 11, 3, 0)
    # 03:00 in Zurich (UTC+1 in January) is 02:00 UTC
    assert next_time("0 3 * * *", "Europe/Zurich", after) == at(2026, 1, 11, 2, 0)
    assert next_time("*/30 * * * *", "UTC", at(2026, 1, 10, 12, 0)) == at(2026, 1, 10, 12, 30)


REQUEST = {"notebook": "calc.ipynb", "profile": "cpu-small", "parameters": {"n": 3}, "time": 3600, "name": "calc"}


def test_a_due_definition_runs_once_per_due_time_and_a_refusal_is_recorded(tmp_path):
    store = DefinitionStore(tmp_path / "s.sqlite")
    assert (tmp_path / "s.sqlite").stat().st_mode & 0o777 == 0o600
    d = store.add("researcher", REQUEST, "0 3 * * *", "UTC", now=at(2026, 1, 10, 12, 0))
    assert d["next_run"] == at(2026, 1, 11, 3, 0)
    calls = []

    async def submit(defn):
        calls.append(defn["id"])
        return {"id": f"job{len(calls)}"}

    assert asyncio.run(run_due(store, submit, now=at(2026, 1, 11, 2, 59))) == []
    assert asyncio.run(run_due(store, submit, now=at(2026, 1, 11, 3, 0, 5))) == ["job1"]
    assert asyncio.run(run_due(store, submit, now=at(2026, 1, 11, 3, 0, 30))) == []  # same due time: once
    assert store.get(d["id"])["next_run"] == at(2026, 1, 12, 3, 0)
    assert store.jobs_of(d["id"]) == ["job1"]
    assert store.definition_of(["job1", "other"]) == {"job1": d["id"]}

    async def refuse(defn):
        raise RuntimeError("budget of physics-lab is spent")

    assert asyncio.run(run_due(store, refuse, now=at(2026, 1, 12, 3, 1))) == []
    row = store.get(d["id"])
    assert row["last_error"] == "budget of physics-lab is spent"
    assert row["next_run"] == at(2026, 1, 13, 3, 0)  # the next time still comes
    doc = definition_doc(row, store.jobs_of(d["id"]))
    assert doc["last_error"] == "budget of physics-lab is spent" and doc["jobs"] == ["job1"]
    assert doc["next_run"] == "2026-01-13T03:00:00Z" and doc["parameters"] == {"n": 3}

    store.update(d["id"], **definition_changes(row, {"active": False}, at(2026, 1, 12, 4, 0)))
    assert asyncio.run(run_due(store, submit, now=at(2026, 1, 20))) == []  # paused
    assert definition_doc(store.get(d["id"]))["next_run"] is None


def test_definition_changes_are_checked():
    row = {"schedule": "0 3 * * *", "timezone": "UTC"}
    with pytest.raises(ScheduleError, match="schedule:"):
        definition_changes(row, {"schedule": "every day"}, 0)
    with pytest.raises(JobError, match="notebook: cannot be changed"):
        definition_changes(row, {"notebook": "x.ipynb"}, 0)
    with pytest.raises(JobError, match="active: true or false"):
        definition_changes(row, {"active": "yes"}, 0)
    values = definition_changes(row, {"schedule": "0 4 * * *"}, at(2026, 1, 10, 12, 0))
    assert values == {"schedule": "0 4 * * *", "next_run": at(2026, 1, 11, 4, 0)}


# ---------------------------------------------------------------------------
# workbench.jobs.scheduler: jupyter-scheduler's models from the service's documents
# ---------------------------------------------------------------------------


def test_time_limits_offered_stop_at_the_groups_limit():
    assert lab.time_choices(8 * 3600) == ["30m", "1h", "2h", "4h", "8h"]
    assert lab.time_choices(90 * 60) == ["30m", "1h", "90m"]


def test_ids_parameters_and_notebook_paths():
    assert lab.service_id("wb-0123abcd") == "0123abcd"
    assert lab.service_id("wbdef-00ff", lab.DEFINITION_PREFIX) == "00ff"
    with pytest.raises(SchedulerError):
        lab.service_id("wb-../etc")
    assert lab.form_parameters({"n": "3", "name": "run 1", "flag": "true"}) == {"n": 3, "name": "run 1", "flag": True}
    with pytest.raises(SchedulerError, match="parameter 'my-lr': not a Python variable name"):
        lab.form_parameters({"my-lr": "0.1"})
    assert lab.notebook_in_home("/home/u", "work/a.ipynb", "/home/u") == "work/a.ipynb"
    assert lab.notebook_in_home("/home/u/work", "a.ipynb", "/home/u") == "work/a.ipynb"
    with pytest.raises(SchedulerError, match="notebook: ../x.ipynb is outside your home"):
        lab.notebook_in_home("/home/u", "../x.ipynb", "/home/u")


def doc(state: str, **kw) -> dict:
    return {
        "id": "00aa11bb22cc",
        "name": "calc",
        "folder": "jobs/calc/20260110-120000-00aa11",
        "notebook": "work/calc.ipynb",
        "profile": "cpu-small",
        "group": "physics-lab",
        "parameters": {"n": 3, "label": "x"},
        "state": state,
        "reason": "",
        "time_limit": 7200,
        "submitted": "2026-01-10T12:00:00Z",
        "started": "2026-01-10T12:00:05Z" if state != "queued" else None,
        "ended": "2026-01-10T12:01:05Z" if state in ("completed", "failed", "cancelled", "timeout") else None,
        "exit_code": 0 if state == "completed" else None,
        **kw,
    }


def test_service_jobs_become_jupyter_scheduler_jobs_with_links_into_the_home(tmp_path):
    s = lab.WorkbenchScheduler(root_dir=str(tmp_path), environments_manager=lab.WorkbenchEnvironments(), db_url="")
    s.home = str(tmp_path)
    queued = s.describe(doc("queued", reason="Slurm: Resources"))
    assert queued.job_id == "wb-00aa11bb22cc" and queued.status == Status.QUEUED
    assert queued.status_message == "Slurm: Resources" and queued.compute_type == "2h"
    assert queued.parameters == {"n": "3", "label": "x"} and queued.job_files[0].file_path is None
    assert not queued.downloaded
    done = doc("completed", definition="ffee")
    assert s.describe(done).job_files[0].file_path is None  # the executed notebook is not there yet
    out = tmp_path / "jobs/calc/20260110-120000-00aa11/calc.ipynb"
    out.parent.mkdir(parents=True)
    out.write_text("{}")
    job = s.describe(done)
    assert job.status == Status.COMPLETED and job.downloaded
    assert job.job_files[0].file_path == "jobs/calc/20260110-120000-00aa11/calc.ipynb"
    assert job.job_files[1].file_path == "work/calc.ipynb"
    assert job.job_definition_id == "wbdef-ffee"
    assert job.end_time - job.start_time == 60_000
    assert s.describe(doc("cancelled")).status == Status.STOPPED
    timed_out = s.describe(doc("timeout"))
    assert timed_out.status == Status.FAILED and "time limit reached (2h)" in timed_out.status_message


SERVER_PROBE = """
from jupyter_server.serverapp import ServerApp
app = ServerApp()
app.initialize(["--ServerApp.port=0", "--ServerApp.open_browser=False", "--ServerApp.root_dir=" + ROOT])
s = app.web_app.settings
print("PROBE", type(s["scheduler"]).__name__, type(s["environments_manager"]).__name__, type(s["job_files_manager"]).__name__)
"""


def test_jupyter_servers_of_this_environment_load_the_workbench_backend(tmp_path):
    """jupyter-scheduler reads its own config file (jupyter_jupyter_scheduler_config.json), not config.d."""
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path), "HOME": str(tmp_path)}
    code = SERVER_PROBE.replace("ROOT", repr(str(tmp_path)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "PROBE WorkbenchScheduler WorkbenchEnvironments WorkbenchJobFiles" in out.stdout, out.stdout + out.stderr


def test_the_server_config_uses_the_workbench_backend_and_never_runs_jobs_itself():
    config = json.loads((REPO / "jupyter-config/jupyter_jupyter_scheduler_config.json").read_text())
    app = config["SchedulerApp"]
    assert app["scheduler_class"] == "workbench.jobs.scheduler.WorkbenchScheduler"
    assert app["environment_manager_class"] == "workbench.jobs.scheduler.WorkbenchEnvironments"
    assert app["job_files_manager_class"] == "workbench.jobs.scheduler.WorkbenchJobFiles"
    s = lab.WorkbenchScheduler(root_dir="/tmp", environments_manager=lab.WorkbenchEnvironments(), db_url="")
    assert s.task_runner is None  # no local runner of definitions: the jobs service runs them
    assert s.execution_manager_class is lab.WorkbenchExecution
    features = s.execution_manager_class.supported_features(s.execution_manager_class)
    assert features["job_definition"] and features["stop_job"] and features["parameters"]
    with pytest.raises(SchedulerError, match="run through the hub's jobs service"):
        lab.WorkbenchExecution.execute(None)


def test_cli_checks_the_schedule_before_anything_is_sent(capsys, monkeypatch):
    from workbench.cli.main import main

    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "not-used")
    assert main(["job", "submit", "a.ipynb", "--profile", "cpu-small", "--schedule", "3 * *"]) == 2
    err = capsys.readouterr().err
    assert "schedule: '3 * *' has 3 fields" in err and "'0 3 * * *'" in err, err
    assert main(["job", "submit", "a.ipynb", "--profile", "cpu-small", "--schedule", "0 3 * * *", "--course", "c"]) == 2
    assert "--schedule: scheduled jobs run for yourself" in capsys.readouterr().err
    assert main(["job", "submit", "a.ipynb", "--profile", "p", "--schedule", "0 3 * * *", "--timezone", "Nowhere"]) == 2
    assert "timezone: 'Nowhere' is not a known time zone" in capsys.readouterr().err
