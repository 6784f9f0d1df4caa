"""The CPU weight of the servers' parent cgroup (workbench.limits): one default process's worth per cgroup in it.

A stand-in cgroup tree (plain folders and files under tmp_path, in the layout of /sys/fs/cgroup) stands for the
kernel's; the real hierarchy is exercised by tests/unit/test_devcgroup.py and the integration tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench.limits import Limiter, LocalLimits, parent_cpu_weight

LIMITS = LocalLimits(cpu=1, memory=2**30)


def test_parent_cpu_weight_per_child_and_bounded():
    assert parent_cpu_weight("v1", 0) == ("cpu.shares", "1024")
    assert parent_cpu_weight("v1", 3) == ("cpu.shares", "3072")
    assert parent_cpu_weight("v1", 10_000) == ("cpu.shares", "262144")
    assert parent_cpu_weight("v2", 2) == ("cpu.weight", "200")
    assert parent_cpu_weight("v2", 500) == ("cpu.weight", "10000")


@pytest.mark.parametrize("mode", ["v1", "v2"])
def test_parent_weight_follows_the_servers(tmp_path: Path, mode: str):
    """Each server added weighs one more default process; removing one takes its weight back."""
    for c in ("cpu", "memory"):
        (tmp_path / c).mkdir()
    limiter = Limiter(mode, root=tmp_path, own={"cpu": "/", "memory": "/", "": "/"}, dev=tmp_path)
    parent = tmp_path / "workbench" if mode == "v2" else tmp_path / "cpu" / "workbench"
    weight = parent / ("cpu.weight" if mode == "v2" else "cpu.shares")
    one = "100" if mode == "v2" else "1024"
    limiter.prepare("researcher", LIMITS)
    assert weight.read_text() == one
    limiter.prepare("student1", LIMITS)
    assert weight.read_text() == str(2 * int(one))
    for f in (parent / "student1").iterdir():  # the kernel's files vanish with the folder; stand-ins do not
        f.unlink()
    limiter.remove("student1")
    assert not (parent / "student1").exists()
    assert weight.read_text() == one
