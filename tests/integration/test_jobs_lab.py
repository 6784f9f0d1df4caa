"""JupyterLab's notebook jobs (jupyter-scheduler's REST API) on the Workbench jobs service, without a browser.

Real: `workbench up` as root (hub, proxy, quota service, jobs service with the local engine, the embedded
workbench's engine for jobs), the researcher's and student1's JupyterLab servers with jupyter-scheduler's
server extension configured by jupyter-config/ (`workbench.jobs.scheduler`), jobs run as `wb-<user>`.
Nothing is mocked. The calls are those the "Create Notebook Job" form and the job list make
(`/user/<name>/scheduler/...` with the user's token).

Checks: the form's environments are the user's entitled profiles (the GPU profile is left out on the local
engine), a job created through the server runs as the user through the service (never in the server's own
process), completes with the parameter's result in `~/jobs/<name>/<run>`, and the job's file link points
there; another user's server neither lists nor stops it; a running job is stopped from the API; a job
definition with a cron schedule submits a run when due and is deleted; a bad cron is a 422 naming the field;
the CLI schedules, lists and unschedules. On the real one-node Slurm (`make slurm`; a second workbench with
`--gateway-backend slurm`): the form offers the GPU profiles and a job from it runs as a Slurm job of
`wb-researcher` with its GRES (the GPU is pretend, Slurm's scheduling of it real).
"""

from __future__ import annotations

import os
import time

import nbformat
import psutil
import pytest
import requests

from workbench.sysusers import USER_PREFIX, ensure_system_user

from .harness import Workbench, state_dir
from .jobs_notebook import put_notebook
from .test_slurm import slurm  # noqa: F401  (the slurm fixture)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs run as per-user accounts: needs root"),
]


@pytest.fixture(scope="module")
def wb():
    w = Workbench(state_dir("wb-it-jobs-lab-")).start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def tokens(wb):
    out = {}
    for user in ("researcher", "student1"):
        out[user] = wb.new_token(wb.login(user), user)
    wb.start_server(out["researcher"], "researcher", profile="cpu-large")
    wb.start_server(out["student1"], "student1", profile="cpu-small")
    return out


def lab(wb, tokens, user, method, path, **kw) -> requests.Response:
    """jupyter-scheduler's REST API on ``user``'s own server, with that user's token."""
    return requests.request(
        method,
        f"{wb.url}/user/{user}/scheduler/{path}",
        headers={"Authorization": f"token {tokens[user]}"},
        timeout=90,
        **kw,
    )


