"""Local GPUs for the embedded mode: inventory by GPU type, and exclusive allocation to servers.

``parse_nvidia_smi`` and ``inventory`` are pure: ``nvidia-smi -L`` text in, ``{gpu_type: [device
ids]}`` out. Whole GPUs match a GPU type by its ``product`` (or, when empty, by the type's name
appearing in the product name, e.g. ``h100`` in "NVIDIA H100 80GB HBM3"); MIG slices match a type
whose resource is ``nvidia.com/mig-<profile>`` (e.g. ``mig-1g.10gb``). A GPU split into MIG
slices is not offered whole. Device ids are UUIDs, which ``CUDA_VISIBLE_DEVICES`` accepts.

``GpuAllocator`` hands devices to servers so that no two servers share one; it lives in the hub
process and is rebuilt from the spawners' saved state after a hub restart.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from workbench.policy import Policy

_GPU_RE = re.compile(r"^GPU (?P<index>\d+): (?P<name>.+?) \(UUID: (?P<uuid>[^)]+)\)")
_MIG_RE = re.compile(r"^\s+MIG (?P<profile>\S+)\s+Device\s+(?P<index>\d+): \(UUID: (?P<uuid>[^)]+)\)")


@dataclass(frozen=True)
class Device:
    uuid: str
    name: str  # product name of the (parent) GPU
    mig_profile: str = ""  # e.g. "1g.10gb" for a MIG slice
    parent: str = ""  # uuid of the parent GPU of a MIG slice


def parse_nvidia_smi(text: str) -> list[Device]:
    """Devices listed by ``nvidia-smi -L`` (pure)."""
    devices: list[Device] = []
    current: Device | None = None
    for line in text.splitlines():
        if m := _GPU_RE.match(line):
            current = Device(uuid=m["uuid"], name=m["name"])
            devices.append(current)
        elif (m := _MIG_RE.match(line)) and current is not None:
            devices.append(Device(uuid=m["uuid"], name=current.name, mig_profile=m["profile"], parent=current.uuid))
    return devices


def _mig_profile(resource: str) -> str:
    _, _, name = resource.partition("/")
    return name[len("mig-") :] if name.startswith("mig-") else ""


def inventory(policy: Policy, devices: list[Device]) -> dict[str, list[str]]:
    """Device ids per GPU type of the policy (pure)."""
    split = {d.parent for d in devices if d.mig_profile}
    out: dict[str, list[str]] = {name: [] for name in policy.gpu_types}
    for tname, gtype in policy.gpu_types.items():
        mig = _mig_profile(gtype.resource)
        for d in devices:
            if mig:
                if d.mig_profile == mig:
                    out[tname].append(d.uuid)
            elif not d.mig_profile and d.uuid not in split:
                wanted = (gtype.product or tname).lower()
                if wanted in d.name.lower():
                    out[tname].append(d.uuid)
    return out


def detect_devices() -> list[Device]:
    """Devices of this machine (empty without nvidia-smi or GPUs)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        res = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi(res.stdout) if res.returncode == 0 else []


def parse_fake_gpus(spec: str) -> dict[str, list[str]]:
    """``h100:2,h100-mig-1g:3`` -> pretend devices, for tests on machines without a GPU (pure)."""
    out: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition(":")
        if not count.isdigit():
            raise ValueError(f"--fake-gpus: expected TYPE:COUNT like h100:2, got {part!r}")
        out[name] = [f"FAKE-{name}-{i}" for i in range(int(count))]
    return out


class NoFreeGpu(Exception):
    pass


class GpuAllocator:
    """Exclusive assignment of local GPU devices to servers."""

    def __init__(self, devices: dict[str, list[str]]):
        self.devices = {t: list(ids) for t, ids in devices.items()}
        self.owner: dict[str, str] = {}  # device id -> server key

    def free(self, gpu_type: str) -> list[str]:
        return [d for d in self.devices.get(gpu_type, []) if d not in self.owner]

    def allocate(self, key: str, gpu_type: str, count: int, label: str = "") -> list[str]:
        free = self.free(gpu_type)
        total = len(self.devices.get(gpu_type, []))
        if len(free) < count:
            what = label or gpu_type
            if total == 0:
                raise NoFreeGpu(
                    f"No free GPU of type {gpu_type} ({what}): this machine has none. "
                    f"Pick a profile without a GPU, or ask the platform team for a machine with {what}."
                )
            raise NoFreeGpu(
                f"No free GPU of type {gpu_type} ({what}): {count} requested, {len(free)} of {total} free "
                f"(the others are in use by running servers). Try again later or pick another profile."
            )
        chosen = free[:count]
        for d in chosen:
            self.owner[d] = key
        return chosen

    def restore(self, key: str, ids: list[str]) -> None:
        for d in ids:
            self.owner[d] = key

    def release(self, key: str) -> None:
        for d in [d for d, k in self.owner.items() if k == key]:
            del self.owner[d]
