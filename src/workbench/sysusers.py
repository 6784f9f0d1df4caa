"""System users for the embedded mode: one Unix account per hub user when the hub runs as root.

Hub names can be anything an identity provider sends (``Jane.Doe@uni.example``); Unix names
cannot. :func:`system_username` maps one to the other deterministically, with a prefix so that
Workbench accounts never collide with the machine's own (``admin`` -> ``wb-admin``).

Namespaces (the contract the property tests in ``tests/unit/test_sysusers.py`` check):

The prefix ``wb-`` is the default account namespace; :data:`ACCOUNT_PREFIX_ENV` names another (``wbstage-``:
``wbstage-<name>``, ``wbstage-g-<group>``, ``wbstage-i-<course>``).

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
import unicodedata
from collections.abc import Iterable
from pathlib import Path

_MAX = 32  # useradd's limit
_HASH_LEN = 10
_HASHED = re.compile(rf"-[0-9a-f]{{{_HASH_LEN}}}$")
#: after the user prefix, ``<letter>-`` is reserved for group namespaces (wb-g-, wb-i-, ...)
_RESERVED = re.compile(r"^[a-z]-")
#: the environment variable that names the account namespace (default ``wb-``): two workbenches on one machine
#: (a centre's staging beside its production; the test suite's parallel workers) each take their own, so that
#: neither ever uses, changes or removes the other's accounts, groups or cgroups. `workbench up` refuses a bad one.
ACCOUNT_PREFIX_ENV = "WORKBENCH_ACCOUNT_PREFIX"
DEFAULT_ACCOUNT_PREFIX = "wb-"
_PREFIX_SHAPE = re.compile(r"^[a-z][a-z0-9]{0,7}-$")


def account_prefix_problem(value: str) -> str | None:
    """Why ``value`` cannot be the account namespace (None: it can) (pure)."""
    if _PREFIX_SHAPE.match(value):
        return None
    return (
        f"{ACCOUNT_PREFIX_ENV}={value!r} cannot prefix Unix account names: use a lowercase letter, at most 7 more "
        f"lowercase letters or digits, then one '-' (e.g. {ACCOUNT_PREFIX_ENV}=wbstage-), or unset it for the "
        f"default {DEFAULT_ACCOUNT_PREFIX!r}"
    )


def _prefix_from_environment() -> tuple[str, str | None]:
    value = os.environ.get(ACCOUNT_PREFIX_ENV, DEFAULT_ACCOUNT_PREFIX)
    problem = account_prefix_problem(value)
    return (DEFAULT_ACCOUNT_PREFIX, problem) if problem else (value, None)


#: user accounts ``<prefix><name>`` (``wb-<name>``); :data:`ACCOUNT_PREFIX_PROBLEM` says why the environment's
#: value was not taken (`workbench up` then refuses to start, naming it)
USER_PREFIX, ACCOUNT_PREFIX_PROBLEM = _prefix_from_environment()
#: Unix group of a policy group's members (owner group of its shared folder)
GROUP_PREFIX = f"{USER_PREFIX}g-"
#: Unix group of a course's instructors (owner group of its materials folder)
INSTRUCTOR_GROUP_PREFIX = f"{USER_PREFIX}i-"
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