def wait_status(wb, tokens, user, job_id, statuses, timeout=240) -> dict:
    deadline = time.monotonic() + timeout
    job = {}
    while time.monotonic() < deadline:
        r = lab(wb, tokens, user, "GET", f"jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if job["status"] in statuses:
            return job
        time.sleep(1)
    raise TimeoutError(f"job {job_id} not {statuses}: {job}\n{wb.hub_log()[-3000:]}")


def create(wb, tokens, user, **kw) -> str:
    body = {
        "input_uri": "calc.ipynb",
        "runtime_environment_name": "cpu-large",
        "name": "calc-lab",
        "output_formats": ["ipynb"],
        "parameters": {"n": "21"},
        "compute_type": "1h",
        **kw,
    }
    r = lab(wb, tokens, user, "POST", "jobs", json=body)
    assert r.status_code == 200, r.text
    return r.json()["job_id"]


def test_the_forms_environments_are_the_users_entitled_profiles(wb, tokens):
    r = lab(wb, tokens, "researcher", "GET", "runtime_environments")
    assert r.status_code == 200, r.text
    envs = {e["name"]: e for e in r.json()}
    assert set(envs) == {"cpu-large"}, envs  # h100-x1 is entitled, but GPU jobs need Slurm: not offered here
    assert envs["cpu-large"]["compute_types"][:2] == ["30m", "1h"]
    assert "charged to physics-lab" in envs["cpu-large"]["description"]
    assert [f["name"] for f in envs["cpu-large"]["output_formats"]] == ["ipynb"]
    r = lab(wb, tokens, "student1", "GET", "runtime_environments")
    assert {e["name"] for e in r.json()} == {"cpu-small"}
    config = lab(wb, tokens, "researcher", "GET", "config").json()
    assert config["supported_features"]["job_definition"] is True


def test_a_job_from_the_lab_api_runs_as_the_user_through_the_service_and_lands_in_the_home(wb, tokens):
    put_notebook("researcher")
    job_id = create(wb, tokens, "researcher")
    assert job_id.startswith("wb-")
    sid = job_id[3:]
    # the service has it: the researcher's job, submitted with the server's token, with the form's choices
    r = requests.get(
        f"{wb.url}/services/jobs/api/jobs/{sid}", headers={"Authorization": f"token {tokens['researcher']}"}, timeout=60
    )
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (doc["user"], doc["profile"], doc["parameters"], doc["time_limit"]) == (
        "researcher",
        "cpu-large",
        {"n": 21},
        3600,
    )
    job = wait_status(wb, tokens, "researcher", job_id, {"COMPLETED", "FAILED"})
    assert job["status"] == "COMPLETED", job
    assert job["runtime_environment_name"] == "cpu-large" and job["parameters"] == {"n": "21"}
    out = job["job_files"][0]
    assert out["file_format"] == "ipynb" and out["file_path"] == f"{doc['folder']}/calc.ipynb", job
    assert job["downloaded"] is True
    home = wb.home("researcher")
    run = home / doc["folder"]
    assert (run / "result.txt").read_text() == "42"
    executed = nbformat.read(run / "calc.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert f"result 42 {USER_PREFIX}researcher" in text, text
    # run by the service's engine, not by the server: the kernel's parent is the process the service started
    # the local engine's id is "<pid>@<start time>": coreutils' timeout (the time limit), whose child runs the notebook;
    # the kernel's parent is that child, never the user's server or one of its processes
    kernel_parent = int(text.split()[-1])
    assert doc["engine"] == "local" and int(doc["engine_id"].split("@")[0]) < kernel_parent
    server = wb.server_process("researcher")
    assert kernel_parent not in {server.pid, *(p.pid for p in server.children(recursive=True))}
    assert (run / "calc.ipynb").stat().st_uid == ensure_system_user(f"{USER_PREFIX}researcher").pw_uid
    # the job list of the form shows it; "download" has nothing to copy and answers 204
    listed = lab(wb, tokens, "researcher", "GET", "jobs").json()["jobs"]
    assert job_id in [j["job_id"] for j in listed]
    assert lab(wb, tokens, "researcher", "GET", f"jobs/{job_id}/download_files").status_code == 204

    # student1's server neither lists nor stops the researcher's job
    assert job_id not in [j["job_id"] for j in lab(wb, tokens, "student1", "GET", "jobs").json()["jobs"]]
    r = lab(wb, tokens, "student1", "GET", f"jobs/{job_id}")
    assert r.status_code == 500 and "no job" in r.json()["message"], r.text
    r = lab(wb, tokens, "student1", "PATCH", f"jobs/{job_id}", json={"status": "STOPPED"})
    assert r.status_code == 500 and "no job" in r.json()["message"], r.text


def test_a_running_job_is_stopped_from_the_lab_api(wb, tokens):
    put_notebook("researcher")
    job_id = create(wb, tokens, "researcher", name="long", parameters={"n": "1", "sleep": "300"})
    wait_status(wb, tokens, "researcher", job_id, {"IN_PROGRESS"})
    # the run is a process of wb-researcher started by the jobs service, not by the user's server
    r = requests.get(
        f"{wb.url}/services/jobs/api/jobs/{job_id[3:]}",
        headers={"Authorization": f"token {tokens['researcher']}"},
        timeout=60,
    )
    proc = psutil.Process(int(r.json()["engine_id"].split("@")[0]))  # "<pid>@<start time>"
    assert proc.username() == f"{USER_PREFIX}researcher" and "workbench.jobs.execute" in " ".join(proc.cmdline())
    assert "workbench.jobs" in " ".join(proc.parent().cmdline()), proc.parent().cmdline()
    server = wb.server_process("researcher")
    assert proc.pid not in {p.pid for p in server.children(recursive=True)}
    r = lab(wb, tokens, "researcher", "PATCH", f"jobs/{job_id}", json={"status": "STOPPED"})
    assert r.status_code == 204, r.text
    job = wait_status(wb, tokens, "researcher", job_id, {"STOPPED", "COMPLETED", "FAILED"}, timeout=60)
    assert job["status"] == "STOPPED", job
    # deleting it hides it from the form's list (the service keeps the record)
    assert lab(wb, tokens, "researcher", "DELETE", f"jobs/{job_id}").status_code == 204
    assert job_id not in [j["job_id"] for j in lab(wb, tokens, "researcher", "GET", "jobs").json()["jobs"]]


def test_errors_name_the_field(wb, tokens):
    put_notebook("student1")
    # a profile of someone else's group
    r = lab(
        wb,
        tokens,
        "student1",
        "POST",
        "jobs",
        json={"input_uri": "calc.ipynb", "runtime_environment_name": "cpu-large", "name": "x"},
    )
    assert r.status_code == 500 and "profile: 'cpu-large' is not one student1 may use" in r.json()["message"], r.text
    # a bad cron expression: 422 from the service, naming the field and giving an example
    r = requests.post(
        f"{wb.url}/services/jobs/api/definitions",
        headers={"Authorization": f"token {tokens['student1']}"},
        json={"notebook": "calc.ipynb", "profile": "cpu-small", "schedule": "every night"},
        timeout=60,
    )
    assert r.status_code == 422, r.text
    assert "schedule: 'every night' has 2 fields" in r.json()["message"] and "'0 3 * * *'" in r.json()["message"]
    r = lab(
        wb, tokens, "student1", "POST", "job_definitions",
        json={"input_uri": "calc.ipynb", "runtime_environment_name": "cpu-small", "name": "x", "schedule": "61 * * * *"},
    )  # fmt: skip
    assert r.status_code == 500 and "schedule: '61 * * * *' is not a valid cron expression" in r.json()["message"]


def test_a_job_definition_with_a_cron_schedule_submits_a_run_when_due(wb, tokens):
    put_notebook("student1")
    r = lab(
        wb,
        tokens,
        "student1",
        "POST",
        "job_definitions",
        json={
            "input_uri": "calc.ipynb",
            "runtime_environment_name": "cpu-small",
            "name": "nightly",
            "parameters": {"n": "5"},
            "schedule": "* * * * *",
            "timezone": "UTC",
            "output_formats": ["ipynb"],
        },
    )
    assert r.status_code == 200, r.text
    def_id = r.json()["job_definition_id"]
    d = lab(wb, tokens, "student1", "GET", f"job_definitions/{def_id}").json()
    assert (d["schedule"], d["active"], d["runtime_environment_name"]) == ("* * * * *", True, "cpu-small")
    assert def_id in [
        x["job_definition_id"] for x in lab(wb, tokens, "student1", "GET", "job_definitions").json()["job_definitions"]
    ]
    # the next minute comes: the service submits a run, listed under the definition
    deadline = time.monotonic() + 150
    runs = []
    while time.monotonic() < deadline and not runs:
        runs = lab(wb, tokens, "student1", "GET", f"jobs?job_definition_id={def_id}").json()["jobs"]
        time.sleep(2)
    assert runs, wb.hub_log()[-3000:]
    job = wait_status(wb, tokens, "student1", runs[0]["job_id"], {"COMPLETED", "FAILED"})
    assert job["status"] == "COMPLETED", job
    service = requests.get(
        f"{wb.url}/services/jobs/api/definitions/{def_id[6:]}",
        headers={"Authorization": f"token {tokens['student1']}"},
        timeout=60,
    ).json()
    assert runs[0]["job_id"][3:] in service["jobs"] and service["last_error"] == ""
    folder = job["job_files"][0]["file_path"].rsplit("/", 1)[0]
    assert (wb.home("student1") / folder / "result.txt").read_text() == "10"
    # the researcher cannot see it; the owner deletes it
    r = lab(wb, tokens, "researcher", "GET", f"job_definitions/{def_id}")
    assert r.status_code == 500 and "no job definition" in r.json()["message"]
    assert lab(wb, tokens, "student1", "DELETE", f"job_definitions/{def_id}").status_code == 204
    assert lab(wb, tokens, "student1", "GET", "job_definitions").json()["job_definitions"] == []


def test_the_cli_schedules_lists_and_unschedules(wb, tokens, tmp_path):
    """`workbench job submit … --schedule`, `job schedules`, `job unschedule` against the real service."""
    import subprocess

    from .harness import VENV_BIN

    put_notebook("student1")
    token_file = tmp_path / "token"
    token_file.write_text(tokens["student1"])

    def cli(*args):
        return subprocess.run(
            [str(VENV_BIN / "workbench"), "job", "--hub-url", wb.url, "--token-file", str(token_file), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = cli("submit", "calc.ipynb", "--profile", "cpu-small", "-p", "n=2", "--schedule", "0 3 * * *", "--name", "night")
    assert r.returncode == 0, r.stderr
    def_id = r.stdout.split()[0]
    assert "night  0 3 * * * (UTC)  next " in r.stdout and "T03:00:00Z" in r.stdout, r.stdout
    r = cli("schedules")
    assert r.returncode == 0 and def_id in r.stdout, r.stdout + r.stderr
    r = cli("submit", "calc.ipynb", "--profile", "cpu-large", "--schedule", "0 3 * * *")
    assert r.returncode == 2 and "profile: 'cpu-large' is not one student1 may use" in r.stderr, r.stderr
    r = cli("unschedule", def_id)
    assert r.returncode == 0, r.stderr
    assert def_id not in cli("schedules").stdout


@pytest.fixture(scope="module")
def slurm_wb(slurm):  # noqa: F811
    """`workbench up --gateway-backend slurm`: the jobs service submits to the real one-node Slurm; physics-lab
    gets `h100-small` (1 core, 1 GiB, one pretend H100 GRES: the GPU is pretend, Slurm's scheduling of it real)."""
    import yaml

    from .harness import DEMO

    sd = state_dir("wb-it-jobs-lab-slurm-")
    policy = yaml.safe_load(DEMO.read_text())
    policy["profiles"]["h100-small"] = {"cpu": 1, "memory": "1G", "gpu": {"type": "h100", "count": 1}, "image": "base"}
    policy["groups"]["physics-lab"]["profiles"].append("h100-small")
    config = sd.parent / "platform.yaml"
    config.write_text(yaml.safe_dump(policy))
    w = Workbench(sd, config=config, extra_args=("--gateway-backend", "slurm")).start()
    yield w
    w.stop()


def test_on_slurm_the_form_offers_gpu_profiles_and_the_job_runs_as_a_slurm_job_with_its_gres(slurm_wb):
    wb = slurm_wb
    tokens = {"researcher": wb.new_token(wb.login("researcher"), "researcher")}
    wb.start_server(tokens["researcher"], "researcher", profile="cpu-large")
    r = lab(wb, tokens, "researcher", "GET", "runtime_environments")
    assert r.status_code == 200, r.text
    assert {e["name"] for e in r.json()} == {"cpu-large", "h100-x1", "h100-small"}, r.json()
    put_notebook("researcher")
    job_id = create(wb, tokens, "researcher", runtime_environment_name="h100-small", compute_type="30m")
    doc = requests.get(
        f"{wb.url}/services/jobs/api/jobs/{job_id[3:]}",
        headers={"Authorization": f"token {tokens['researcher']}"},
        timeout=60,
    ).json()
    assert doc["engine"] == "slurm" and doc["time_limit"] == 1800, doc
    job = wait_status(wb, tokens, "researcher", job_id, {"COMPLETED", "FAILED"})
    assert job["status"] == "COMPLETED", job
    run = wb.home("researcher") / job["job_files"][0]["file_path"].rsplit("/", 1)[0]
    assert (run / "result.txt").read_text() == "42"
    from .test_slurm import scontrol_job

    info = scontrol_job(doc["engine_id"])
    assert "gres/gpu:h100=1" in info.get("TRES", "") or "gpu:h100:1" in str(info), info
    assert info.get("UserId", "").startswith(f"{USER_PREFIX}researcher("), info
