"""System users for the embedded mode: one Unix account per hub user when the hub runs as root.

Hub names can be anything an identity provider sends (``Jane.Doe@uni.example``); Unix names
cannot. ``system_username`` maps one to the other deterministically, with a prefix so that
Workbench accounts never collide with the machine's own (``admin`` -> ``wb-admin``).
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
    os.chown(home, entry.pw_uid, entry.pw_gid)
    os.chmod(home, 0o700)
    return entry


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


def chown_tree(root: str | os.PathLike, uid: int, gid: int) -> None:
    """chown ``root`` and everything below it (no symlinks followed)."""
    os.chown(root, uid, gid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            os.chown(os.path.join(dirpath, n), uid, gid, follow_symlinks=False)


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


def ensure_folder(path: str | os.PathLike, mode: int, gid: int = 0) -> Path:
    """Create ``path`` (and parents, 0755) owned by root:``gid`` with ``mode``."""
    p = Path(path)
    p.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    p.mkdir(exist_ok=True)
    os.chown(p, 0, gid)
    os.chmod(p, mode)
    return p
