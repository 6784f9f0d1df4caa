"""Dask Gateway on Kubernetes: the policy's per-user cluster config, and the pods upstream builds from it.

``kube_overrides`` / ``kube_gateway_settings`` are pure and tested against literal dicts. The pods come
from dask-gateway's own code (``workbench.gateway.kube.render_cluster_pods``: the KubeBackend's option
processing, then the KubeController's pod creation against a recording stand-in for the API, no
cluster) and are validated against the Kubernetes 1.30 schema (``kubernetes-validate``, strict).
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from dask_gateway_server.backends.base import PublicException
from dask_gateway_server.models import ClusterStatus, User
from dask_gateway_server.utils import FrozenAttrDict
from kubespawner.slugs import is_valid_label, safe_slug
from traitlets.config import Config

from workbench.cli.render import main_render_cluster
from workbench.gateway.kube import (
    GROUP_LABEL,
    USERNAME_LABEL,
    ClusterOptionsError,
    WorkbenchKubeBackend,
    WorkbenchKubeClusterConfig,
    cluster_image,
    kube_cluster_options,
    kube_gateway_settings,
    kube_overrides,
    render_cluster_pods,
)
from workbench.policy import load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "hub_config" / "demo.yaml"
CENTRE = ROOT / "hub_config" / "examples" / "centre.yaml"
K8S_VERSION = "1.30.0"

POD_SECURITY = {"fsGroup": 100, "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "allowPrivilegeEscalation": False,
}
LOCKED_POD = {"securityContext": POD_SECURITY, "automountServiceAccountToken": False}
LOCKED_CONTAINER = {"securityContext": CONTAINER_SECURITY}


@functools.cache
def policy_at(path: Path):
    return load_policy(path)


@functools.cache
def rendered(path: Path, user: str, groups: tuple[str, ...], options: tuple[tuple[str, object], ...]) -> dict:
    return render_cluster_pods(policy_at(path), user, list(groups), dict(options))


# ---------------------------------------------------------------------------
# Pure builders
# ---------------------------------------------------------------------------


def test_kube_overrides_cpu_cluster():
    policy = policy_at(DEMO)
    overrides = kube_overrides(policy, username="researcher")
    dask = policy.groups["physics-lab"].dask
    labels = {"workbench/group": "physics-lab", "hub.jupyter.org/username": "researcher"}
    annotations = {"hub.jupyter.org/username": "researcher"}
    assert overrides("physics-lab", dask, FrozenAttrDict({"worker_cores": 1, "worker_memory": 1.0})) == {
        "max_clusters": 2,
        "image": "workbench/base:latest",  # the notebook image of physics-lab's first profile (cpu-large)
        "scheduler_extra_pod_config": LOCKED_POD,
        "scheduler_extra_container_config": LOCKED_CONTAINER,
        "scheduler_extra_pod_labels": labels,
        "scheduler_extra_pod_annotations": annotations,
        "worker_extra_pod_config": LOCKED_POD,
        "worker_extra_container_config": LOCKED_CONTAINER,
        "worker_extra_pod_labels": labels,
        "worker_extra_pod_annotations": annotations,
    }


def test_kube_overrides_gpu_worker():
    policy = policy_at(CENTRE)
    overrides = kube_overrides(policy, username="ada")
    dask = policy.groups["vision-lab"].dask
    labels = {"workbench/group": "vision-lab", "hub.jupyter.org/username": "ada"}
    annotations = {"hub.jupyter.org/username": "ada"}
    options = FrozenAttrDict({"worker_cores": 4, "worker_memory": 16.0, "worker_gpus": 1})
    assert overrides("vision-lab", dask, options) == {
        "max_clusters": 2,
        "image": "registry.example.edu/workbench/base:2024.10.1",  # first profile: cpu-medium
        "scheduler_extra_pod_config": LOCKED_POD,
        "scheduler_extra_container_config": LOCKED_CONTAINER,
        "scheduler_extra_pod_labels": labels,
        "scheduler_extra_pod_annotations": annotations,
        "worker_extra_pod_config": {
            **LOCKED_POD,
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "worker_extra_container_config": {
            **LOCKED_CONTAINER,
            "resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}},
            # the image of vision-lab's first profile with an A100 (a100-x1), not the CPU image
            "image": "registry.example.edu/workbench/gpu-pytorch:2024.10.1",
        },
        "worker_extra_pod_labels": labels,
        "worker_extra_pod_annotations": annotations,
    }


def test_kube_overrides_no_gpus_requested_means_a_cpu_worker():
    policy = policy_at(CENTRE)
    out = kube_overrides(policy, "ada")(
        "vision-lab", policy.groups["vision-lab"].dask, FrozenAttrDict({"worker_gpus": 0})
    )
    assert out["worker_extra_pod_config"] == LOCKED_POD
    assert out["worker_extra_container_config"] == LOCKED_CONTAINER


def test_kube_overrides_escapes_the_user_name_like_kubespawner_and_needs_no_user():
    policy = policy_at(DEMO)
    dask = policy.groups["course-ml101"].dask
    out = kube_overrides(policy, "Ada.Lovelace@uni.edu")("course-ml101", dask, FrozenAttrDict({}))
    assert out["worker_extra_pod_labels"] == {
        "workbench/group": "course-ml101",
        "hub.jupyter.org/username": "ada-lovelace-uni-edu---946e0fd6",
    }
    assert out["worker_extra_pod_annotations"] == {"hub.jupyter.org/username": "Ada.Lovelace@uni.edu"}
    anonymous = kube_overrides(policy)("course-ml101", dask, FrozenAttrDict({}))
    assert anonymous["scheduler_extra_pod_labels"] == {"workbench/group": "course-ml101"}
    assert anonymous["scheduler_extra_pod_annotations"] == {}


def test_kube_overrides_refuse_gpus_for_a_group_without_gpu_workers():
    policy = policy_at(DEMO)
    with pytest.raises(ValueError, match="worker_gpus"):
        kube_overrides(policy)("physics-lab", policy.groups["physics-lab"].dask, FrozenAttrDict({"worker_gpus": 1}))


MIG_POLICY = {
    "auth": {"type": "demo", "demo_users": {"u": {"groups": ["teach"]}}},
    "gpu_types": {"mig": {"resource": "nvidia.com/mig-1g.10gb"}},
    "images": {"img": {"image": "img:1"}},
    "groups": {"teach": {"kind": "research", "dask": {"gpu_workers": True, "gpu_type": "mig", "worker_max_gpus": 2}}},
}


def test_kube_overrides_mig_worker_without_selector_or_tolerations_and_a_group_without_profiles():
    policy = parse_policy(MIG_POLICY)
    out = kube_overrides(policy, "u")("teach", policy.groups["teach"].dask, FrozenAttrDict({"worker_gpus": 2}))
    assert out["image"] == "img:1"  # no profiles: 'base' if defined, else the first image
    assert out["worker_extra_pod_config"] == LOCKED_POD
    assert out["worker_extra_container_config"] == {
        **LOCKED_CONTAINER,
        "resources": {"limits": {"nvidia.com/mig-1g.10gb": "2"}, "requests": {"nvidia.com/mig-1g.10gb": "2"}},
    }


def test_cluster_image():
    centre = policy_at(CENTRE)
    assert cluster_image(centre, "climate-lab") == "registry.example.edu/workbench/base:2024.10.1"
    assert cluster_image(centre, "vision-lab", gpu=True) == "registry.example.edu/workbench/gpu-pytorch:2024.10.1"
    # no GPU profile at all: the first profile's image
    assert cluster_image(centre, "course-geo210", gpu=True) == "registry.example.edu/workbench/base:2024.10.1"


def test_kube_gateway_settings():
    settings = kube_gateway_settings(policy_at(CENTRE), namespace="dask")
    assert callable(settings["Backend"].pop("cluster_options"))
    assert settings == {
        "DaskGateway": {"backend_class": "workbench.gateway.kube.WorkbenchKubeBackend"},
        "Backend": {},
        "KubeClusterConfig": {
            "namespace": "dask",
            "scheduler_cmd": ["dask", "scheduler"],
            "worker_cmd": ["dask", "worker"],
            "environment": {},
            "idle_timeout": 1800.0,
            "image_pull_policy": "IfNotPresent",
            "image": "registry.example.edu/workbench/base:2024.10.1",
            "scheduler_extra_pod_config": LOCKED_POD,
            "worker_extra_pod_config": LOCKED_POD,
            "scheduler_extra_container_config": LOCKED_CONTAINER,
            "worker_extra_container_config": LOCKED_CONTAINER,
        },
    }


def test_kube_cluster_options_bind_the_gateway_user():
    options = kube_cluster_options(policy_at(DEMO))(User("student1", groups=["course-ml101"]))
    assert [f.field for f in options.fields] == ["worker_cores", "worker_memory", "environment", "workbench_job"]
    config = options.get_configuration(options.parse_options({"worker_memory": 0.5}), None)
    assert config["worker_memory"] == 2**29
    assert config["cluster_max_workers"] == 2
    assert config["worker_extra_pod_labels"] == {
        "workbench/group": "course-ml101",
        "hub.jupyter.org/username": "student1",
    }


def test_settings_build_the_config_class_and_per_user_dicts_replace_the_common_ones():
    config = Config()
    for section, values in kube_gateway_settings(policy_at(DEMO)).items():
        for key, value in values.items():
            setattr(config[section], key, value)
    backend = WorkbenchKubeBackend(config=config, gateway_instance="t")
    assert backend.cluster_config_class is WorkbenchKubeClusterConfig
    default = backend.cluster_config_class(parent=backend)
    assert default.max_clusters == 0  # a config not made by the policy's options allows no cluster
    assert default.worker_extra_pod_config == LOCKED_POD
    assert default.scheduler_cmd == ["dask", "scheduler"]
    user = backend.cluster_config_class(parent=backend, worker_extra_pod_config={"nodeSelector": {"a": "b"}})
    assert user.worker_extra_pod_config == {"nodeSelector": {"a": "b"}}  # why kube_overrides repeats the lock-down


# ---------------------------------------------------------------------------
# Pods, as dask-gateway's controller builds them
# ---------------------------------------------------------------------------

CASES = [
    pytest.param(DEMO, "researcher", ("physics-lab",), (), id="demo-researcher"),
    pytest.param(DEMO, "student1", ("course-ml101",), (("worker_memory", 0.5),), id="demo-student"),
    pytest.param(CENTRE, "jchen.student", ("course-ml101",), (("worker_cores", 1),), id="centre-student"),
    pytest.param(CENTRE, "ada", ("vision-lab",), (("worker_cores", 8), ("worker_gpus", 1)), id="centre-gpu-worker"),
    pytest.param(CENTRE, "ada", ("vision-lab",), (("worker_gpus", 0),), id="centre-gpu-group-cpu-worker"),
]


@pytest.mark.parametrize("path, user, groups, options", CASES)
def test_rendered_pods_are_valid_locked_down_and_labelled(path, user, groups, options):
    policy = policy_at(path)
    pods = rendered(path, user, groups, options)
    assert set(pods) == {"scheduler", "worker"}
    group = policy.dask_group_for(groups)
    dask = policy.groups[group].dask
    opts = dict(options)
    gpus = opts.get("worker_gpus", 0)

    for component, pod in pods.items():
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        spec = pod["spec"]
        [container] = spec["containers"]
        assert container["name"] == f"dask-{component}"
        assert pod["metadata"]["namespace"] == "workbench"

        # accounting
        labels = pod["metadata"]["labels"]
        assert labels[GROUP_LABEL] == group
        assert labels[USERNAME_LABEL] == safe_slug(user, is_valid=is_valid_label)  # as on the user's notebook pod
        assert pod["metadata"]["annotations"] == {USERNAME_LABEL: user}
        assert labels["app.kubernetes.io/component"] == f"dask-{component}"

        # non-root, no privileges, no API token
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"] == POD_SECURITY
        assert container["securityContext"] == CONTAINER_SECURITY

        # GPUs only on the workers of a cluster that asked for them
        resources = container["resources"]
        if component == "worker" and gpus:
            gtype = policy.gpu_types[dask.gpu_type]
            assert resources["limits"][gtype.resource] == resources["requests"][gtype.resource] == str(gpus)
            assert spec["nodeSelector"] == gtype.node_selector
            assert spec["tolerations"] == gtype.tolerations
            assert container["image"] == cluster_image(policy, group, gpu=True)
        else:
            assert set(resources["limits"]) == set(resources["requests"]) == {"cpu", "memory"}
            assert "nodeSelector" not in spec and "tolerations" not in spec
            assert container["image"] == cluster_image(policy, group)

    # the group's limits and the user's choices reach the pods
    worker = pods["worker"]["spec"]["containers"][0]
    cores = opts.get("worker_cores", 1)
    memory = int(opts.get("worker_memory", 1.0) * 2**30)
    assert worker["resources"]["limits"]["cpu"] == f"{cores:.3f}"
    assert worker["resources"]["requests"]["memory"] == str(memory)
    assert worker["args"][:2] == ["dask", "worker"]
    assert worker["args"][worker["args"].index("--nthreads") + 1] == str(cores)
    scheduler = pods["scheduler"]["spec"]["containers"][0]
    assert scheduler["args"][:2] == ["dask", "scheduler"]
    assert scheduler["args"][scheduler["args"].index("--dg-idle-timeout") + 1] == str(float(dask.idle_timeout))
    # the worker pod belongs to the scheduler pod, as the controller makes it
    assert pods["worker"]["metadata"]["ownerReferences"][0]["name"] == pods["scheduler"]["metadata"]["name"]


def test_rendered_username_label_is_kubespawners():
    pods = rendered(CENTRE, "jchen.student", ("course-ml101",), (("worker_cores", 1),))
    assert pods["scheduler"]["metadata"]["labels"][USERNAME_LABEL] == "jchen.student"  # already a valid label
    odd = render_cluster_pods(policy_at(DEMO), "Jörg Müller", ["course-ml101"], {})
    assert odd["worker"]["metadata"]["labels"][USERNAME_LABEL] == "j-rg-m-ller---70ed695e"
    kubernetes_validate.validate(odd["worker"], K8S_VERSION, strict=True)


def test_the_validator_rejects_a_broken_pod():
    pod = rendered(DEMO, "researcher", ("physics-lab",), ())["worker"]
    broken = {**pod, "spec": {**pod["spec"], "automountServiceAcountToken": False}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    "path, groups, options, message",
    [
        (DEMO, ["physics-lab"], {"worker_cores": 2}, r"worker_cores must be <= 1"),
        (DEMO, ["physics-lab"], {"worker_memory": 4}, r"worker_memory must be <= 1\.86"),
        (DEMO, ["physics-lab"], {"worker_gpus": 1}, r"Unknown fields \['worker_gpus'\].*worker_cores, worker_memory"),
        (CENTRE, ["vision-lab"], {"worker_gpus": 2}, r"worker_gpus must be <= 1"),
        (CENTRE, ["course-ml101"], {"worker_cores": 2}, r"worker_cores must be <= 1"),
        (DEMO, ["course-ml101"], {"scheduler_cores": 8}, r"Unknown fields \['scheduler_cores'\]"),
        (DEMO, ["platform-admins"], {}, r"may not use Dask Gateway"),
    ],
)
def test_options_beyond_the_group_limits_are_refused(path, groups, options, message):
    with pytest.raises(ClusterOptionsError, match=message):
        render_cluster_pods(policy_at(path), "someone", groups, options)


def test_a_member_of_several_groups_gets_the_most_generous_and_is_labelled_with_it():
    pods = render_cluster_pods(policy_at(CENTRE), "lmartin", ["course-geo210", "climate-lab"], {"worker_cores": 8})
    assert pods["worker"]["metadata"]["labels"][GROUP_LABEL] == "climate-lab"
    assert pods["worker"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "8.000"


# ---------------------------------------------------------------------------
# max_clusters on the Kubernetes backend
# ---------------------------------------------------------------------------


class _FakeCustomClient:
    def __init__(self):
        self.created: list[dict] = []

    async def create_namespaced_custom_object(self, group, version, namespace, plural, obj):
        await asyncio.sleep(0)  # let concurrent requests interleave
        self.created.append(obj)


def _backend(policy) -> WorkbenchKubeBackend:
    config = Config()
    for section, values in kube_gateway_settings(policy).items():
        for key, value in values.items():
            setattr(config[section], key, value)
    backend = WorkbenchKubeBackend(config=config, gateway_instance="t")
    backend.custom_client = _FakeCustomClient()
    backend.clusters, backend.username_to_clusters = {}, {}
    return backend


def test_max_clusters_counts_clusters_in_flight_and_not_yet_watched():
    backend = _backend(policy_at(DEMO))  # physics-lab: max_clusters 2
    user = User("researcher", groups=["physics-lab"])

    async def start_three():
        return await asyncio.gather(*(backend.start_cluster(user, {}) for _ in range(3)), return_exceptions=True)

    results = asyncio.run(start_three())
    assert sum(isinstance(r, str) for r in results) == 2
    [refused] = [r for r in results if isinstance(r, Exception)]
    assert isinstance(refused, PublicException) and "dask.max_clusters = 2" in str(refused)
    assert len(backend.custom_client.created) == 2
    assert all(o["spec"]["config"]["max_clusters"] == 2 for o in backend.custom_client.created)

    # the watch sees both; once one has stopped, a new one may start
    names = [r for r in results if isinstance(r, str)]
    backend.username_to_clusters["researcher"] = {
        names[0]: type("C", (), {"status": ClusterStatus.STOPPED})(),
        names[1]: type("C", (), {"status": ClusterStatus.RUNNING})(),
    }
    assert isinstance(asyncio.run(backend.start_cluster(user, {})), str)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def test_main_render_cluster_prints_both_pods(capsys):
    rc = main_render_cluster(
        [
            "--config",
            str(CENTRE),
            "--user",
            "ada",
            "--groups",
            "vision-lab",
            "-o",
            "worker_gpus=1",
            "-o",
            "worker_cores=2",
        ]
    )
    assert rc == 0
    scheduler, worker = yaml.safe_load_all(capsys.readouterr().out)
    assert scheduler["metadata"]["name"].startswith("dask-scheduler-")
    assert worker["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "2.000"


def test_main_render_cluster_one_component_and_errors(capsys, tmp_path):
    assert (
        main_render_cluster(["--config", str(DEMO), "--user", "u", "--groups", "physics-lab", "--component", "worker"])
        == 0
    )
    [worker] = yaml.safe_load_all(capsys.readouterr().out)
    assert worker["metadata"]["generateName"].startswith("dask-worker-")

    assert (
        main_render_cluster(["--config", str(DEMO), "--user", "u", "--groups", "physics-lab", "-o", "worker_gpus=1"])
        == 3
    )
    assert "worker_gpus" in capsys.readouterr().err

    bad = tmp_path / "bad.yaml"
    bad.write_text("groups: {Bad: {kind: research}}\n")
    assert main_render_cluster(["--config", str(bad), "--user", "u"]) == 2
    assert "groups" in capsys.readouterr().err


def test_gpu_workers_get_the_runtime_class_and_a_memory_backed_dev_shm():
    """The chart's gpu.runtimeClassName and gpu.devShm reach GPU workers only (WORKBENCH_GPU_* of the gateway)."""
    from workbench.gateway.kube import GpuPods

    policy = policy_at(CENTRE)
    dask = policy.groups["vision-lab"].dask
    gpu_pods = GpuPods.from_env({"WORKBENCH_GPU_RUNTIME_CLASS": "nvidia", "WORKBENCH_GPU_DEV_SHM": "true"})
    overrides = kube_overrides(policy, username="ada", gpu_pods=gpu_pods)
    gpu = overrides("vision-lab", dask, FrozenAttrDict({"worker_cores": 4, "worker_memory": 16.0, "worker_gpus": 1}))
    pod, container = gpu["worker_extra_pod_config"], gpu["worker_extra_container_config"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16384Mi"}}]
    assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert "runtimeClassName" not in gpu["scheduler_extra_pod_config"]
    cpu = overrides("vision-lab", dask, FrozenAttrDict({"worker_cores": 4, "worker_memory": 16.0, "worker_gpus": 0}))
    assert "runtimeClassName" not in cpu["worker_extra_pod_config"] and "volumes" not in cpu["worker_extra_pod_config"]
