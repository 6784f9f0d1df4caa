"""The policy on Kubernetes: pure KubeSpawner builders against literal dicts, and real pod manifests.

The manifests come from KubeSpawner's own ``get_pod_manifest`` (``workbench.spawn.kube.render_pod``,
offline, no cluster) and are validated against the official Kubernetes 1.30 schema
(``kubernetes-validate``, strict: unknown fields are errors).
"""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path
from types import SimpleNamespace

import kubernetes_validate
import pytest
import yaml
from tornado import web

from workbench.cli.main import main
from workbench.policy import PolicyError, load_policy, parse_policy
from workbench.spawn.kube import (
    WorkbenchKubeSpawner,
    _offline_kube_config,
    group_volumes,
    kube_hub_settings,
    kubespawner_profile,
    kubespawner_settings,
    make_profile_list,
    profile_list_for,
    render_pod,
)

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "hub_config" / "demo.yaml"
CENTRE = ROOT / "hub_config" / "examples" / "centre.yaml"
K8S_VERSION = "1.30.0"


@functools.cache
def policy_at(path: Path):
    return load_policy(path)


@functools.cache
def rendered(path: Path, user: str, groups: tuple[str, ...], profile: str | None) -> dict:
    return render_pod(policy_at(path), user, list(groups), profile)


def entitled_group(policy, profile: str) -> str:
    return next(name for name, g in policy.groups.items() if profile in g.profiles)


def all_profiles():
    for path in (DEMO, CENTRE):
        for name in policy_at(path).profiles:
            yield pytest.param(path, name, id=f"{path.stem}-{name}")


# ---------------------------------------------------------------------------
# Pure builders
# ---------------------------------------------------------------------------


def test_kubespawner_profile_cpu():
    assert kubespawner_profile(policy_at(DEMO), "cpu-small") == {
        "display_name": "Small CPU",
        "description": "1 CPU · 2 GB · image: Python, JupyterLab, Dask, xarray — 1 core, 2 GB — exercises and light analysis",
        "slug": "cpu-small",
        "kubespawner_override": {
            "image": "workbench/base:latest",
            "cpu_guarantee": 1.0,
            "cpu_limit": 1.0,
            "mem_guarantee": 2_000_000_000,
            "mem_limit": 2_000_000_000,
            "environment": {"WORKBENCH_PROFILE": "cpu-small"},
        },
    }


def test_kubespawner_profile_memory_limit_and_no_description():
    policy = parse_policy(
        {
            "auth": {"type": "demo", "demo_users": {"u": {}}},
            "images": {"base": {"image": "img:1"}},
            "profiles": {"p": {"cpu": "500m", "memory": "1Gi", "memory_limit": "2Gi", "env": {"A": "1"}}},
        }
    )
    assert kubespawner_profile(policy, "p") == {
        "display_name": "p",
        "description": "0.5 CPU · 2.14748 GB · image: img:1",
        "slug": "p",
        "kubespawner_override": {
            "image": "img:1",
            "cpu_guarantee": 0.5,
            "cpu_limit": 0.5,
            "mem_guarantee": 2**30,
            "mem_limit": 2 * 2**30,
            "environment": {"A": "1", "WORKBENCH_PROFILE": "p"},
        },
    }


