"""How busy GPUs are: a small interface with an NVML and a file-driven implementation.

:class:`GpuUtilisation` is what the sessions service (:mod:`workbench.services.sessions.app`) asks:
``utilisation(devices) -> {device: percent}``. A device it cannot read is left out of the
answer (unknown), and the service never counts an unknown device as idle.

- :class:`NvmlUtilisation` reads the GPUs of this machine through NVML (``pip install
  workbench[gpu]``, i.e. nvidia-ml-py; imported only when used). Devices are the ids the local
  spawner hands out: GPU UUIDs (``GPU-…``), MIG UUIDs (``MIG-…``) or indexes. NVML reports no
  utilisation for MIG slices, so they stay unknown.
- :class:`FileUtilisation` reads a JSON file ``{"<device>": <percent>, ...}`` at each call: for
  ``workbench up --fake-gpus`` (pretend devices, ``<state>/fake-gpu-utilisation.json``) and tests.
  A device's value may also be ``{"utilisation": <percent>, "memory_used": <bytes>, "memory_total": <bytes>}``.

Both also answer ``memory(devices) -> {device: (used bytes, total bytes)}`` (the JupyterLab cockpit shows it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

log = logging.getLogger("workbench.services.sessions.app")

FAKE_PREFIX = "FAKE-"  # device ids of workbench up --fake-gpus (workbench.gpus.parse_fake_gpus)
FAKE_FILE = "fake-gpu-utilisation.json"


@runtime_checkable
class GpuUtilisation(Protocol):
    """Reads the current utilisation (0-100 %) of GPU devices."""

    def utilisation(self, devices: Iterable[str]) -> dict[str, float]:
        """``{device: percent}`` for the devices that could be read; unknown devices are left out."""
        ...


class FileUtilisation:
    """Utilisation from a JSON file ``{device: percent}``, read at every call (missing file: all unknown)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _read(self) -> Mapping:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("cannot read GPU utilisation from %s: %s", self.path, e)
            return {}
        if not isinstance(data, Mapping):
            log.warning("%s: expected a JSON object {device: percent}", self.path)
            return {}
        return data

    def utilisation(self, devices: Iterable[str]) -> dict[str, float]:
        data = self._read()
        out = {}
        for d in devices:
            v = data.get(d)
            if isinstance(v, Mapping):
                v = v.get("utilisation")
            if _number(v):
                out[d] = float(v)
        return out

    def memory(self, devices: Iterable[str]) -> dict[str, tuple[int, int]]:
        data = self._read()
        out = {}
        for d in devices:
            v = data.get(d)
            if isinstance(v, Mapping) and _number(v.get("memory_used")) and _number(v.get("memory_total")):
                out[d] = (int(v["memory_used"]), int(v["memory_total"]))
        return out


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class NvmlUtilisation:
    """Utilisation of this machine's GPUs through NVML (nvidia-ml-py)."""

    def __init__(self):
        import pynvml  # nvidia-ml-py: pip install 'workbench[gpu]'

        self.nvml = pynvml
        pynvml.nvmlInit()

    def _handle(self, device: str):
        if device.isdigit():
            return self.nvml.nvmlDeviceGetHandleByIndex(int(device))
        return self.nvml.nvmlDeviceGetHandleByUUID(device)

    def utilisation(self, devices: Iterable[str]) -> dict[str, float]:
        out = {}
        for d in devices:
            try:
                out[d] = float(self.nvml.nvmlDeviceGetUtilizationRates(self._handle(d)).gpu)
            except self.nvml.NVMLError as e:  # MIG slices, lost devices: unknown
                log.debug("no utilisation for GPU %s: %s", d, e)
        return out

    def memory(self, devices: Iterable[str]) -> dict[str, tuple[int, int]]:
        out = {}
        for d in devices:
            try:
                info = self.nvml.nvmlDeviceGetMemoryInfo(self._handle(d))
                out[d] = (int(info.used), int(info.total))
            except self.nvml.NVMLError as e:
                log.debug("no memory figures for GPU %s: %s", d, e)
        return out

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass


def choose_source(
    gpus: Mapping[str, list[str]], state_dir: str | Path, file: str | Path | None = None
) -> GpuUtilisation | None:
    """The utilisation source for this machine's ``gpus`` ({type: [device ids]}, from runtime.json).

    ``file`` (``--gpu-utilisation-file``) wins; pretend devices (``--fake-gpus``) read
    ``<state_dir>/fake-gpu-utilisation.json``; real devices use NVML when it loads; no GPUs: None.
    """
    if file:
        return FileUtilisation(file)
    devices = [d for ids in gpus.values() for d in ids]
    if not devices:
        return None
    if all(d.startswith(FAKE_PREFIX) for d in devices):
        return FileUtilisation(Path(state_dir, FAKE_FILE))
    try:
        return NvmlUtilisation()
    except ImportError:
        log.warning("GPU idleness is not checked: nvidia-ml-py is not installed (pip install 'workbench[gpu]')")
    except Exception as e:  # NVMLError: no driver
        log.warning("GPU idleness is not checked: NVML did not start: %s", e)
    return None
