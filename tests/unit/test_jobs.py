"""Notebook jobs, pure parts: parameters, time limits against the group's, the sbatch options and script,
the Kubernetes-free service wiring, parameter injection, and the CLI's errors."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from workbench.cli.main import main
from workbench.jobs.execute import inject_parameters
from workbench.jobs.model import (
    JobError,
    SlurmPlacement,
    check_notebook_path,
    max_job_seconds,
    parse_parameters,
    parse_scontrol,
    resolve_time_limit,
    sbatch_args,
    sbatch_script,
)
from workbench.jobs.service import job_doc
from workbench.jobs.wiring import add_jobs_service
from workbench.policy import load_policy

DEMO = Path(__file__).resolve().parents[2] / "hub_config" / "demo.yaml"


@pytest.fixture(scope="module")
def policy():
    return load_policy(DEMO)


def test_parameters_are_json_when_they_can_be_else_strings():
    assert parse_parameters(["lr=0.1", "n=3", "ok=true", "name=run 1", "xs=[1,2]", 's="7"']) == {
        "lr": 0.1,
        "n": 3,
        "ok": True,
        "name": "run 1",
        "xs": [1, 2],
        "s": "7",
    }


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["lr"], "parameter 'lr' has no value: write -p lr=VALUE"),
        (["=3"], "has no name: write -p NAME=3"),
        (
            ["1x=2"],
            "parameter '1x': not a Python variable name; parameters become variables of the notebook, use letters, digits and _ (e.g. '_1x')",
        ),
        (["my-rate=2"], "(e.g. 'my_rate')"),
        (["a=1", "a=2"], "parameter 'a' is given twice: keep one -p a=…"),
    ],
)
def test_parameter_errors_name_the_parameter_and_the_fix(items, message):
    with pytest.raises(JobError) as e:
        parse_parameters(items)
    assert message in str(e.value)


def test_time_limits_follow_the_groups_limits(policy):
    # physics-lab: no session limit, its Slurm walltime (4h); startup-acme: its session.max_age (8h)
    assert max_job_seconds(policy, "physics-lab", "cpu-large") == 4 * 3600
    assert max_job_seconds(policy, "startup-acme", "cpu-small") == 8 * 3600
    assert max_job_seconds(policy, "platform-admins", "cpu-small") == 24 * 3600
    assert resolve_time_limit("2h", policy, "physics-lab", "cpu-large") == 7200
    assert resolve_time_limit(None, policy, "physics-lab", "cpu-large") == 3600
    with pytest.raises(JobError) as e:
        resolve_time_limit("5h", policy, "physics-lab", "cpu-large")
    assert str(e.value) == (
        "time: 5h is more than the 4h that jobs of group physics-lab with profile cpu-large may run; "
        "ask for --time 4h or less"
    )
    with pytest.raises(JobError, match="time: .*write it like 2h, 90m or 3600"):
        resolve_time_limit("soon", policy, "physics-lab", "cpu-large")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/etc/passwd.ipynb", "must be a path inside your home"),
        ("../other/x.ipynb", "without '..'"),
        ("notes.txt", "is not a notebook; give a .ipynb file"),
        ("", "give the notebook's path relative to your home"),
    ],
)
def test_notebook_paths_stay_in_the_home(path, message):
    with pytest.raises(JobError, match=message):
        check_notebook_path(path)
    assert check_notebook_path("~/a/./b.ipynb") == "a/b.ipynb"


def test_sbatch_options_carry_partition_account_gres_time_and_the_run_folder(policy):
    placement = SlurmPlacement.of(policy, "physics-lab", "h100-x1", gpu_partition="gpu")
    assert placement == SlurmPlacement("gpu", "physics-lab", "", 8, 61036, "h100", 1)
    args = sbatch_args(placement, name="fit", time_limit=5400, run_dir="/home/wb-r/jobs/fit/r1")
    assert args == [
        "--job-name=wb-job-fit",
        "--parsable",
        "--time=0-01:30:00",
        "--partition=gpu",
        "--account=physics-lab",
        "--cpus-per-task=8",
        "--ntasks=1",
        "--nodes=1",
        "--mem=61036M",
        "--gres=gpu:h100:1",
        "--chdir=/home/wb-r/jobs/fit/r1",
        "--output=/home/wb-r/jobs/fit/r1/job.log",
        "--open-mode=append",
    ]
    cpu = SlurmPlacement.of(policy, "physics-lab", "cpu-large", gpu_partition="gpu")
    assert cpu.partition == "cpu" and cpu.gpu_count == 0
    assert not any(a.startswith("--gres") for a in sbatch_args(cpu, name="x", time_limit=60, run_dir="/r"))


def test_sbatch_script_quotes_every_value():
    script = sbatch_script(["/v/python", "-m", "x", "--parameters", '{"a": "$(rm -rf ~)"}'], {"K": "it's"})
    assert script.splitlines() == [
        "#!/bin/bash",
        "set -e",
        "export K='it'\"'\"'s'",
        'exec /v/python -m x --parameters \'{"a": "$(rm -rf ~)"}\'',
    ]


def test_scontrol_lines_are_parsed():
    d = parse_scontrol("JobId=7 JobName=wb-job-x JobState=PENDING Reason=Resources StartTime=Unknown ExitCode=0:0")
    assert d["JobState"] == "PENDING" and d["Reason"] == "Resources" and d["JobId"] == "7"


def test_parameters_are_injected_after_the_parameters_cell():
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import math"),
        nbformat.v4.new_code_cell("n = 1"),
        nbformat.v4.new_code_cell("n*2"),
    ]
    nb.cells[1].metadata["tags"] = ["parameters"]
    inject_parameters(nb, {"n": 21, "label": "x"})
    assert [c.source for c in nb.cells][2] == "# Parameters (injected by workbench job)\nn = 21\nlabel = 'x'\n"
    assert nb.cells[2].metadata["tags"] == ["injected-parameters"]
    plain = nbformat.v4.new_notebook()
    plain.cells = [nbformat.v4.new_code_cell("print(n)")]
    assert inject_parameters(plain, {"n": 1}).cells[0].metadata["tags"] == ["injected-parameters"]


def test_job_doc_charges_gpu_hours_for_the_run_only():
    job = {
        "id": "abc",
        "user": "u",
        "submitter": "u",
        "name": "n",
        "run": "r",
        "notebook": "n.ipynb",
        "profile": "p",
        "grp": "g",
        "params": "{}",
        "engine": "slurm",
        "engine_id": "1",
        "state": "completed",
        "reason": "",
        "time_limit": 60,
        "submitted": 100.0,
        "started": 1000.0,
        "ended": 1000.0 + 1800,
        "exit_code": 0,
        "cpu": 2.0,
        "gpu_count": 2,
    }
    doc = job_doc(job)
    assert doc["duration_seconds"] == 1800 and doc["gpu_hours"] == 1.0 and doc["cpu_hours"] == 1.0
    assert doc["folder"] == "jobs/n/r"


def test_the_hub_runs_the_jobs_service_with_its_roles(policy):
    from workbench.runtime import Runtime

    rt = Runtime(config="c", state_dir="/s", hub_config_dir="/h", venv_bin="/v", proxy_command="chp", quota_port=9)
    settings = add_jobs_service({"JupyterHub": {}}, policy, rt, {"jobs_api_token": "t"})
    svc = settings["JupyterHub"]["services"][0]
    assert svc["name"] == "jobs" and svc["command"] == ["/v/python", "-m", "workbench.jobs"]
    roles = {r["name"]: r for r in settings["JupyterHub"]["load_roles"]}
    assert roles["workbench-jobs-users"]["scopes"] == ["access:services!service=jobs"]
    assert "custom:workbench-quota:write" in roles["workbench-jobs-service"]["scopes"]
    assert "access:services!service=jobs" in settings["Spawner"]["server_token_scopes"]


def test_cli_refuses_bad_parameters_and_never_takes_a_token_argument(capsys, monkeypatch):
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    assert main(["job", "submit", "a.ipynb", "--profile", "cpu-small", "-p", "x-y=1"]) == 2
    assert "parameter 'x-y': not a Python variable name" in capsys.readouterr().err
    assert main(["job", "list"]) == 2
    assert "no token: set $JUPYTERHUB_API_TOKEN" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["job", "--token", "secret", "list"])


def test_cli_reads_the_token_file(tmp_path, capsys):
    f = tmp_path / "tok"
    f.write_text("")
    assert main(["job", "--token-file", str(f), "list"]) == 2
    assert "is empty; put your hub token" in capsys.readouterr().err
