"""GPU device control (workbench.devcgroup, Limiter's GPU part): the pure parts against literals, and, as root,
the real kernel refusing a stand-in GPU device.

There is no GPU here. The stand-in: a char device node made with ``mknod`` with the NVIDIA major (195) in a
temporary folder. Without a driver, opening it fails with ENXIO ("no such device"); when the cgroup's device
control refuses it, with EPERM before any driver is asked. So ENXIO for an allowed minor and EPERM for a denied
one is the kernel's own answer, not a mock.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.devcgroup import (
    attach_device_program,
    denied_gpus,
    device_program,
    device_programs_attached,
    minors_by_uuid,
    nvidia_minors,
    v1_deny_lines,
)
from workbench.limits import Limiter, LocalLimits, detect_cgroups, local_limits, own_cgroups
from workbench.policy import parse_policy

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="mknod and cgroups need root")

INFORMATION = """Model: \t\t NVIDIA H100 80GB HBM3
IRQ:   \t\t 155
GPU UUID: \t GPU-6a0f1c2e-0000-4000-8000-000000000001
Video BIOS: \t 96.00.74.00.01
Bus Type: \t PCIe
Bus Location: \t 0000:3b:00.0
Device Minor: \t 2
GPU Excluded:\t No
"""


def test_the_device_program_refuses_exactly_the_denied_char_devices():
    # r2 = access_type & 0xffff; not char -> allow; r3 = major, r4 = minor; 195:3 -> deny; allow: 1; deny: 0
    expected = bytes.fromhex(
        "6112000000000000"
        "57020000ffff0000"
        "5502040002000000"
        "6113040000000000"
        "6114080000000000"
        "55030100c3000000"
        "1504020003000000"
        "b700000001000000"
        "9500000000000000"
        "b700000000000000"
        "9500000000000000"
    )
    assert device_program([(195, 3)]) == expected
    two = device_program([(195, 0), (195, 1)])
    assert len(two) == 8 * 13 and two[-32:] == expected[-32:]


def test_denied_gpus_and_v1_lines():
    assert denied_gpus({0, 1, 2, 3}, {1, 3}) == [(195, 0), (195, 2)]
    assert denied_gpus({0}, set()) == [(195, 0)]
    assert denied_gpus(set(), set()) == []
    assert v1_deny_lines([(195, 0), (195, 2)]) == ["c 195:0 rwm", "c 195:2 rwm"]


def test_minors_by_uuid_reads_the_drivers_information_files(tmp_path):
    (tmp_path / "0000:3b:00.0").mkdir()
    (tmp_path / "0000:3b:00.0" / "information").write_text(INFORMATION)
    assert minors_by_uuid(tmp_path) == {"GPU-6a0f1c2e-0000-4000-8000-000000000001": 2}
    assert minors_by_uuid(tmp_path / "absent") == {}
    lim = LocalLimits(cpu=1, memory=2**30).with_gpus(
        ["GPU-6a0f1c2e-0000-4000-8000-000000000001", "fake-0"], by_uuid=minors_by_uuid(tmp_path)
    )
    assert lim.gpus == frozenset({2})  # a fake GPU (--fake-gpus) has no device node: nothing to allow


def test_profiles_without_a_gpu_get_no_gpu_device_and_gpu_profiles_wait_for_their_devices():
    policy = parse_policy(
        {
            "gpu_types": {"h100": {}},
            "images": {"base": {"image": "x"}},
            "profiles": {
                "cpu": {"cpu": 1, "memory": "1G"},
                "gpu": {"cpu": 1, "memory": "1G", "gpu": {"type": "h100", "count": 1}},
            },
            "groups": {"lab": {"kind": "research", "profiles": ["cpu", "gpu"]}},
            "auth": {"demo_users": {"u": {"groups": ["lab"]}}},
        }
    )
    assert local_limits(policy.profiles["cpu"]).gpus == frozenset()
    assert local_limits(policy.profiles["gpu"]).gpus is None


def test_a_gpu_server_may_open_only_its_allocated_gpus_when_the_driver_knows_them():
    """What the local spawner does with the devices it allocated (``LocalLimits.for_devices``)."""
    gpu = LocalLimits(cpu=1, memory=2**30)
    by_uuid = {"GPU-a": 0, "GPU-b": 1, "GPU-c": 2}
    limits, unknown = gpu.for_devices(["GPU-b", "GPU-c"], by_uuid)
    assert (limits.gpus, unknown) == (frozenset({1, 2}), [])
    assert denied_gpus([0, 1, 2], limits.gpus) == [(195, 0)]
    # a MIG slice or a pretend GPU has no device node of its own: no device control, and the spawner is told which
    limits, unknown = gpu.for_devices(["GPU-a", "MIG-1"], by_uuid)
    assert (limits.gpus, unknown) == (None, ["MIG-1"])
    assert gpu.for_devices([], by_uuid) == (gpu, [])


@ROOT
def test_nvidia_minors_counts_char_devices_of_major_195_only(tmp_path):
    os.mknod(tmp_path / "nvidia0", 0o666 | 0o020000, os.makedev(195, 0))
    os.mknod(tmp_path / "nvidia7", 0o666 | 0o020000, os.makedev(195, 7))
    os.mknod(tmp_path / "nvidia9", 0o666 | 0o020000, os.makedev(1, 3))  # not a GPU's major
    os.mknod(tmp_path / "nvidiactl", 0o666 | 0o020000, os.makedev(195, 255))  # the control device: never denied
    (tmp_path / "nvidia5").write_text("")  # a regular file
    assert nvidia_minors(tmp_path) == {0, 7}


_OPEN = """
import errno, os, sys
for path in sys.argv[1:]:
    try:
        os.close(os.open(path, os.O_RDWR))
        print("opened")
    except OSError as e:
        print(errno.errorcode[e.errno])
