"""Dask Gateway on Slurm, the pure parts: the per-user cluster config from the policy, and the sbatch
commands the backend builds from it (dask-gateway's own SlurmBackend code, no Slurm needed).

The real cluster is exercised by tests/integration/test_slurm.py.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from dask_gateway_server.backends.jobqueue.slurm import SlurmBackend
from dask_gateway_server.utils import FrozenAttrDict
from traitlets.config import Config

from workbench.gateway import slurm as gateway_slurm
from workbench.gateway.options import cluster_options_for
from workbench.gateway.slurm import (
    DEFAULT_SLURM_CONF,
    SLURM_UP_MARKER,
    WorkbenchSlurmBackend,
    WorkbenchSlurmClusterConfig,
    configure_slurm,
    placement_args,
    resolve_slurm_conf,
    slurm_overrides,
    slurm_time,
    user_steered_submission,
)
from workbench.policy import load_policy
from workbench.runtime import Runtime

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "hub_config" / "demo.yaml"
CENTRE = ROOT / "hub_config" / "examples" / "centre.yaml"


@pytest.fixture(scope="module")
def demo():
    return load_policy(DEMO)


@pytest.fixture(scope="module")
def centre():
    return load_policy(CENTRE)


# ---------------------------------------------------------------------------
# slurm_overrides
# ---------------------------------------------------------------------------


def test_overrides_from_the_demo_group(demo):
    dask = demo.groups["physics-lab"].dask
    assert slurm_overrides("physics-lab", dask, FrozenAttrDict({"worker_cores": 1})) == {
        "partition": "cpu",
        "account": "physics-lab",
        "qos": "",
        "walltime": 4 * 3600,
        "worker_gpus": 0,
        "gpu_type": "",
    }


def test_overrides_for_gpu_workers(centre):
    dask = centre.groups["vision-lab"].dask
    assert slurm_overrides("vision-lab", dask, FrozenAttrDict({"worker_gpus": 1})) == {
        "partition": "gpu",
        "account": "vision-lab",
        "qos": "normal",
        "walltime": 12 * 3600,
        "worker_gpus": 1,
        "gpu_type": "a100",
    }
    # a GPU group's CPU workers carry no GPU type
    assert slurm_overrides("vision-lab", dask, FrozenAttrDict({"worker_gpus": 0}))["gpu_type"] == ""


def test_overrides_refuse_gpus_the_group_may_not_have(demo, centre):
    with pytest.raises(ValueError, match="physics-lab may not request GPUs"):
        slurm_overrides("physics-lab", demo.groups["physics-lab"].dask, FrozenAttrDict({"worker_gpus": 1}))
    with pytest.raises(ValueError, match=r"worker_gpus must be <= 1, got 2"):
        slurm_overrides("vision-lab", centre.groups["vision-lab"].dask, FrozenAttrDict({"worker_gpus": 2}))


def test_overrides_through_the_cluster_options_make_a_valid_cluster_config(centre):
    options = cluster_options_for(centre, ["vision-lab"], slurm_overrides)
    config = options.get_configuration(options.parse_options({"worker_cores": 2, "worker_gpus": 1}), None)
    cfg = WorkbenchSlurmClusterConfig(**config)  # every key is a trait of the cluster config
    assert (cfg.partition, cfg.account, cfg.qos, cfg.walltime) == ("gpu", "vision-lab", "normal", 43200)
    assert (cfg.worker_gpus, cfg.gpu_type, cfg.worker_cores, cfg.max_clusters) == (1, "a100", 2, 2)


# ---------------------------------------------------------------------------
# sbatch arguments
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seconds, expected",
    [
        (14400, "0-04:00:00"),
        (43200, "0-12:00:00"),
        (90, "0-00:02:00"),
        (60, "0-00:01:00"),
        (2 * 86400 + 1, "2-00:01:00"),
        (36 * 3600, "1-12:00:00"),
    ],
)
def test_slurm_time(seconds, expected):
    assert slurm_time(seconds) == expected


def test_slurm_time_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        slurm_time(0)


def test_placement_of_scheduler_and_workers():
    common = dict(partition="cpu", account="physics-lab", qos="normal", walltime=14400)
    assert placement_args(worker=False, **common) == [
        "--job-name=dask-scheduler",
        "--partition=cpu",
        "--account=physics-lab",
        "--qos=normal",
        "--time=0-04:00:00",
    ]
    assert placement_args(worker=True, **common) == [
        "--job-name=dask-worker",
        "--partition=cpu",
        "--account=physics-lab",
        "--qos=normal",
        "--time=0-04:00:00",
    ]
    gpu = dict(common, worker_gpus=2, gpu_type="h100", gpu_partition="gpu")
    # the scheduler of a GPU cluster: no GRES, the group's partition
    assert placement_args(worker=False, **gpu) == placement_args(worker=False, **common)
    assert placement_args(worker=True, **gpu) == [
        "--job-name=dask-worker",
        "--partition=gpu",
        "--account=physics-lab",
        "--qos=normal",
        "--time=0-04:00:00",
        "--gres=gpu:h100:2",
    ]
    # no GPU partition configured: the group's partition
    assert "--partition=cpu" in placement_args(worker=True, **dict(gpu, gpu_partition=""))


def test_placement_leaves_empty_values_to_slurm():
    assert placement_args(worker=True) == ["--job-name=dask-worker"]
    assert placement_args(worker=True, worker_gpus=1, gpu_type="h100") == [
        "--job-name=dask-worker",
        "--gres=gpu:h100:1",
    ]
    with pytest.raises(ValueError, match="GPU type"):
        placement_args(worker=True, worker_gpus=1)


def make_backend(**traits) -> WorkbenchSlurmBackend:
    backend = WorkbenchSlurmBackend(
        **{
            "api_url": "http://127.0.0.1:9999/services/dask-gateway/api",
            "submit_command": "/usr/bin/sbatch",
            "cancel_command": "/usr/bin/scancel",
            "status_command": "/usr/bin/squeue",
            "slurm_conf": "/etc/slurm-site/slurm.conf",
            **traits,
        }
    )
    # upstream looks the user up (ours also creates the account): not here
    backend.get_staging_directory = lambda cluster: f"/home/wb-{cluster.username}/.dask-gateway/{cluster.name}"
    return backend


def make_cluster(**overrides) -> SimpleNamespace:
    base = {
        "scheduler_cmd": ["/venv/bin/dask", "scheduler"],
        "worker_cmd": ["/venv/bin/dask", "worker"],
        "worker_cores": 1,
        "worker_memory": 2**30,
        "scheduler_cores": 1,
        "scheduler_memory": 2**30,
        "environment": {"PATH": "/venv/bin:/usr/bin:/bin"},
    }
    config = WorkbenchSlurmClusterConfig(**{**base, **overrides})
    return SimpleNamespace(
        name="c0ffee",
        username="ada",
        token="secret-token",
        scheduler_address="tls://10.0.0.5:8786",
        config=FrozenAttrDict(config.to_dict()),
    )


def test_sbatch_command_of_a_gpu_worker():
    backend = make_backend()
    cluster = make_cluster(
        partition="cpu",
        account="vision-lab",
        qos="normal",
        walltime=43200,
        worker_gpus=1,
        gpu_type="a100",
        gpu_partition="gpu",
    )
    cmd, env, script = backend.get_submit_cmd_env_stdin(cluster, SimpleNamespace(name="w1"))
    staging = "/home/wb-ada/.dask-gateway/c0ffee"
    assert cmd == [
        "/usr/bin/sbatch",
        "--job-name=dask-worker",
        "--partition=gpu",
        "--account=vision-lab",
        "--qos=normal",
        "--time=0-12:00:00",
        "--gres=gpu:a100:1",
        "--parsable",
        f"--chdir={staging}",
        f"--output={staging}/dask-worker-w1.log",
        "--cpus-per-task=1",
        "--mem=1024M",
        "--export=" + ",".join(sorted(k for k in env if k != "SLURM_CONF")),
    ]
    assert env["SLURM_CONF"] == "/etc/slurm-site/slurm.conf"  # sbatch's own environment
    assert env["DASK_GATEWAY_API_URL"] == "http://127.0.0.1:9999/services/dask-gateway/api"
    assert env["PATH"] == "/venv/bin:/usr/bin:/bin"
    assert script.splitlines()[-1].startswith("/venv/bin/dask worker tls://10.0.0.5:8786 ")
    assert "--memory-limit 1073741824" in script


def test_sbatch_command_of_the_scheduler():
    backend = make_backend(slurm_conf="")
    cluster = make_cluster(
        partition="cpu", account="physics-lab", walltime=14400, worker_gpus=2, gpu_type="h100", gpu_partition="gpu"
    )
    cmd, env, script = backend.get_submit_cmd_env_stdin(cluster)
    assert cmd[:6] == [
        "/usr/bin/sbatch",
        "--job-name=dask-scheduler",
        "--partition=cpu",
        "--account=physics-lab",
        "--time=0-04:00:00",
        "--parsable",
    ]
    assert not [a for a in cmd if a.startswith(("--gres", "--qos"))]
    assert "SLURM_CONF" not in env  # the default cluster: Slurm's default path
    assert script.splitlines()[-1].startswith("/venv/bin/dask scheduler --protocol tls")
    # our preload (first heartbeat at once), with upstream's options
    assert "--preload workbench.gateway.scheduler_preload --dg-api-address" in script


def test_stop_and_status_commands_name_the_cluster():
    backend = make_backend()
    assert backend.get_stop_cmd_env("42") == (["/usr/bin/scancel", "42"], {"SLURM_CONF": "/etc/slurm-site/slurm.conf"})
    cmd, env = backend.get_status_cmd_env(["42", "43"])
    assert cmd == ["/usr/bin/squeue", "-h", "--job=42,43", "-o", "%i %t"]
    assert env == {"SLURM_CONF": "/etc/slurm-site/slurm.conf"}


def test_jobs_run_as_the_hub_users_unix_account(monkeypatch, tmp_path):
    calls = []

    async def upstream(self, user, action, **kwargs):
        calls.append((user, action, kwargs))
        return 0, "17\n", ""

    made = []
    monkeypatch.setattr(SlurmBackend, "do_as_user", upstream)
    monkeypatch.setattr(
        gateway_slurm, "ensure_system_user", lambda name: made.append(name) or SimpleNamespace(pw_name=name)
    )
    backend = WorkbenchSlurmBackend(user_prefix="wb-")

    assert asyncio.run(backend.start_job("Jane.Doe@uni.example", ["sbatch"], {}, "#!/bin/sh")) == "17"
    assert calls[-1][0] == made[-1] and made[-1].startswith("wb-jane-doe-uni-examp-")  # hashed: lossy mapping
    asyncio.run(backend.stop_job("researcher", "17", staging_dir=str(tmp_path)))
    assert calls[-1][:2] == ("wb-researcher", "stop") and calls[-1][2]["staging_dir"] == str(tmp_path)
    # upstream's launcher neither cancels nor answers when the staging directory is gone: cancel without it
    asyncio.run(backend.stop_job("researcher", "17", staging_dir=str(tmp_path / "gone")))
    assert calls[-1][2]["staging_dir"] is None and calls[-1][2]["cmd"][-1] == "17"


# ---------------------------------------------------------------------------
# configure_slurm
# ---------------------------------------------------------------------------


def runtime_for(tmp_path, **kw) -> Runtime:
    return Runtime(
        **{
            "config": str(DEMO),
            "state_dir": str(tmp_path),
            "hub_config_dir": str(ROOT / "hub_config"),
            "venv_bin": "/opt/venv/bin",
            "proxy_command": "chp",
            "gateway_http_port": 8011,
            "system_users": True,
            "gateway_backend": "slurm",
            **kw,
        }
    )


@pytest.fixture
def tools(monkeypatch):
    """Slurm's commands and sudo 'installed', the venv usable by others (whatever this machine has)."""
    monkeypatch.setattr(shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(gateway_slurm, "others_can_execute", lambda path: (True, ""))


def configured(runtime: Runtime, demo) -> Config:
    c = Config()
    c.Proxy.prefix = "/services/dask-gateway"
    configure_slurm(c, demo, runtime)
    return c


def test_configure_for_the_cluster_of_slurm_up(tmp_path, demo, tools):
    conf = tmp_path / "slurm.conf"
    conf.write_text(f"{SLURM_UP_MARKER}: a one-node test cluster.\nClusterName=workbench\n")
    c = configured(runtime_for(tmp_path, extra={"slurm_conf": str(conf)}), demo)
    assert c.DaskGateway.backend_class == "workbench.gateway.slurm.WorkbenchSlurmBackend"
    b = c.WorkbenchSlurmBackend
    assert b.slurm_conf == str(conf)
    assert b.dask_gateway_jobqueue_launcher == "/opt/venv/bin/dask-gateway-jobqueue-launcher"
    assert (b.submit_command, b.cancel_command, b.status_command) == (
        "/usr/bin/sbatch",
        "/usr/bin/scancel",
        "/usr/bin/squeue",
    )
    assert b.api_url == "http://127.0.0.1:8011/services/dask-gateway/api"
    assert b.user_prefix == "wb-"
    cfg = c.WorkbenchSlurmClusterConfig
    assert cfg.scheduler_cmd == ["/opt/venv/bin/python", "-m", "distributed.cli.dask_scheduler"]
    assert cfg.worker_cmd == ["/opt/venv/bin/python", "-m", "distributed.cli.dask_worker"]
    assert cfg.staging_directory == "{home}/.dask-gateway/"
    assert cfg.gpu_partition == "gpu"


def test_configure_for_another_cluster_keeps_gpu_workers_in_the_groups_partition(tmp_path, demo, tools, monkeypatch):
    conf = tmp_path / "site.conf"
    conf.write_text("ClusterName=site\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    c = configured(runtime_for(tmp_path), demo)
    assert c.WorkbenchSlurmBackend.slurm_conf == str(conf)
    assert "gpu_partition" not in c.WorkbenchSlurmClusterConfig


def test_configure_explains_what_is_missing(tmp_path, demo, tools, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "nowhere.conf"))
    with pytest.raises(RuntimeError, match=r"no Slurm configuration at .*nowhere.conf: start .* `make slurm`"):
        configured(runtime_for(tmp_path), demo)
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    with pytest.raises(RuntimeError, match=r"as root with per-user accounts"):
        configured(runtime_for(tmp_path, system_users=False), demo)


def test_resolve_slurm_conf_precedence(tmp_path):
    rt = runtime_for(tmp_path, extra={"slurm_conf": "/from/runtime.conf"})
    assert resolve_slurm_conf(rt, {"SLURM_CONF": "/from/env.conf"}) == "/from/runtime.conf"
    assert resolve_slurm_conf(runtime_for(tmp_path), {"SLURM_CONF": "/from/env.conf"}) == "/from/env.conf"
    assert resolve_slurm_conf(runtime_for(tmp_path), {}) == DEFAULT_SLURM_CONF == "/etc/slurm/slurm.conf"


@pytest.mark.parametrize(
    "text, refused",
    [
        ("ClusterName=wb\nCliFilterPlugins=cli_filter/user_defaults\n", True),
        ("clifilterplugins = lua,user_defaults  # site\n", True),
        ("# CliFilterPlugins=user_defaults\nClusterName=wb\n", False),
        ("CliFilterPlugins=lua\n", False),
        ("ClusterName=wb\n", False),
    ],
)
def test_user_defaults_cli_filter_is_named_as_a_way_for_users_to_steer_sbatch(text, refused):
    why = user_steered_submission(text)
    assert (why is not None) == refused
    if refused:
        assert "~/.slurm/defaults" in why and "remove it" in why
