"""Unit tests of workbench.gateway.local (per-group cluster options) and spawner.dask_environment."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from workbench.gateway.options import GIB, cluster_config_for, cluster_options_for
from workbench.policy import DaskPolicy, PolicyError, load_policy, parse_policy
from workbench.spawn.common import dask_environment

DEMO = Path(__file__).resolve().parents[2] / "hub_config" / "demo.yaml"


@pytest.fixture(scope="module")
def demo():
    return load_policy(DEMO)


def policy_with_dask(**dask) -> object:
    data = yaml.safe_load(DEMO.read_text())
    data["groups"]["physics-lab"]["dask"] = dask
    return parse_policy(data)


def spec(options) -> dict:
    return {f["field"]: f for f in options.get_specification()}


# ---------------------------------------------------------------------------
# cluster_options_for
# ---------------------------------------------------------------------------


def test_specification_physics_lab(demo):
    assert cluster_options_for(demo, ["physics-lab"]).get_specification() == [
        {
            "field": "worker_cores",
            "label": "Worker cores",
            "default": 1,
            "spec": {"type": "int", "min": 1, "max": 1},
        },
        {
            "field": "worker_memory",
            "label": "Worker memory (GiB)",
            "default": 1.0,
            "spec": {"type": "float", "min": 0.25, "max": 1.86},  # 2G = 1.8626 GiB
        },
        {
            "field": "environment",
            "label": "Environment variables of the scheduler and workers",
            "default": {},
            "spec": {"type": "mapping"},
        },
        {
            "field": "workbench_job",
            "label": "Notebook job that owns this cluster (set by jobs)",
            "default": "",
            "spec": {"type": "string"},
        },
    ]


def test_specification_course(demo):
    s = spec(cluster_options_for(demo, ["course-ml101"]))
    assert s["worker_memory"]["spec"]["max"] == 0.93  # 1G
    assert s["worker_memory"]["default"] == 0.93  # default capped by the group's limit


def test_defaults_within_limits(demo):
    options = cluster_options_for(demo, ["physics-lab"])
    parsed = options.parse_options({})
    assert parsed == {"worker_cores": 1, "worker_memory": 1.0, "environment": {}, "workbench_job": ""}
    assert options.get_configuration(parsed, None) == {
        "worker_cores": 1,
        "worker_memory": GIB,
        "scheduler_cores": 1,
        "scheduler_memory": GIB,
        "cluster_max_workers": 4,
        "cluster_max_cores": 5.0,
        "cluster_max_memory": 8 * 10**9 + GIB,
        "idle_timeout": 1800,
        "max_clusters": 2,
    }


def test_options_within_limits(demo):
    options = cluster_options_for(demo, ["physics-lab"])
    parsed = options.parse_options({"worker_cores": 1, "worker_memory": 1.5})
    assert parsed == {"worker_cores": 1, "worker_memory": 1.5, "environment": {}, "workbench_job": ""}
    config = options.get_configuration(parsed, None)
    assert config["worker_memory"] == int(1.5 * GIB) == 1610612736
    assert config["worker_cores"] == 1


def test_integer_memory_accepted(demo):
    options = cluster_options_for(demo, ["physics-lab"])
    assert options.parse_options({"worker_memory": 1}) == {
        "worker_cores": 1,
        "worker_memory": 1.0,
        "environment": {},
        "workbench_job": "",
    }


def test_worker_cores_beyond_limit_rejected(demo):
    options = cluster_options_for(demo, ["physics-lab"])
    with pytest.raises(ValueError, match=r"^worker_cores must be <= 1\.000000, got 2$"):
        options.parse_options({"worker_cores": 2})


def test_worker_memory_beyond_limit_rejected(demo):
    options = cluster_options_for(demo, ["physics-lab"])
    with pytest.raises(ValueError, match=r"^worker_memory must be <= 1\.860000, got 4\.0$"):
        options.parse_options({"worker_memory": 4})


def test_worker_memory_below_minimum_rejected(demo):
    options = cluster_options_for(demo, ["physics-lab"])
    with pytest.raises(ValueError, match=r"^worker_memory must be >= 0\.250000, got 0\.1$"):
        options.parse_options({"worker_memory": 0.1})


def test_wrong_types_and_unknown_fields_rejected(demo):
    options = cluster_options_for(demo, ["physics-lab"])
    with pytest.raises(TypeError, match=r"^worker_cores must be an integer, got 1\.5$"):
        options.parse_options({"worker_cores": 1.5})
    with pytest.raises(ValueError, match=r"^Unknown fields \['worker_gpus'\]$"):
        options.parse_options({"worker_gpus": 1})


def test_environment_is_added_to_the_gateways_own(demo):
    options = cluster_options_for(demo, ["physics-lab"], base_environment={"PATH": "/opt/wb/bin"})
    config = options.get_configuration(options.parse_options({"environment": {"OMP_NUM_THREADS": "1"}}), None)
    assert config["environment"] == {"PATH": "/opt/wb/bin", "OMP_NUM_THREADS": "1"}
    plain = cluster_options_for(demo, ["physics-lab"])
    assert "environment" not in plain.get_configuration(plain.parse_options({}), None)  # the backend's default


@pytest.mark.parametrize(
    "env, words",
    [
        ({"PATH": "/tmp/evil"}, "environment: PATH is set by the workbench for every cluster; choose another name"),
        ({"DASK_GATEWAY__ADDRESS": "x"}, "environment: DASK_GATEWAY__ADDRESS is set by the workbench"),
        ({"LD_PRELOAD": "x.so"}, "environment: LD_PRELOAD is set by the workbench"),
        ({"SBATCH_EXCLUSIVE": "1"}, "environment: SBATCH_EXCLUSIVE would steer the batch system (SBATCH_*"),
        ({"SALLOC_PARTITION": "big"}, "environment: SALLOC_PARTITION would steer the batch system"),
        ({"SRUN_CPUS_PER_TASK": "64"}, "environment: SRUN_CPUS_PER_TASK would steer the batch system"),
        ({"SLURM_CONF": "/tmp/my.conf"}, "environment: SLURM_CONF would steer the batch system"),
        ({"SPANK_X": "1"}, "ask for cores, memory and GPUs with the cluster options instead"),
        ({"1ABC": "x"}, "environment: '1ABC' is not a variable name"),
        ({"A-B": "x"}, "environment: 'A-B' is not a variable name"),
        ({"THREADS": 4}, "environment: the value of THREADS must be a string (quote it), got 4"),
        ({f"V{i}": "x" for i in range(65)}, "environment: at most 64 variables, got 65"),
    ],
)
def test_environment_refusals_name_the_variable_and_the_fix(demo, env, words):
    options = cluster_options_for(demo, ["physics-lab"])
    with pytest.raises(ValueError) as info:
        options.get_configuration(options.parse_options({"environment": env}), None)
    assert words in str(info.value)


@pytest.mark.parametrize("name", ["SBATCHX", "MY_SBATCH_EXCLUSIVE", "SLURMY", "OMP_NUM_THREADS"])
def test_batch_prefixes_match_only_at_the_start_with_the_underscore(demo, name):
    options = cluster_options_for(demo, ["physics-lab"])
    config = options.get_configuration(options.parse_options({"environment": {name: "1"}}), None)
    assert config["environment"][name] == "1"


def test_most_generous_group_applies(demo):
    options = cluster_options_for(demo, ["course-ml101", "physics-lab"])
    config = options.get_configuration(options.parse_options({"worker_memory": 1.8}), None)
    assert config["cluster_max_workers"] == 4
    assert config["idle_timeout"] == 1800
    # course alone: 1.8 GiB is too much
    with pytest.raises(ValueError, match=r"^worker_memory must be <= 0\.930000, got 1\.8$"):
        cluster_options_for(demo, ["course-ml101"]).parse_options({"worker_memory": 1.8})


def test_larger_worker_cores_allowed_when_policy_allows():
    p = policy_with_dask(max_cores=16, max_memory="64G", max_workers=4, worker_max_cores=4, worker_max_memory="8Gi")
    options = cluster_options_for(p, ["physics-lab"])
    assert spec(options)["worker_cores"]["spec"] == {"type": "int", "min": 1, "max": 4}
    assert spec(options)["worker_memory"]["spec"]["max"] == 8.0
    config = options.get_configuration(options.parse_options({"worker_cores": 4, "worker_memory": 8}), None)
    assert config["worker_cores"] == 4
    assert config["worker_memory"] == 8 * GIB
    with pytest.raises(ValueError, match=r"^worker_cores must be <= 4\.000000, got 5$"):
        options.parse_options({"worker_cores": 5})


@pytest.mark.parametrize(
    "groups, named", [(["platform-admins"], "platform-admins"), ([], "none"), (["not-a-group"], "none")]
)
def test_group_without_dask_policy_is_refused_with_a_reason(demo, groups, named):
    options = cluster_options_for(demo, groups)
    assert options.get_specification() == []  # nothing to choose
    with pytest.raises(ValueError, match=rf"Your groups \({named}\) may not use Dask Gateway: .*'dask' section"):
        options.get_configuration(options.parse_options({}), None)


def test_small_worker_memory_limit():
    p = policy_with_dask(max_cores=1, max_memory="1G", worker_max_cores=1, worker_max_memory="200Mi")
    options = cluster_options_for(p, ["physics-lab"])
    assert spec(options)["worker_memory"]["spec"]["max"] <= 200 / 1024


def test_max_worker_memory_does_not_exceed_policy():
    p = policy_with_dask(max_cores=4, max_memory="16G", worker_max_cores=1, worker_max_memory="5G")
    options = cluster_options_for(p, ["physics-lab"])
    top = spec(options)["worker_memory"]["spec"]["max"]
    config = options.get_configuration(options.parse_options({"worker_memory": top}), None)
    assert 4.6 * GIB < config["worker_memory"] <= 5 * 10**9


def test_fractional_worker_core_limit_is_a_policy_error():
    with pytest.raises(PolicyError, match=r"groups\.physics-lab\.dask\.worker_max_cores: must be at least 1"):
        policy_with_dask(max_cores=2, max_memory="4G", worker_max_cores=0.5, worker_max_memory="1G")


# ---------------------------------------------------------------------------
# cluster_config_for
# ---------------------------------------------------------------------------


def test_cluster_config_for_literal():
    dask = DaskPolicy(
        max_cores=8, max_memory="32G", max_workers=6, worker_max_cores=2, worker_max_memory="4G", idle_timeout="15m"
    )
    assert cluster_config_for(dask, 2, 3.5) == {
        "worker_cores": 2,
        "worker_memory": 3758096384,
        "scheduler_cores": 1,
        "scheduler_memory": 1073741824,
        "cluster_max_workers": 6,
        "cluster_max_cores": 9.0,
        "cluster_max_memory": 32000000000 + 1073741824,
        "idle_timeout": 900,
        "max_clusters": 1,
    }


def test_cluster_config_for_demo_groups(demo):
    acme = demo.groups["startup-acme"].dask
    assert cluster_config_for(acme, 1, 1.0) == {
        "worker_cores": 1,
        "worker_memory": GIB,
        "scheduler_cores": 1,
        "scheduler_memory": GIB,
        "cluster_max_workers": 2,
        "cluster_max_cores": 3.0,
        "cluster_max_memory": 4 * 10**9 + GIB,
        "idle_timeout": 900,
        "max_clusters": 1,
    }


# ---------------------------------------------------------------------------
# spawner.dask_environment
# ---------------------------------------------------------------------------

URL = "http://127.0.0.1:8000/services/dask-gateway"
PROXY = "gateway://127.0.0.1:8012"


def test_dask_environment_with_dask(demo):
    assert dask_environment(demo, ["physics-lab"], URL, PROXY) == {
        "DASK_GATEWAY__ADDRESS": URL,
        "DASK_GATEWAY__PUBLIC_ADDRESS": URL,
        "DASK_GATEWAY__PROXY_ADDRESS": PROXY,
        "DASK_GATEWAY__AUTH__TYPE": "jupyterhub",
        "WORKBENCH_DASK_MAX_WORKERS": "4",
    }


def test_dask_environment_most_generous(demo):
    assert dask_environment(demo, ["course-ml101", "physics-lab"], URL, PROXY)["WORKBENCH_DASK_MAX_WORKERS"] == "4"
    assert dask_environment(demo, ["course-ml101"], URL, PROXY)["WORKBENCH_DASK_MAX_WORKERS"] == "2"


def test_dask_environment_without_dask(demo):
    assert dask_environment(demo, ["platform-admins"], URL, PROXY) == {
        "DASK_GATEWAY__ADDRESS": URL,
        "DASK_GATEWAY__PUBLIC_ADDRESS": URL,
        "DASK_GATEWAY__PROXY_ADDRESS": PROXY,
        "DASK_GATEWAY__AUTH__TYPE": "jupyterhub",
    }


def test_the_job_tag_is_recorded_and_configures_nothing():
    """A notebook job's clusters carry ``workbench_job`` (workbench.jobs.gateway), which changes no setting."""
    policy = load_policy(DEMO)
    options = cluster_options_for(policy, ["physics-lab"])
    tagged = options.parse_options({"workbench_job": "abc123"})
    assert tagged["workbench_job"] == "abc123"
    plain = options.parse_options({})
    assert options.get_configuration(tagged, None) == options.get_configuration(plain, None)
