"""Local GPU inventory/allocation and local CPU/memory limits (pure parts)."""

from __future__ import annotations

import pytest

from workbench.gpus import Device, GpuAllocator, NoFreeGpu, inventory, parse_fake_gpus, parse_nvidia_smi
from workbench.limits import LocalLimits, cgroup_files, local_limits, own_cgroups
from workbench.policy import parse_policy
from workbench.spawn.common import describe_profile, options_form_html

NVIDIA_SMI_L = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)
  MIG 1g.10gb     Device  0: (UUID: MIG-b-0)
  MIG 1g.10gb     Device  1: (UUID: MIG-b-1)
  MIG 3g.40gb     Device  2: (UUID: MIG-b-2)
GPU 2: NVIDIA A100-SXM4-80GB (UUID: GPU-cccc)
"""

POLICY = parse_policy(
    {
        "gpu_types": {
            "h100": {"display_name": "H100"},
            "a100": {"product": "A100-SXM4"},
            "h100-mig-1g": {"resource": "nvidia.com/mig-1g.10gb"},
        },
        "images": {"base": {"image": "x"}},
        "profiles": {
            "cpu": {"cpu": 2, "memory": "4G"},
            "gpu": {"cpu": 8, "memory": "64G", "memory_limit": "80G", "gpu": {"type": "h100", "count": 2}},
            "mig": {"cpu": 1, "memory": "8G", "gpu": {"type": "h100-mig-1g"}},
        },
        "groups": {
            "lab": {"kind": "research", "display_name": "The Lab", "profiles": ["cpu", "gpu"]},
            "course": {"kind": "course", "profiles": ["cpu", "mig"]},
        },
        "auth": {"demo_users": {"u": {"groups": ["lab"]}}},
    }
)


def test_parse_nvidia_smi_whole_gpus_and_mig_slices():
    devices = parse_nvidia_smi(NVIDIA_SMI_L)
    assert devices == [
        Device("GPU-aaaa", "NVIDIA H100 80GB HBM3"),
        Device("GPU-bbbb", "NVIDIA H100 80GB HBM3"),
        Device("MIG-b-0", "NVIDIA H100 80GB HBM3", "1g.10gb", "GPU-bbbb"),
        Device("MIG-b-1", "NVIDIA H100 80GB HBM3", "1g.10gb", "GPU-bbbb"),
        Device("MIG-b-2", "NVIDIA H100 80GB HBM3", "3g.40gb", "GPU-bbbb"),
        Device("GPU-cccc", "NVIDIA A100-SXM4-80GB"),
    ]
    assert parse_nvidia_smi("") == []
    assert parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the driver") == []


def test_inventory_matches_types_and_never_offers_a_split_gpu_whole():
    inv = inventory(POLICY, parse_nvidia_smi(NVIDIA_SMI_L))
    assert inv == {"h100": ["GPU-aaaa"], "a100": ["GPU-cccc"], "h100-mig-1g": ["MIG-b-0", "MIG-b-1"]}
    assert inventory(POLICY, []) == {"h100": [], "a100": [], "h100-mig-1g": []}


def test_allocator_is_exclusive_and_explains_refusals():
    alloc = GpuAllocator({"h100": ["g0", "g1", "g2"], "a100": []})
    assert alloc.allocate("alice", "h100", 2) == ["g0", "g1"]
    with pytest.raises(NoFreeGpu, match=r"No free GPU of type h100 \(H100\): 2 requested, 1 of 3 free"):
        alloc.allocate("bob", "h100", 2, "H100")
    assert alloc.allocate("bob", "h100", 1) == ["g2"]
    with pytest.raises(NoFreeGpu, match="this machine has none"):
        alloc.allocate("carol", "a100", 1)
    with pytest.raises(NoFreeGpu, match="this machine has none"):
        alloc.allocate("carol", "b200", 1)
    alloc.release("alice")
    assert alloc.free("h100") == ["g0", "g1"]
    alloc.restore("alice", ["g1"])  # after a hub restart, from the spawner's saved state
    assert alloc.free("h100") == ["g0"]


def test_parse_fake_gpus():
    assert parse_fake_gpus("h100:2, h100-mig-1g:1") == {
        "h100": ["FAKE-h100-0", "FAKE-h100-1"],
        "h100-mig-1g": ["FAKE-h100-mig-1g-0"],
    }
    with pytest.raises(ValueError, match="expected TYPE:COUNT like h100:2, got 'h100'"):
        parse_fake_gpus("h100")


def test_local_limits_use_the_hard_limit_and_export_thread_counts():
    assert local_limits(POLICY.profiles["gpu"]) == LocalLimits(cpu=8.0, memory=80 * 10**9)
    lim = LocalLimits(cpu=1.5, memory=4 * 10**9)
    assert lim.env("cgroup-v1") == {
        "WORKBENCH_LIMITS": "cgroup-v1",
        "MEM_LIMIT": "4000000000",
        "CPU_LIMIT": "1.5",
        "OMP_NUM_THREADS": "2",
        "OPENBLAS_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
    }


def test_cgroup_files_for_v1_and_v2():
    lim = LocalLimits(cpu=0.5, memory=2**30)
    assert cgroup_files("v2", lim) == {"memory.max": "1073741824", "memory.swap.max": "0", "cpu.max": "50000 100000"}
    assert cgroup_files("v1", lim) == {
        "memory/memory.limit_in_bytes": "1073741824",
        "cpu/cpu.cfs_period_us": "100000",
        "cpu/cpu.cfs_quota_us": "50000",
    }


def test_own_cgroups_parses_v1_and_v2_lines():
    text = "4:memory:/box/1\n2:cpu,cpuacct:/\n0::/user.slice/x\n"
    assert own_cgroups(text) == {"memory": "/box/1", "cpu": "/", "cpuacct": "/", "": "/user.slice/x"}


def test_spawn_form_lists_entitled_profiles_grouped_and_described():
    html = options_form_html(POLICY, ["course"])
    assert 'value="cpu"' in html and 'value="mig"' in html and 'value="gpu"' not in html
    assert html.count("checked") == 1
    both = options_form_html(POLICY, ["lab", "course"])
    # a profile shared by two groups appears once, under the first group
    assert both.count('value="cpu"') == 1
    assert both.index("The Lab") < both.index('value="cpu"') < both.index("<legend>course</legend>")
    assert describe_profile(POLICY, "gpu") == "2\u00d7 H100 \u00b7 8 CPU \u00b7 80 GB \u00b7 image: x"
