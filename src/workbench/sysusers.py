"""System users for the embedded mode: one Unix account per hub user when the hub runs as root.

Hub names can be anything an identity provider sends (``Jane.Doe@uni.example``); Unix names
cannot. ``system_username`` maps one to the other deterministically, with a prefix so that
Workbench accounts never collide with the machine's own (``admin`` -> ``wb-admin``).

Root never acts on a path a user controls: homes are opened with ``O_NOFOLLOW|O_DIRECTORY`` and
changed through the open descriptor (``fchown``/``fchmod``), files in them are created with
:func:`create_file_at` (``O_CREAT|O_EXCL|O_NOFOLLOW`` relative to the open folder), and
:func:`ensure_folder` refuses to work below a folder that anyone but root could change.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import re
import stat
import subprocess
from pathlib import Path

_MAX = 32  # useradd's limit
_HASHED = re.compile(r"-[0-9a-f]{6}$")


def system_username(hub_name: str, prefix: str = "wb-") -> str:
    """Deterministic, valid Unix user name for a hub user (pure)."""
    clean = re.sub(r"[^a-z0-9_-]", "-", hub_name.lower()).strip("-") or "user"
    name = f"{prefix}{clean}"
    # plain names never look like hashed ones (ending in -xxxxxx), so two hub users never share an account
    if clean != hub_name or len(name) > _MAX or _HASHED.search(clean):
        # the mapping was lossy: add a short hash so that distinct hub names stay distinct
        digest = hashlib.sha256(hub_name.encode()).hexdigest()[:6]
        name = f"{name[: _MAX - 7]}-{digest}"
    return name


def ensure_system_user(name: str, comment: str = "") -> pwd.struct_passwd:
    """Create the Unix account ``name`` with a private home (0700) if it does not exist."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        cmd = ["useradd", "--create-home", "--shell", "/bin/bash", "--user-group"]
        if comment:
            cmd += ["--comment", comment]
        res = subprocess.run([*cmd, name], capture_output=True, text=True)
        if res.returncode not in (0, 9):  # 9: created concurrently by another process
            raise RuntimeError(f"useradd {name} failed: {res.stderr.strip()}") from None
        entry = pwd.getpwnam(name)
    home = Path(entry.pw_dir)
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    # through the descriptor: a home replaced by a symlink is refused, never followed
    fd = open_dir_nofollow(home)
    try:
        os.fchown(fd, entry.pw_uid, entry.pw_gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return entry


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir_nofollow(path: str | os.PathLike, dir_fd: int | None = None) -> int:
    """Open a folder for ``*at`` calls; a symlink (or anything but a folder) in its place is an OSError."""
    return os.open(path, _DIR_FLAGS, dir_fd=dir_fd)


def create_file_at(
    dir_fd: int, name: str, data: bytes, uid: int | None = None, gid: int | None = None, mode: int = 0o644
) -> bool:
    """Create ``name`` in the open folder ``dir_fd`` with ``data``, owned by ``uid``:``gid``.

    Never through a symlink and never over anything that exists (``O_CREAT|O_EXCL|O_NOFOLLOW``:
    a symlink there, even a dangling one, counts as existing); ownership is set on the open
    descriptor. Returns False, writing nothing, when the name exists.
    """
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"not a plain file name: {name!r}")
    try:
        fd = os.open(name, _NEW_FILE_FLAGS, mode, dir_fd=dir_fd)
    except FileExistsError:
        return False
    try:
        if uid is not None:
            os.fchown(fd, uid, -1 if gid is None else gid)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return True


def others_can_execute(path: str | os.PathLike) -> tuple[bool, str]:
    """Whether an unprivileged user can reach and run ``path``; else the blocking folder."""
    p = Path(path).resolve()
    for parent in reversed(p.parents):
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            return False, str(parent)
    if not p.stat().st_mode & stat.S_IXOTH:
        return False, str(p)
    return True, ""


def unix_group_name(policy_group: str, prefix: str = "wb-g-") -> str:
    """Unix group that holds the members of a policy group (pure)."""
    return system_username(policy_group, prefix)


def ensure_group_membership(user: str, group: str) -> None:
    """Create the Unix group ``group`` if needed and make ``user`` a member."""
    try:
        entry = grp.getgrnam(group)
    except KeyError:
        res = subprocess.run(["groupadd", group], capture_output=True, text=True)
        if res.returncode not in (0, 9):  # 9: created concurrently
            raise RuntimeError(f"groupadd {group} failed: {res.stderr.strip()}") from None
        entry = grp.getgrnam(group)
    if user not in entry.gr_mem:
        res = subprocess.run(["gpasswd", "--add", user, group], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"gpasswd --add {user} {group} failed: {res.stderr.strip()}")


def root_controlled(path: str | os.PathLike) -> tuple[bool, str]:
    """Whether no one but root can change what ``path`` (an existing folder) names; else the culprit.

    Every folder from ``/`` down to the real path must be owned by root and not writable by group
    or others, unless sticky (``/tmp``: others cannot rename root's entries there).
    """
    real = Path(os.path.realpath(path))
    for folder in [*reversed(real.parents), real]:
        st = os.lstat(folder)
        if st.st_uid != 0 or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            return False, str(folder)
    return True, ""


def ensure_folder(path: str | os.PathLike, mode: int, gid: int = 0) -> Path:
    """Create ``path`` (and parents, 0755) owned by root:``gid`` with ``mode``.

    Refused (RuntimeError naming the folder) below a folder that anyone but root could change,
    where a symlink or a renamed folder could redirect root's chown; the folder itself is
    changed through a descriptor opened without following a symlink.
    """
    p = Path(path)
    for parent in [*reversed(p.parents)]:
        try:
            os.mkdir(parent, 0o755)
        except FileExistsError:
            continue
        os.chmod(parent, 0o755)  # the services run with umask 077; users must traverse these
    ok, culprit = root_controlled(p.parent)
    if not ok:
        raise RuntimeError(
            f"{culprit} is owned or writable by someone other than root, so root will not create or change "
            f"{p} below it; make it root-owned and not group/other-writable, or choose another path in the policy"
        )
    try:
        p.mkdir()
    except FileExistsError:
        pass
    fd = open_dir_nofollow(p)
    try:
        os.fchown(fd, 0, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return p
