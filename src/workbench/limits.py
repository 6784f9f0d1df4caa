"""CPU and memory limits for local single-user servers: cgroups where available, rlimits otherwise.

``local_limits`` (pure) turns a profile into numbers. ``detect_cgroups`` finds a cgroup
hierarchy this process may write (v2 with the cpu and memory controllers, or v1's ``cpu`` and
``memory``). ``Limiter`` makes one cgroup per server, and returns a ``preexec`` step that moves
the child into it before it drops privileges. Without writable cgroups, the child gets
``RLIMIT_DATA`` (memory) and thread-count variables (CPU is then advisory); the spawner logs
which mechanism it used and exports it as ``WORKBENCH_LIMITS``.

GPUs: ``LocalLimits.gpus`` names the minors of the ``/dev/nvidia<N>`` devices the process may open (``None``:
no device control). Every other GPU device present is denied in the same cgroup, with cgroup v1's ``devices``
controller or, on v2, an eBPF device program (:mod:`workbench.devcgroup`). Profiles without a GPU get none
(:func:`local_limits`); a GPU server gets its allocated devices through :meth:`LocalLimits.with_gpus`. Without
writable cgroups there is no device control: ``CUDA_VISIBLE_DEVICES`` is then advice, not a boundary.

CPU weight: every server's cgroup lives under one parent (``workbench``), and the kernel weighs a cgroup against
its siblings as one entity: a parent at the default weight (v1 ``cpu.shares`` 1024, v2 ``cpu.weight`` 100) gets
as much CPU as *one* ordinary process next to it, however many servers, Dask processes and jobs it holds. On a
busy machine that starved every server's start (issue 12). ``Limiter`` therefore sets the parent's weight to one
process's worth per cgroup in it (:func:`parent_cpu_weight`), each time it adds or removes one: N servers weigh
what N stock servers (N processes) would, no more.
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from workbench.devcgroup import attach_device_program, denied_gpus, minors_by_uuid, nvidia_minors, v1_deny_lines
from workbench.policy import Profile
from workbench.sysusers import DEFAULT_ACCOUNT_PREFIX, USER_PREFIX

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: the parent cgroup of every server, job and Dask process; another account namespace gets its own
#: (``workbench-<prefix>``), so two workbenches on one machine never weigh or remove each other's cgroups
PARENT = "workbench" if USER_PREFIX == DEFAULT_ACCOUNT_PREFIX else f"workbench-{USER_PREFIX.rstrip('-')}"
CFS_PERIOD = 100_000


def parent_cpu_weight(mode: str, children: int) -> tuple[str, str]:
    """The parent's CPU weight file and value for ``children`` cgroups in it: one default-weight process each
    (v1 ``cpu.shares`` 1024, v2 ``cpu.weight`` 100), at least one, at most the kernel's maximum (pure)."""
    n = max(1, children)
    if mode == "v2":
        return "cpu.weight", str(min(10_000, 100 * n))
    return "cpu.shares", str(min(262_144, 1024 * n))


@dataclass(frozen=True)
class LocalLimits:
    cpu: float
    memory: int  # bytes (the hard limit)
    gpus: frozenset[int] | None = None  # minors of the /dev/nvidia<N> it may open; None: no device control

    def with_gpus(self, uuids: Iterable[str], by_uuid: dict[str, int] | None = None) -> LocalLimits:
        """These limits, allowing only the GPUs ``uuids`` (for a MIG slice, pass its parent GPU's UUID: slices
        share the parent's device node and are told apart by ``/dev/nvidia-caps``, which is not controlled here)."""
        by_uuid = minors_by_uuid() if by_uuid is None else by_uuid
        return replace(self, gpus=frozenset(by_uuid[u] for u in uuids if u in by_uuid))

    def for_devices(self, uuids: Iterable[str], by_uuid: dict[str, int]) -> tuple[LocalLimits, list[str]]:
        """These limits for a server given the GPUs ``uuids`` (pure): only those GPUs' devices when the driver knows
        every one of them; unchanged (no device control) and the unknown ones when it does not (MIG slices and pretend
        GPUs have no ``/dev/nvidia<N>`` of their own)."""
        uuids = list(uuids)
        missing = [u for u in uuids if u not in by_uuid]
        if not uuids or missing:
            return self, missing
        return self.with_gpus(uuids, by_uuid), []

    @property
    def threads(self) -> int:
        return max(1, math.ceil(self.cpu))

    def env(self, mechanism: str) -> dict[str, str]:
        n = str(self.threads)
        return {
            "WORKBENCH_LIMITS": mechanism,
            "MEM_LIMIT": str(self.memory),
            "CPU_LIMIT": f"{self.cpu:g}",
            "OMP_NUM_THREADS": n,
            "OPENBLAS_NUM_THREADS": n,
            "MKL_NUM_THREADS": n,
        }


def local_limits(profile: Profile) -> LocalLimits:
    """The limits a local server of this profile gets (pure)."""
    return LocalLimits(
        cpu=profile.cpu,
        memory=profile.memory_limit or profile.memory,
        gpus=frozenset() if profile.gpu is None else None,  # no GPU profile: no GPU device at all
    )


