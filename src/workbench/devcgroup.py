"""Device control for local processes: which NVIDIA GPUs (``/dev/nvidia<N>``, char major 195) a cgroup may open.

``CUDA_VISIBLE_DEVICES`` only tells CUDA which devices to use; a process can still open every
``/dev/nvidia<N>`` the file mode allows (0666 on a usual driver install). The kernel's device controller makes
it a boundary: an ``open`` (or ``mknod``) of a denied device fails with ``EPERM`` whatever the file mode.

- cgroup v1: the ``devices`` controller, one ``devices.deny`` line per denied device (:func:`v1_deny_lines`);
- cgroup v2 has no ``devices.*`` files: a ``BPF_PROG_TYPE_CGROUP_DEVICE`` program attached to the cgroup
  (``BPF_CGROUP_DEVICE``, ``BPF_F_ALLOW_MULTI`` so the machine's own programs above still run) decides; the
  program is built here (:func:`device_program`, pure: the instructions as bytes) and loaded with the
  ``bpf`` system call (:func:`attach_device_program`), no compiler or library needed.

Only GPU devices are denied (``/dev/nvidiactl``, ``nvidia-uvm`` and the rest stay as they are: CUDA needs them);
which minors exist is read from ``/dev`` (:func:`nvidia_minors`), and which minor a GPU UUID has from the driver's
``/proc/driver/nvidia/gpus/*/information`` (:func:`minors_by_uuid`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import stat
import struct
from collections.abc import Iterable
from pathlib import Path

NVIDIA_MAJOR = 195
_GPU_NODE = re.compile(r"^nvidia(\d+)$")

# linux/bpf.h
_BPF_PROG_LOAD, _BPF_PROG_ATTACH, _BPF_PROG_QUERY = 5, 8, 16
_BPF_PROG_TYPE_CGROUP_DEVICE = 15
_BPF_CGROUP_DEVICE = 6
_BPF_F_ALLOW_MULTI = 2
_BPF_DEVCG_DEV_CHAR = 2
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}


def nvidia_minors(dev: Path = Path("/dev")) -> set[int]:
    """Minors of the GPU device nodes ``/dev/nvidia<N>`` (char, major 195) that exist."""
    out = set()
    try:
        names = os.listdir(dev)
    except OSError:
        return out
    for name in names:
        if _GPU_NODE.match(name):
            try:
                st = os.lstat(dev / name)
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == NVIDIA_MAJOR:
                out.add(os.minor(st.st_rdev))
    return out


def minors_by_uuid(root: Path = Path("/proc/driver/nvidia/gpus")) -> dict[str, int]:
    """GPU UUID -> device minor, from the NVIDIA driver's ``information`` files (empty without the driver)."""
    out = {}
    for info in sorted(root.glob("*/information")) if root.is_dir() else []:
        fields = dict(
            (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in info.read_text().splitlines())
        )
        if fields.get("GPU UUID") and fields.get("Device Minor", "").isdigit():
            out[fields["GPU UUID"]] = int(fields["Device Minor"])
    return out


def denied_gpus(present: Iterable[int], allowed: Iterable[int]) -> list[tuple[int, int]]:
    """(major, minor) of each present GPU device not allowed (pure)."""
    return [(NVIDIA_MAJOR, m) for m in sorted(set(present) - set(allowed))]


def v1_deny_lines(denied: Iterable[tuple[int, int]]) -> list[str]:
    """Lines for cgroup v1's ``devices.deny``, one write each (pure)."""
    return [f"c {major}:{minor} rwm" for major, minor in denied]


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def device_program(denied: list[tuple[int, int]]) -> bytes:
    """eBPF instructions of a cgroup device program that refuses the char devices ``denied`` and allows the rest
    (pure). The context is ``struct bpf_cgroup_dev_ctx {u32 access_type; u32 major; u32 minor}``, the device type
    in the low 16 bits of ``access_type``; returning 0 refuses (``EPERM``), 1 allows."""
    ldxw, and64, jne, jeq, mov64, exit_ = 0x61, 0x57, 0x55, 0x15, 0xB7, 0x95
    allow = 5 + 2 * len(denied)  # index of the "allow" block; "deny" follows it
    prog = [
        _insn(ldxw, dst=2, src=1, off=0),  # r2 = ctx->access_type
        _insn(and64, dst=2, imm=0xFFFF),  # r2 = device type
        _insn(jne, dst=2, off=allow - 3, imm=_BPF_DEVCG_DEV_CHAR),  # not a char device: allow
        _insn(ldxw, dst=3, src=1, off=4),  # r3 = major
        _insn(ldxw, dst=4, src=1, off=8),  # r4 = minor
    ]
    for i, (major, minor) in enumerate(denied):
        here = 5 + 2 * i
        prog.append(_insn(jne, dst=3, off=1, imm=major))
        prog.append(_insn(jeq, dst=4, off=(allow + 2) - (here + 2), imm=minor))
    prog += [_insn(mov64, dst=0, imm=1), _insn(exit_), _insn(mov64, dst=0, imm=0), _insn(exit_)]
    return b"".join(prog)


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"bpf: system call number unknown on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(number), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return rc


def attach_device_program(cgroup_dir: Path, denied: list[tuple[int, int]]) -> None:
    """Load :func:`device_program` and attach it to the cgroup v2 folder ``cgroup_dir`` (root only).

    The cgroup keeps the program: it applies to every process in the cgroup and its children, and goes
    with the cgroup when it is removed.
    """
    code = device_program(denied)
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = ctypes.create_string_buffer(128)
    struct.pack_into(
        "<IIQQIIQ",
        attr,
        0,
        _BPF_PROG_TYPE_CGROUP_DEVICE,
        len(code) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(license_),
        1,
        len(log),
        ctypes.addressof(log),
    )
    try:
        prog = _bpf(_BPF_PROG_LOAD, attr)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror}; verifier: {log.value.decode(errors='replace').strip()}") from None
    try:
        cg = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            attach = ctypes.create_string_buffer(20)
            struct.pack_into("<IIIII", attach, 0, cg, prog, _BPF_CGROUP_DEVICE, _BPF_F_ALLOW_MULTI, 0)
            _bpf(_BPF_PROG_ATTACH, attach)
        finally:
            os.close(cg)
    finally:
        os.close(prog)


def device_programs_attached(cgroup_dir: Path) -> int:
    """How many device programs are attached to the cgroup v2 folder ``cgroup_dir`` itself (``BPF_PROG_QUERY``)."""
    attr = ctypes.create_string_buffer(40)
    cg = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        struct.pack_into("<IIII", attr, 0, cg, _BPF_CGROUP_DEVICE, 0, 0)
        _bpf(_BPF_PROG_QUERY, attr)
    finally:
        os.close(cg)
    return struct.unpack_from("<I", attr, 24)[0]