def test_kubespawner_profile_gpu_with_tolerations():
    assert kubespawner_profile(policy_at(CENTRE), "h100-x4") == {
        "display_name": "Four H100",
        "description": "4× NVIDIA H100 80GB · 64 CPU · 480 GB · image: Base + CUDA 12.4, PyTorch 2.4"
        " — multi-GPU training on one node",
        "slug": "h100-x4",
        "kubespawner_override": {
            "image": "registry.example.edu/workbench/gpu-pytorch:2024.10.1",
            "cpu_guarantee": 64.0,
            "cpu_limit": 64.0,
            "mem_guarantee": 480_000_000_000,
            "mem_limit": 480_000_000_000,
            "environment": {"NCCL_DEBUG": "WARN", "OMP_NUM_THREADS": "16", "WORKBENCH_PROFILE": "h100-x4"},
            "extra_resource_limits": {"nvidia.com/gpu": "4"},
            "extra_resource_guarantees": {"nvidia.com/gpu": "4"},
            "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": {
                "gpu-h100-0": {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                "gpu-h100-1": {
                    "key": "workbench.example.edu/h100",
                    "operator": "Equal",
                    "value": "true",
                    "effect": "NoSchedule",
                },
            },
        },
    }


def test_kubespawner_profile_mig_uses_its_own_resource():
    assert kubespawner_profile(policy_at(DEMO), "mig-1g") == {
        "display_name": "H100 MIG slice",
        "description": "1× NVIDIA H100 MIG 1g.10gb slice · 2 CPU · 8 GB · image: Base + CUDA PyTorch"
        " — one 1g.10gb slice of an H100, 2 cores, 8 GB",
        "slug": "mig-1g",
        "kubespawner_override": {
            "image": "workbench/gpu-pytorch:latest",
            "cpu_guarantee": 2.0,
            "cpu_limit": 2.0,
            "mem_guarantee": 8_000_000_000,
            "mem_limit": 8_000_000_000,
            "environment": {"WORKBENCH_PROFILE": "mig-1g"},
            "extra_resource_limits": {"nvidia.com/mig-1g.10gb": "1"},
            "extra_resource_guarantees": {"nvidia.com/mig-1g.10gb": "1"},
            "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        },
    }


def test_group_volumes_one_per_policy_group_at_the_embedded_paths():
    volumes, mounts = group_volumes(policy_at(CENTRE), ["vision-lab", "not-a-policy-group", "climate-lab"])
    assert volumes == {
        "shared-climate-lab": {
            "name": "shared-climate-lab",
            "persistentVolumeClaim": {"claimName": "workbench-group-climate-lab"},
        },
        "shared-vision-lab": {
            "name": "shared-vision-lab",
            "persistentVolumeClaim": {"claimName": "workbench-group-vision-lab"},
        },
    }
    assert mounts == {
        "shared-climate-lab": {"name": "shared-climate-lab", "mountPath": "/srv/workbench/groups/climate-lab"},
        "shared-vision-lab": {"name": "shared-vision-lab", "mountPath": "/srv/workbench/groups/vision-lab"},
    }
    assert group_volumes(policy_at(CENTRE), []) == ({}, {})


def test_group_volumes_long_group_name_gives_a_valid_volume_name():
    long = "g" * 63
    policy = parse_policy(
        {
            "auth": {"type": "demo", "demo_users": {"u": {"groups": [long]}}},
            "storage": {"shared": "/data/{group}/work", "shared_claim": "grp-{group}"},
            "groups": {long: {"kind": "research"}},
        }
    )
    volumes, mounts = group_volumes(policy, [long])
    [(vname, volume)] = volumes.items()
    assert len(vname) <= 63 and vname.startswith("shared-ggg") and volume["name"] == vname
    assert volume["persistentVolumeClaim"] == {"claimName": f"grp-{long}"}
    assert mounts == {vname: {"name": vname, "mountPath": f"/data/{long}/work"}}


def test_profile_list_for_entitled_profiles_in_policy_order_first_default():
    policy = policy_at(DEMO)
    shared = {
        "volumes": {
            "shared-course-ml101": {
                "name": "shared-course-ml101",
                "persistentVolumeClaim": {"claimName": "workbench-group-course-ml101"},
            },
            # the course's materials folder: read-only for students (instructors write it)
            "materials-course-ml101": {
                "name": "materials-course-ml101",
                "persistentVolumeClaim": {"claimName": "workbench-course-course-ml101", "readOnly": True},
            },
        },
        "volume_mounts": {
            "shared-course-ml101": {"name": "shared-course-ml101", "mountPath": "/srv/workbench/groups/course-ml101"},
            "materials-course-ml101": {
                "name": "materials-course-ml101",
                "mountPath": "/srv/workbench/courses/course-ml101",
                "readOnly": True,
            },
        },
    }
    small, mig = kubespawner_profile(policy, "cpu-small"), kubespawner_profile(policy, "mig-1g")
    assert profile_list_for(policy, ["course-ml101", "unknown"]) == [
        {**small, "kubespawner_override": {**small["kubespawner_override"], **shared}, "default": True},
        {**mig, "kubespawner_override": {**mig["kubespawner_override"], **shared}},
    ]
    # two groups: union of their profiles, in policy order (not group order)
    slugs = [p["slug"] for p in profile_list_for(policy, ["startup-acme", "physics-lab"])]
    assert slugs == ["cpu-small", "cpu-large", "h100-x1"]
    assert profile_list_for(policy, []) == []
    assert profile_list_for(policy, ["nobody"]) == []


def test_make_profile_list_reads_the_spawners_user_groups():
    policy = policy_at(CENTRE)
    profile_list = make_profile_list(policy)
    user = SimpleNamespace(groups=[SimpleNamespace(name="course-geo210"), SimpleNamespace(name="startup-acme")])
    got = asyncio.run(profile_list(SimpleNamespace(user=user)))
    assert got == profile_list_for(policy, ["course-geo210", "startup-acme"])
    assert [p["slug"] for p in got] == ["cpu-small", "cpu-medium", "mig-1g", "h100-x1"]
    # a user whose groups may start nothing: 403, never KubeSpawner's defaults
    nobody = SimpleNamespace(user=SimpleNamespace(groups=[SimpleNamespace(name="someone-elses-group")]))
    with pytest.raises(web.HTTPError) as err:
        asyncio.run(profile_list(nobody))
    assert err.value.status_code == 403


def test_kubespawner_settings_defaults():
    policy = policy_at(DEMO)
    assert kubespawner_settings(policy) == {
        "uid": 1000,
        "gid": 1000,
        "fs_gid": 100,
        "allow_privilege_escalation": False,
        "pod_security_context": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "container_security_context": {"runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
        "automount_service_account_token": False,
        "storage_pvc_ensure": True,
        "pvc_name_template": "claim-{user_server}",
        "storage_capacity": "10Gi",
        "storage_access_modes": ["ReadWriteOnce"],
        "volumes": {
            "home": {"name": "home", "persistentVolumeClaim": {"claimName": "{pvc_name}"}},
            "datasets": {
                "name": "datasets",
                "persistentVolumeClaim": {"claimName": "workbench-datasets", "readOnly": True},
            },
        },
        "volume_mounts": {
            "home": {"name": "home", "mountPath": "/home/jovyan"},
            "datasets": {"name": "datasets", "mountPath": "/srv/workbench/datasets", "readOnly": True},
        },
    }


def test_kubespawner_settings_from_storage():
    settings = kubespawner_settings(policy_at(CENTRE))
    assert settings["storage_capacity"] == "50Gi"
    assert settings["storage_class"] == "ceph-rbd"
    policy = parse_policy(
        {
            "auth": {"type": "demo", "demo_users": {"u": {}}},
            "storage": {"datasets": "/data/ro", "datasets_claim": "era5", "storage_class": "", "home_size": "1Ti"},
        }
    )
    settings = kubespawner_settings(policy)
    assert settings["storage_class"] == ""  # explicit "no class" is kept
    assert settings["storage_capacity"] == "1Ti"
    assert settings["volumes"]["datasets"] == {
        "name": "datasets",
        "persistentVolumeClaim": {"claimName": "era5", "readOnly": True},
    }
    assert settings["volume_mounts"]["datasets"] == {"name": "datasets", "mountPath": "/data/ro", "readOnly": True}


def test_kube_hub_settings():
    policy = policy_at(CENTRE)
    assert kube_hub_settings(policy, "/etc/workbench/platform.yaml") == {
        "JupyterHub": {"spawner_class": "workbench.spawn.kube.WorkbenchKubeSpawner"},
        "WorkbenchKubeSpawner": {"policy_path": "/etc/workbench/platform.yaml", **kubespawner_settings(policy)},
    }


@pytest.mark.parametrize(
    "storage, path, message",
    [
        ({"shared": "groups/{group}"}, "storage.shared", "absolute path"),
        ({"shared": "/srv/shared"}, "storage.shared", "must contain {group}"),
        ({"shared": "/srv/{user}/{group}"}, "storage.shared", "unknown placeholder(s) {user}"),
        ({"datasets": "/srv/{group}"}, "storage.datasets", "no placeholders"),
        ({"home_size": "lots"}, "storage.home_size", "memory size"),
        ({"home_size": "0"}, "storage.home_size", "more than 0"),
        ({"shared_claim": "shared"}, "storage.shared_claim", "must contain {group}"),
        ({"shared_claim": "Shared_{group}"}, "storage.shared_claim", "valid PVC name"),
        ({"datasets_claim": "data-{group}"}, "storage.datasets_claim", "without placeholders"),
        ({"datasets_claim": "-bad"}, "storage.datasets_claim", "valid PVC name"),
        ({"home_claim": "x"}, "storage.home_claim", "unknown key"),
    ],
)
def test_storage_errors_name_the_field(storage, path, message):
    with pytest.raises(PolicyError) as err:
        parse_policy({"auth": {"type": "demo", "demo_users": {"u": {}}}, "storage": storage})
    assert [p for p, m in err.value.problems if p == path and message in m], err.value.problems


# ---------------------------------------------------------------------------
# Real pod manifests from KubeSpawner
# ---------------------------------------------------------------------------


def test_the_validator_rejects_a_broken_pod():
    pod = rendered(DEMO, "researcher", ("physics-lab",), "cpu-large")
    assert kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    broken = {**pod, "spec": {**pod["spec"], "automountServiceAcountToken": False}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path, profile", list(all_profiles()))
def test_every_profile_renders_a_valid_locked_down_pod(path, profile):
    policy = policy_at(path)
    group = entitled_group(policy, profile)
    pod = rendered(path, "ada", (group,), profile)

    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)

    prof = policy.profiles[profile]
    spec = pod["spec"]
    [container] = spec["containers"]
    assert container["image"] == policy.images[prof.image].image
    assert {"name": "WORKBENCH_PROFILE", "value": profile} in container["env"]
    for name, value in prof.env.items():
        assert {"name": name, "value": value} in container["env"]

    # non-root, no privileges, no API token
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"] == {
        "fsGroup": 100,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["securityContext"] == {
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }

    # resources
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert limits["cpu"] == requests["cpu"] == prof.cpu
    assert requests["memory"] == prof.memory
    assert limits["memory"] == (prof.memory_limit or prof.memory)
    if prof.gpu:
        gtype = policy.gpu_types[prof.gpu.type]
        assert limits[gtype.resource] == requests[gtype.resource] == str(prof.gpu.count)
        assert spec.get("nodeSelector", {}) == gtype.node_selector
        assert spec.get("tolerations", []) == gtype.tolerations
    else:
        assert not [r for r in limits if r.startswith("nvidia.com/")]
        assert "nodeSelector" not in spec and "tolerations" not in spec

    # home, the group's shared folder and the read-only datasets, at the embedded mode's paths
    storage = policy.storage
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["home"] == {"name": "home", "persistentVolumeClaim": {"claimName": "claim-ada"}}
    assert mounts["home"] == {"name": "home", "mountPath": "/home/jovyan"}
    shared = f"shared-{group}"
    assert volumes[shared] == {
        "name": shared,
        "persistentVolumeClaim": {"claimName": storage.shared_claim.format(group=group)},
    }
    assert mounts[shared] == {"name": shared, "mountPath": storage.shared.format(group=group)}
    assert volumes["datasets"]["persistentVolumeClaim"] == {"claimName": storage.datasets_claim, "readOnly": True}
    assert mounts["datasets"] == {"name": "datasets", "mountPath": storage.datasets, "readOnly": True}
    materials = {f"materials-{group}"} if policy.groups[group].kind == "course" else set()
    assert set(volumes) == {"home", "datasets", shared} | materials


def test_render_pod_mounts_every_group_and_defaults_to_the_first_profile():
    pod = rendered(CENTRE, "lmartin", ("course-geo210", "climate-lab"), None)
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    [container] = pod["spec"]["containers"]
    assert {"name": "WORKBENCH_PROFILE", "value": "cpu-small"} in container["env"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {
        "/home/jovyan",
        "/srv/workbench/datasets",
        "/srv/workbench/groups/climate-lab",
        "/srv/workbench/groups/course-geo210",
        "/srv/workbench/courses/course-geo210",  # the course's materials, read-only
    }
    assert pod["metadata"]["name"] == "jupyter-lmartin"


@pytest.mark.parametrize(
    "groups, profile, message",
    [
        (
            ["course-ml101"],
            "h100-x1",
            "Profile 'h100-x1' is not available to you; your groups may use: cpu-small, mig-1g",
        ),
        (["course-ml101"], "no-such-profile", "your groups may use: cpu-small, mig-1g"),
        ([], "cpu-small", "You are not in any group that may start a server"),
        (["someone-elses-group"], None, "You are not in any group that may start a server"),
    ],
)
def test_render_pod_refuses_with_403(groups, profile, message):
    with pytest.raises(web.HTTPError) as err:
        render_pod(policy_at(DEMO), "student1", groups, profile)
    assert err.value.status_code == 403
    assert message in err.value.log_message


def test_stock_kubespawner_would_not_give_403():
    """Why WorkbenchKubeSpawner checks first: KubeSpawner 7 turns an unknown slug into a ValueError (a 500)."""
    from kubespawner import KubeSpawner

    async def go():
        with _offline_kube_config():
            user = SimpleNamespace(name="s", id=0, url="/user/s/", groups=[SimpleNamespace(name="course-ml101")])
            spawner = KubeSpawner(user=user, hub=SimpleNamespace(), profile_list=make_profile_list(policy_at(DEMO)))
            spawner.user_options = {"profile": "h100-x1"}
            await spawner.load_user_options()

    with pytest.raises(ValueError, match="No such profile: h100-x1"):
        asyncio.run(go())


def test_spawner_loads_the_policy_from_policy_path():
    async def go():
        with _offline_kube_config():
            user = SimpleNamespace(name="s", id=0, url="/user/s/", groups=[SimpleNamespace(name="startup-acme")])
            spawner = WorkbenchKubeSpawner(user=user, hub=SimpleNamespace(), policy_path=str(CENTRE))
            assert spawner.policy == policy_at(CENTRE)
            return await spawner.profile_list(spawner)

    assert [p["slug"] for p in asyncio.run(go())] == ["cpu-small", "mig-1g", "h100-x1"]


def test_render_pod_restores_the_kube_config_environment(monkeypatch):
    from kubernetes_asyncio.config import kube_config

    monkeypatch.setenv("KUBECONFIG", "/nowhere/kubeconfig")
    location = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    render_pod(policy_at(DEMO), "researcher", ["physics-lab"], "h100-x1")
    assert os.environ["KUBECONFIG"] == "/nowhere/kubeconfig"
    assert kube_config.KUBE_CONFIG_DEFAULT_LOCATION == location
    monkeypatch.delenv("KUBECONFIG")
    render_pod(policy_at(DEMO), "researcher", ["physics-lab"], "h100-x1")
    assert "KUBECONFIG" not in os.environ


# ---------------------------------------------------------------------------
# workbench render-pod
# ---------------------------------------------------------------------------


def test_cli_render_pod_prints_the_manifest(capsys):
    rc = main(
        [
            "render-pod",
            "--config",
            str(CENTRE),
            "--user",
            "ada",
            "--groups",
            "vision-lab,climate-lab",
            "--profile",
            "h100-x4",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    pod = yaml.safe_load(out)
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    [container] = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {
        "/srv/workbench/groups/vision-lab",
        "/srv/workbench/groups/climate-lab",
    }


def test_cli_render_pod_refusal_exits_3(capsys):
    rc = main(
        ["render-pod", "--config", str(DEMO), "--user", "student1", "--groups", "course-ml101", "--profile", "h100-x1"]
    )
    out, err = capsys.readouterr()
    assert rc == 3
    assert out == ""
    assert "Profile 'h100-x1' is not available to you; your groups may use: cpu-small, mig-1g" in err
    assert "403" in err


def test_cli_render_pod_bad_policy_exits_2(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage: {shared_claim: shared}\n")
    rc = main(["render-pod", "--config", str(bad), "--user", "u", "--groups", "g", "--profile", "p"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert f"{bad}: invalid platform policy" in err
    assert "storage.shared_claim: must contain {group}" in err


def test_centre_example_passes_workbench_check(capsys):
    assert main(["check", str(CENTRE)]) == 0
    out = capsys.readouterr().out
    assert "valid (6 groups, 8 profiles)" in out