def cgroup_files(mode: str, limits: LocalLimits) -> dict[str, str]:
    """Files (relative to the server's cgroup folder, per controller for v1) and their contents (pure)."""
    quota = int(limits.cpu * CFS_PERIOD)
    if mode == "v2":
        return {"memory.max": str(limits.memory), "memory.swap.max": "0", "cpu.max": f"{quota} {CFS_PERIOD}"}
    return {
        "memory/memory.limit_in_bytes": str(limits.memory),
        "cpu/cpu.cfs_period_us": str(CFS_PERIOD),
        "cpu/cpu.cfs_quota_us": str(quota),
    }


def own_cgroups(text: str) -> dict[str, str]:
    """Controller -> path of this process, from /proc/self/cgroup (pure); v2 is under key ''."""
    out = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def _base(root: Path, mode: str, controller: str, own: dict[str, str]) -> Path:
    """Where this hub's per-server cgroups go: nested under the hub's own cgroup, so they stay
    inside whatever limits the machine already puts on the hub."""
    rel = own.get("" if mode == "v2" else controller, "/").lstrip("/")
    return (root / rel if mode == "v2" else root / controller / rel) / PARENT


def detect_cgroups(root: Path = CGROUP_ROOT, proc_cgroup: str = "/proc/self/cgroup") -> str | None:
    """'v2', 'v1' or None: a hierarchy with cpu and memory limits this process can really use.

    Tried for real: a probe cgroup is created with a memory and a CPU limit, then removed.
    """
    try:
        own = own_cgroups(Path(proc_cgroup).read_text())
    except OSError:
        return None
    candidates = []
    if (root / "cgroup.controllers").exists():
        candidates.append("v2")
    if (root / "memory").is_dir() and (root / "cpu").is_dir():
        candidates.append("v1")
    for mode in candidates:
        limiter = Limiter(mode, root, own)
        try:
            limiter.prepare("probe", LocalLimits(cpu=1, memory=2**30))
            return mode
        except OSError:
            continue
        finally:
            limiter.remove("probe")
    return None


class Limiter:
    """Create, join and remove per-server cgroups."""

    def __init__(
        self, mode: str | None, root: Path = CGROUP_ROOT, own: dict[str, str] | None = None, dev: Path = Path("/dev")
    ):
        self.mode = mode
        self.root = root
        self.own = own if own is not None else {}
        self.dev = dev  # where the GPU device nodes are looked for

    @property
    def mechanism(self) -> str:
        return f"cgroup-{self.mode}" if self.mode else "rlimit"

    def _dir(self, controller: str, name: str) -> Path:
        return _base(self.root, self.mode, controller, self.own) / name

    def _dirs(self, name: str) -> list[Path]:
        if self.mode == "v2":
            return [self._dir("", name)]
        dirs = [self._dir(c, name) for c in ("memory", "cpu")]
        devices = self._dir("devices", name)
        return dirs + [devices] if devices.is_dir() else dirs

    def prepare(self, name: str, limits: LocalLimits) -> list[Path]:
        """Create the cgroup(s) of one server and write its limits; returns the folders to join."""
        if self.mode is None:
            return []
        if self.mode == "v2":
            parent = self._dir("", name).parent
            parent.mkdir(exist_ok=True)
            for ctl in ("+cpu", "+memory"):
                for p in (parent.parent, parent):
                    try:
                        (p / "cgroup.subtree_control").write_text(ctl)
                    except OSError:
                        pass
        dirs = self._dirs(name)
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        for rel, value in cgroup_files(self.mode, limits).items():
            if self.mode == "v2":
                target = dirs[0] / rel
            else:
                controller, fname = rel.split("/")
                target = self._dir(controller, name) / fname
            try:
                target.write_text(value)
            except OSError:
                if not rel.endswith("swap.max"):  # swap accounting may be off; the rest must work
                    raise
        joined = dirs + self._deny_gpus(name, limits, dirs)
        self._reweigh_parent()
        return joined

    def _deny_gpus(self, name: str, limits: LocalLimits, dirs: list[Path]) -> list[Path]:
        """Deny the GPU devices present that ``limits`` does not allow; returns extra folders to join (v1).

        Fails (OSError) rather than starting a process that could open GPUs it was not given."""
        if limits.gpus is None:
            return []
        denied = denied_gpus(nvidia_minors(self.dev), limits.gpus)
        if not denied:
            return []
        if self.mode == "v2":
            attach_device_program(dirs[0], denied)
            return []
        d = self._dir("devices", name)
        d.mkdir(parents=True, exist_ok=True)
        for line in v1_deny_lines(denied):
            (d / "devices.deny").write_text(line)
        return [d]

    def remove(self, name: str) -> None:
        for d in self._dirs(name) if self.mode else []:
            try:
                d.rmdir()
            except OSError:
                pass
        if self.mode:
            self._reweigh_parent()

    def _reweigh_parent(self) -> None:
        """One default process's CPU weight per cgroup in the parent (module docstring); best effort."""
        parent = _base(self.root, self.mode, "" if self.mode == "v2" else "cpu", self.own)
        try:
            children = sum(1 for d in parent.iterdir() if d.is_dir())
            fname, value = parent_cpu_weight(self.mode, children)
            (parent / fname).write_text(value)
        except OSError:
            pass

    @staticmethod
    def preexec(dirs: list[Path], limits: LocalLimits):
        """A step for the child, before it drops privileges: join the cgroups, or set rlimits."""
        procs = [str(d / "cgroup.procs") for d in dirs]
        memory = limits.memory

        def step():
            if procs:
                pid = str(os.getpid())
                for p in procs:
                    with open(p, "w") as f:
                        f.write(pid)
            else:
                resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))

        return step