"""


def _stand_ins(folder: Path) -> list[Path]:
    nodes = []
    for minor in (0, 1):
        node = folder / f"nvidia{minor}"
        os.mknod(node, 0o666 | 0o020000, os.makedev(195, minor))
        nodes.append(node)
    return nodes


def _open_in(preexec, nodes: list[Path]) -> list[str]:
    r = subprocess.run(
        [sys.executable, "-c", _OPEN, *map(str, nodes)], preexec_fn=preexec, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def _cgroup2_root() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mountpoint, fstype, *_ = line.split()
        if fstype == "cgroup2" and os.access(mountpoint, os.W_OK):
            return Path(mountpoint)
    return None


@ROOT
def test_the_device_program_attached_to_a_cgroup_v2_denies_a_stand_in_gpu(tmp_path):
    root = _cgroup2_root()
    if root is None:
        pytest.skip("no writable cgroup2 hierarchy")
    nodes = _stand_ins(tmp_path)
    cg = root / f"wb-devcgroup-test-{os.getpid()}"
    cg.mkdir()
    try:
        assert device_programs_attached(cg) == 0
        attach_device_program(cg, [(195, 0)])
        assert device_programs_attached(cg) == 1
        procs = str(cg / "cgroup.procs")

        def join():
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        assert _open_in(join, nodes) == ["EPERM", "ENXIO"]  # denied by the program; allowed, then no driver
        assert _open_in(None, nodes) == ["ENXIO", "ENXIO"]  # outside the cgroup: nothing denied
    finally:
        cg.rmdir()


@ROOT
def test_the_limiter_denies_the_gpus_a_process_was_not_given(tmp_path):
    """The Limiter as servers and Dask workers use it (this machine's cgroup mode), with stand-in GPUs."""
    mode = detect_cgroups()
    if mode is None:
        pytest.skip("no writable cgroups: no device control (see docs/security.md)")
    nodes = _stand_ins(tmp_path)
    limiter = Limiter(mode, own=own_cgroups(Path("/proc/self/cgroup").read_text()), dev=tmp_path)
    name = f"devtest-{os.getpid()}"
    limits = LocalLimits(cpu=1, memory=2**30, gpus=frozenset({1}))
    try:
        dirs = limiter.prepare(name, limits)
        assert _open_in(Limiter.preexec(dirs, limits), nodes) == ["EPERM", "ENXIO"]
        nothing = LocalLimits(cpu=1, memory=2**30, gpus=frozenset())  # a CPU profile, a Dask worker
        limiter.remove(name)
        dirs = limiter.prepare(name, nothing)
        assert _open_in(Limiter.preexec(dirs, nothing), nodes) == ["EPERM", "EPERM"]
        free = LocalLimits(cpu=1, memory=2**30)  # gpus=None: no device control
        limiter.remove(name)
        dirs = limiter.prepare(name, free)
        assert _open_in(Limiter.preexec(dirs, free), nodes) == ["ENXIO", "ENXIO"]
    finally:
        limiter.remove(name)
    assert not any(d.exists() for d in limiter._dirs(name))
