"""System users for the embedded mode: one Unix account per hub user when the hub runs as root.

Hub names can be anything an identity provider sends (``Jane.Doe@uni.example``); Unix names
cannot. :func:`system_username` maps one to the other deterministically, with a prefix so that
Workbench accounts never collide with the machine's own (``admin`` -> ``wb-admin``).

Namespaces (the contract the property tests in ``tests/unit/test_sysusers.py`` check):

- users: ``wb-<name>``; the part after ``wb-`` never starts with ``<letter>-``, a shape reserved
  for group namespaces (a hub user ``g-physics-lab`` gets ``wb-ug-physics-lab-<hash>``);
- platform groups: ``wb-g-<group>`` (:data:`GROUP_PREFIX`); instructors of a course:
  ``wb-i-<course>`` (:data:`INSTRUCTOR_GROUP_PREFIX`);

so no hub user can ever own an account (or a personal group) named like a group's. A name that
would be changed by the mapping (upper case, ``@``, ``.``, too long, reserved shape, or looking
like a hashed name) gets a ``-<10 hex digits>`` suffix from its SHA-256, which keeps distinct hub
names distinct; plain names never end like that. Every result is a valid ``useradd`` name
(``[a-z][a-z0-9_-]*``, at most 32 characters).

Hub names that cannot be used at all (:func:`hub_username_problem`: control characters, ``:``,
``/``, ``\\``, only dots, too long) are refused at login, in rosters and in the policy's demo
accounts, never at spawn.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import re
import stat
import subprocess
import unicodedata
from collections.abc import Iterable
from pathlib import Path

_MAX = 32  # useradd's limit
_HASH_LEN = 10
_HASHED = re.compile(rf"-[0-9a-f]{{{_HASH_LEN}}}$")
#: after the user prefix, ``<letter>-`` is reserved for group namespaces (wb-g-, wb-i-, ...)
_RESERVED = re.compile(r"^[a-z]-")
USER_PREFIX = "wb-"
#: Unix group of a policy group's members (owner group of its shared folder)
GROUP_PREFIX = "wb-g-"
#: Unix group of a course's instructors (owner group of its materials folder)
INSTRUCTOR_GROUP_PREFIX = "wb-i-"
#: the Unix groups Workbench manages: membership in them follows the policy at every spawn
MANAGED_GROUP_PREFIXES = (GROUP_PREFIX, INSTRUCTOR_GROUP_PREFIX)
#: JupyterHub keeps user names in a 255-character column
MAX_HUB_NAME = 255
_FORBIDDEN = {":": "a colon", "/": "a slash", "\\": "a backslash"}


def hub_username_problem(name: str) -> str | None:
    """Why ``name`` cannot be a Workbench user name (None: it can) (pure).

    Refused: empty names, names of dots only, names longer than 255 characters, control or format
    characters (a newline, a tab, ...), and ``:`` ``/`` ``\\`` (they break ``/etc/passwd`` lines,
    paths and account tools). Everything else maps to a Unix account (:func:`system_username`).
    """
    if not name or not name.strip():
        return "the user name is empty"
    if len(name) > MAX_HUB_NAME:
        return f"the user name is {len(name)} characters long; at most {MAX_HUB_NAME} are allowed"
    if set(name) <= {"."}:
        return f"the user name {name!r} is only dots"
    for ch in name:
        if unicodedata.category(ch)[0] == "C":
            return f"the user name {name!r} contains a control character ({unicodedata.name(ch, hex(ord(ch)))})"
        if ch in _FORBIDDEN:
            return f"the user name {name!r} contains {_FORBIDDEN[ch]} ({ch!r})"
    return None


def _mapped(name: str, prefix: str, reserve: bool) -> str:
    clean = re.sub(r"[^a-z0-9_-]", "-", name.lower()).strip("-") or "user"
    plain = f"{prefix}{clean}"
    reserved = reserve and (_RESERVED.match(clean) is not None)
    if clean == name and len(plain) <= _MAX and not _HASHED.search(clean) and not reserved:
        return plain
    # the mapping was lossy (or the name has a reserved shape): add a hash so that distinct names stay distinct
    if reserve and (reserved or len(clean) < 2):
        clean = f"u{clean}"  # never <letter>- after the prefix, even once cut short
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_LEN]
    return f"{f'{prefix}{clean}'[: _MAX - _HASH_LEN - 1]}-{digest}"


def system_username(hub_name: str, prefix: str = USER_PREFIX) -> str:
    """Deterministic, valid Unix user name for a hub user, never a group's name (pure)."""
    return _mapped(hub_name, prefix, reserve=True)


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


def unix_group_name(policy_group: str, prefix: str = GROUP_PREFIX) -> str:
    """Unix group that holds the members of a policy group (``prefix`` INSTRUCTOR_GROUP_PREFIX: its instructors) (pure)."""
    return _mapped(policy_group, prefix, reserve=False)


def is_managed_group(group: str) -> bool:
    """Whether ``group`` is one of the Unix groups Workbench manages (pure)."""
    return group.startswith(MANAGED_GROUP_PREFIXES)


def ensure_group_membership(user: str, group: str) -> None:
    """Create the Unix group ``group`` if needed and make ``user`` a member.

    Refuses a group that is also the name of an account (someone's personal group, made before
    the namespaces were disjoint): its owner could then read the group's folders.
    """
    try:
        owner = pwd.getpwnam(group)
    except KeyError:
        owner = None
    if owner is not None:
        raise RuntimeError(
            f"the Unix group {group} is also the account of {owner.pw_gecos or owner.pw_name}; remove that account "
            f"(userdel {group}) before members are added to the group"
        )
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


def stale_groups(current: Iterable[str], wanted: Iterable[str]) -> list[str]:
    """The Workbench-managed groups among ``current`` that are not ``wanted``, sorted (pure)."""
    keep = set(wanted)
    return sorted({g for g in current if is_managed_group(g) and g not in keep})


def sync_group_memberships(user: str, wanted: Iterable[str]) -> list[str]:
    """Make ``user`` a member of every ``wanted`` group and of no other Workbench-managed group.

    ``wanted`` must be managed groups (``wb-g-*``, ``wb-i-*``); groups outside Workbench's
    namespaces are left alone. Returns the groups ``user`` left (``gpasswd --delete``).
    """
    wanted = list(dict.fromkeys(wanted))
    for group in wanted:
        ensure_group_membership(user, group)
    current = [g.gr_name for g in grp.getgrall() if user in g.gr_mem]
    left = stale_groups(current, wanted)
    for group in left:
        res = subprocess.run(["gpasswd", "--delete", user, group], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"gpasswd --delete {user} {group} failed: {res.stderr.strip()}")
    return left
