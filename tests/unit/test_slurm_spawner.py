"""The Slurm spawner's pure parts: the policy's `slurm:` sections, where each server runs (sbatch options),
`workbench check`'s table, reading `scontrol show job`, and the hub settings of `--spawner slurm`."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from workbench.cli.main import main
from workbench.policy import PolicyError, parse_policy
from workbench.spawn.slurm_jobs import describe_reason, parse_scontrol, placement_table, server_job


def policy(**over):
    data = {
        "auth": {"demo_users": {"ada": {"groups": ["lab"]}}},
        "gpu_types": {"h100": {}, "h100-mig-1g": {}},
        "images": {"base": {"image": "b"}},
        "profiles": {
            "small": {"cpu": 1.5, "memory": "2Gi"},
            "h100-x2": {"cpu": 4, "memory": "8G", "memory_limit": "16Gi", "gpu": {"type": "h100", "count": 2},
                        "slurm": {"partition": "gpu", "constraint": "h100&nvlink"}},
            "mig": {"cpu": 1, "memory": "4Gi", "gpu": {"type": "h100-mig-1g"}, "slurm": {"gres_type": "1g.10gb"},
                    "session": {"max_age": "1h"}},
        },
        "groups": {
            "lab": {"kind": "research", "profiles": ["small", "h100-x2", "mig"], "session": {"max_age": "8h"},
                    "slurm": {"partition": "cpu", "account": "lab-acct", "qos": "normal"}},
            "plain": {"kind": "research", "profiles": ["small"]},
        },
    }  # fmt: skip
    for path, value in over.items():
        node = data
        *parents, leaf = path.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_policy(data, "p.yaml")


def problems(**over) -> list[tuple[str, str]]:
    with pytest.raises(PolicyError) as e:
        policy(**over)
    return e.value.problems


def test_server_job_takes_the_group_placement_and_the_profile_overrides():
    p = policy()
    assert server_job(p, ["lab"], "small").sbatch_args() == [
        "--cpus-per-task=2",  # 1.5 cores: whole cores in Slurm
        "--mem=2048M",
        "--partition=cpu",
        "--account=lab-acct",
        "--qos=normal",
        "--time=0-08:00:00",  # the group's session limit
    ]
    assert server_job(p, ["lab"], "h100-x2").sbatch_args() == [
        "--cpus-per-task=4",
        "--mem=16384M",  # the limit, not the guarantee
        "--partition=gpu",  # the profile's partition wins
        "--account=lab-acct",
        "--qos=normal",
        "--constraint=h100&nvlink",
        "--gres=gpu:h100:2",
        "--time=0-08:00:00",
    ]
    mig = server_job(p, ["lab"], "mig")
    assert mig.gres == "gpu:1g.10gb:1"  # a MIG slice is its own GRES type
    assert mig.time_limit == 3600  # the shorter of the profile's and the group's session limit
    assert mig.group == "lab"


def test_a_group_without_slurm_section_leaves_placement_to_slurm():
    job = server_job(policy(), ["plain"], "small")
    assert job.sbatch_args() == ["--cpus-per-task=2", "--mem=2048M"]  # no session limit: the partition's time limit
    assert job.group == "plain"


def test_slurm_names_with_spaces_or_newlines_are_refused_naming_the_field():
    [(path, msg)] = problems(groups__lab__slurm={"partition": "gpu nodes"})
    assert path == "groups.lab.slurm.partition"
    assert "expected a Slurm name" in msg and "no spaces" in msg and "'gpu nodes'" in msg
    [(path, msg)] = problems(groups__lab__slurm={"account": "lab\n#SBATCH --uid=0"})
    assert path == "groups.lab.slurm.account" and "expected a Slurm name" in msg


def test_a_bad_constraint_is_refused_with_an_example():
    [(path, msg)] = problems(groups__lab__slurm={"constraint": "h100 && nvlink"})
    assert path == "groups.lab.slurm.constraint"
    assert "like 'h100&nvlink'" in msg


def test_gres_type_belongs_to_gpu_profiles_only():
    [(path, msg)] = problems(groups__lab__slurm={"gres_type": "h100"})
    assert (path, msg) == ("groups.lab.slurm.gres_type", "unknown key; remove it or check its spelling")
    [(path, msg)] = problems(profiles__small__slurm={"gres_type": "h100"})
    assert path == "profiles.small.slurm.gres_type"
    assert "remove gres_type or add a gpu" in msg


def test_unknown_keys_in_slurm_sections_are_refused():
    [(path, msg)] = problems(profiles__small__slurm={"partion": "cpu"})
    assert path == "profiles.small.slurm.partion" and "unknown key" in msg


def test_placement_table_and_workbench_check(tmp_path, capsys):
    table = placement_table(policy())
    assert "lab    h100-x2  --cpus-per-task=4 --mem=16384M --partition=gpu" in table
    assert "plain  small    --cpus-per-task=2 --mem=2048M" in table
    demo = tmp_path / "p.yaml"
    import yaml

    data = yaml.safe_load(open("hub_config/demo.yaml"))
    data["groups"]["physics-lab"]["slurm"] = {"partition": "cpu", "account": "physics-lab"}
    demo.write_text(yaml.safe_dump(data))
    assert main(["check", str(demo)]) == 0
    out = capsys.readouterr().out
    assert "Notebook servers as Slurm jobs" in out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    row = "physics-lab h100-x1 --cpus-per-task=8 --mem=61036M --partition=cpu --account=physics-lab --gres=gpu:h100:1"
    assert row in lines


SCONTROL = (
    "JobId=42 JobName=jupyter-wb-ada UserId=wb-ada(1005) JobState=PENDING Reason=PartitionDown Dependency=(null) "
    "RunTime=00:00:00 TimeLimit=02:00:00 StartTime=Unknown EndTime=Unknown BatchHost=(null) Partition=gpu\n"
)


def test_scontrol_output_is_read_into_job_info():
    info = parse_scontrol(SCONTROL)
    assert (info.job_id, info.state, info.reason, info.pending, info.ran) == (
        "42",
        "PENDING",
        "PartitionDown",
        True,
        False,
    )
    assert info.describe() == "Slurm job 42: PENDING, reason: PartitionDown (the partition is down)"
    done = parse_scontrol(
        SCONTROL.replace("PENDING", "TIMEOUT").replace("Reason=PartitionDown", "Reason=TimeLimit")
        .replace("RunTime=00:00:00", "RunTime=1-02:03:04").replace("StartTime=Unknown", "StartTime=2026-05-04T10:00:00")
        .replace("EndTime=Unknown", "EndTime=2026-05-05T12:03:04")
    )  # fmt: skip
    assert done.ended and done.ran and done.run_seconds == 93784
    assert (done.end - done.start).total_seconds() == 93784
    assert done.start == datetime(2026, 5, 4, 10, 0).astimezone().astimezone(UTC)  # Slurm prints local time
    assert parse_scontrol("") is None
    assert describe_reason("Priority") == "Priority (other jobs come first)"
    assert describe_reason("SomethingNew") == "SomethingNew"


def test_hub_settings_of_the_slurm_spawner(tmp_path):
    from workbench.embedded.hub import hub_settings
    from workbench.runtime import Runtime

    rt = Runtime(config="hub_config/demo.yaml", state_dir=str(tmp_path), venv_bin="/v/bin",
                 hub_config_dir="hub_config", proxy_command="chp", system_users=True,
                 quota_port=1234, extra={"spawner": "slurm", "slurm_conf": "/etc/slurm/x.conf"})  # fmt: skip
    from workbench.policy import load_policy
    from workbench.runtime import load_or_create_secrets

    s = hub_settings(load_policy(rt.config), rt, load_or_create_secrets(tmp_path))
    assert s["JupyterHub"]["spawner_class"] == "workbench.spawn.slurm.WorkbenchSlurmSpawner"
    slurm = s["WorkbenchSlurmSpawner"]
    assert slurm["batchspawner_singleuser_cmd"] == "/v/bin/batchspawner-singleuser"
    assert slurm["slurm_conf"] == "/etc/slurm/x.conf" and slurm["policy_path"] == "hub_config/demo.yaml"
    assert slurm["quota_api_url"].endswith("/services/quota/api") and slurm["quota_api_token"]


def test_a_server_may_report_its_port_and_nothing_else():
    """Upstream batchspawner sets any attribute a server's token names; a user could make the root hub run their
    command (batch_submit_cmd) at the next start. The hub's route takes a port only."""
    from jupyterhub import apihandlers

    from workbench.spawn.slurm import PortReportHandler, port_report

    assert port_report({"port": 41234}) == 41234
    for body in (
        {"port": 1, "batch_submit_cmd": "id"},
        {"exec_prefix": ""},
        {"port": "22"},
        {"port": 0},
        [],
        {"port": True},
    ):
        with pytest.raises(ValueError):
            port_report(body)
    routes = [h for r, h in apihandlers.default_handlers if r == "/api/batchspawner"]
    assert routes == [PortReportHandler]
