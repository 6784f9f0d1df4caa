"""Courses: git material in every member's home, the course's materials folder, links and rosters.

- **Material** (``groups.<course>.material: {git, branch}``): every member's server (students and
  instructors) pulls it when it starts, into ``~/<course>``, with nbgitpuller's ``gitpuller``,
  which merges upstream changes without clobbering the student's edits. The pull is one small
  POSIX shell script (:func:`pull_script`), run as the user's own Unix account before the server
  starts in the embedded mode (:func:`prepare_courses`) and by an init container of the notebook
  image on Kubernetes (``workbench.spawn.kube``). A failed pull never blocks the server: it is logged
  and leaves :data:`NOTE_NAME` in the course folder saying what went wrong.
- **Materials folder** (``storage.courses``, default ``/srv/workbench/courses/{course}``): read-only
  for students, writable by the course's instructors (a Unix group ``wb-i-<course>`` in the
  embedded mode, a read-only or read-write mount on Kubernetes).
- ``workbench course link``: an nbgitpuller link (:func:`course_link`) that pulls the material
  into the same folder and opens a file of it.
- ``workbench course add-students`` / ``remove-student``: a roster CSV (:func:`parse_roster`, every row
  checked before anything is applied) sent to the hub's roster service (:mod:`workbench.services.rosters.app`),
  which admins and the course's instructors may call and which applies it with its own token.
"""

from __future__ import annotations

import asyncio
import grp
import os
import shlex
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from workbench.policy import Material, Policy
from workbench.sysusers import INSTRUCTOR_GROUP_PREFIX  # noqa: F401  (re-exported: prefix of the instructors' Unix group)

#: left in ``~/<course>`` when the material could not be pulled (removed by the next good pull)
NOTE_NAME = "MATERIAL-NOT-UPDATED.txt"
#: seconds one course's pull may take before it is given up
PULL_TIMEOUT = 300


# ---------------------------------------------------------------------------
# Which courses, which folders (pure)
# ---------------------------------------------------------------------------


def is_course(policy: Policy, name: str) -> bool:
    group = policy.groups.get(name)
    return group is not None and group.kind == "course"


def courses_of(policy: Policy, user_groups: Iterable[str], username: str | None = None) -> list[str]:
    """The courses of a user, in policy order: course groups they are in, and those they teach (pure)."""
    mine = set(policy.groups_of(user_groups))
    return [
        name
        for name, group in policy.groups.items()
        if group.kind == "course" and (name in mine or (username is not None and username in group.instructors))
    ]


def teaches(policy: Policy, course: str, username: str) -> bool:
    return is_course(policy, course) and username in policy.groups[course].instructors


def unix_groups_of(policy: Policy, user_groups: Iterable[str], username: str) -> list[str]:
    """The Workbench-managed Unix groups a user belongs in: their policy groups' (``wb-g-*``) and the
    instructor groups (``wb-i-*``) of the courses they teach (pure). Any other managed group goes at their
    next spawn (:func:`workbench.sysusers.sync_group_memberships`)."""
    from workbench.sysusers import unix_group_name

    groups = [unix_group_name(g) for g in policy.groups_of(user_groups)]
    taught = [unix_group_name(c, INSTRUCTOR_GROUP_PREFIX) for c in policy.groups if teaches(policy, c, username)]
    return [*groups, *taught]


def materials_path(policy: Policy, course: str) -> str:
    """The course's materials folder (``storage.courses`` with ``{course}``), the same path everywhere (pure)."""
    template = policy.storage.courses
    if not template.startswith("/") or "{course}" not in template:
        raise ValueError(
            f"storage.courses must be an absolute path containing {{course}} "
            f"(e.g. /srv/workbench/courses/{{course}}), got {template!r}"
        )
    return template.format(course=course)


def material_pulls(policy: Policy, courses: Iterable[str]) -> list[tuple[str, Material]]:
    """``(course, material)`` of the given courses that have git material (pure)."""
    return [(c, policy.groups[c].material) for c in courses if is_course(policy, c) and policy.groups[c].material]


# ---------------------------------------------------------------------------
# The pull: one shell script for both modes (pure builder)
# ---------------------------------------------------------------------------

_PULL_FUNCTION = r"""
note=__NOTE__
failed=0
pull() {  # course, git URL, branch, folder
    dir=$4
    # a folder left by a failed first pull holds only the note: start afresh
    if [ -d "$dir" ] && [ ! -e "$dir/.git" ] && [ -z "$(ls -A "$dir" | grep -vxF "$note")" ]; then
        rm -f "$dir/$note"; rmdir "$dir"
    fi
    if [ -e "$dir" ] && [ ! -e "$dir/.git" ]; then
        out="$dir exists but is not a copy of the course material (it has no .git folder); rename it and restart your server to get the material"
    elif out=$(timeout __TIMEOUT__ "$GITPULLER" "$2" "$3" "$dir" 2>&1); then
        rm -f "$dir/$note"
        echo "course $1: material from $2 (branch $3) is up to date in $dir"
        return 0
    fi
    failed=$((failed + 1))
    # gitpuller hides git's own words when the repository cannot be read: ask git
    reason=""
    if ! remote=$(timeout 60 git ls-remote --heads -- "$2" 2>&1 >/dev/null); then
        reason="git cannot read $2: $(printf '%s\n' "$remote" | grep -v '^$' | tail -n 3)"
    fi
    mkdir -p "$dir" 2>/dev/null
    {
        echo "The course material of $1 could not be updated when your server started ($(date -u '+%Y-%m-%d %H:%M UTC'))."
        echo "Your own files here are untouched. Restart your server to try again; if this stays, tell your instructor."
        echo
        echo "Material: $2 (branch $3)"
        [ -z "$reason" ] || echo "$reason"
        echo "What went wrong (last lines):"
        printf '%s\n' "$out" | tail -n 20
    } > "$dir/$note" 2>/dev/null
    echo "course $1: could not update the material from $2 (branch $3) in $dir:"
    [ -z "$reason" ] || echo "$reason"
    printf '%s\n' "$out" | tail -n 20
}
"""


def pull_script(pulls: list[tuple[str, Material]], home: str, *, report_failures: bool) -> str:
    """A POSIX ``sh`` script pulling each course's material into ``<home>/<course>`` (pure).

    It calls ``$GITPULLER`` (nbgitpuller's ``gitpuller``; ``gitpuller`` on the PATH when unset),
    which clones the first time and later merges upstream changes keeping the user's edits. A
    course that fails gets :data:`NOTE_NAME` in its folder and a message on stdout; the others
    go on. The exit status is the number of failed courses when ``report_failures``, else 0 (an
    init container must never fail the pod).
    """
    lines = ["set -u", ': "${GITPULLER:=gitpuller}"']
    lines.append(_PULL_FUNCTION.replace("__NOTE__", shlex.quote(NOTE_NAME)).replace("__TIMEOUT__", str(PULL_TIMEOUT)))
    for course, material in pulls:
        folder = os.path.join(home, course)
        lines.append("pull " + " ".join(shlex.quote(a) for a in (course, material.git, material.branch, folder)))
    lines.append('exit "$failed"' if report_failures else "exit 0")
    return "\n".join(lines) + "\n"


def pull_env(home: str, path: str) -> dict[str, str]:
    """The environment of the pull: no prompts (a private repo fails instead of hanging) (pure)."""
    return {
        "HOME": home,
        "PATH": path,
        "LANG": "C.UTF-8",
        "GIT_TERMINAL_PROMPT": "0",
    }


# ---------------------------------------------------------------------------
# Embedded mode: the one call of WorkbenchLocalSpawner._start_process
# ---------------------------------------------------------------------------


async def prepare_courses(spawner) -> None:
    """Course folders and material for a server about to start (``WorkbenchLocalSpawner``).

    As root (``system_users``): the materials folder of each of the user's courses
    (:func:`ensure_materials_folder`), then the material pulled as the user's own account.
    Nothing here stops the server from starting: failures are logged (and noted in the folder).
    """
    try:
        await _prepare_courses(spawner)
    except Exception:  # a bug here must not keep anyone from working
        spawner.log.exception("Course folders and material for %s could not be prepared", spawner.user.name)


async def _prepare_courses(spawner) -> None:
    policy, log = spawner.policy, spawner.log
    courses = courses_of(policy, spawner.user_groups, spawner.user.name)
    if not courses:
        return
    run_as = spawner.system_user if spawner.system_users else None
    if run_as:
        for course in courses:
            try:
                ensure_materials_folder(policy, course, run_as, teaches(policy, course, spawner.user.name))
            except (OSError, RuntimeError, ValueError) as e:
                log.warning(
                    "Course %s: could not prepare the materials folder for %s: %s", course, spawner.user.name, e
                )
    pulls = material_pulls(policy, courses)
    if pulls:
        await pull_material(pulls, spawner.home, run_as, log)


def _instructor_gid(course: str) -> int:
    from workbench.sysusers import unix_group_name

    name = unix_group_name(course, INSTRUCTOR_GROUP_PREFIX)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        res = subprocess.run(["groupadd", name], capture_output=True, text=True, check=False)
        if res.returncode not in (0, 9):  # 9: created concurrently
            raise RuntimeError(f"groupadd {name} failed: {res.stderr.strip()}") from None
        return grp.getgrnam(name).gr_gid


def ensure_materials_folder(policy: Policy, course: str, system_user: str, instructor: bool) -> Path:
    """The course's materials folder: root-owned, group ``wb-i-<course>`` (its instructors), mode 2775.

    Instructors (and only they) are members of that Unix group, so they can write; students
    (everyone else) can read. Someone no longer an instructor in the policy leaves the group.
    """
    from workbench.sysusers import ensure_folder, ensure_group_membership, unix_group_name

    gid = _instructor_gid(course)
    group = unix_group_name(course, INSTRUCTOR_GROUP_PREFIX)
    if instructor:
        ensure_group_membership(system_user, group)
    elif system_user in grp.getgrgid(gid).gr_mem:
        subprocess.run(["gpasswd", "--delete", system_user, group], capture_output=True, check=True)
    return ensure_folder(materials_path(policy, course), 0o2775, gid)


def _as_user(setuid):
    """The pull's preexec: become the user (as root), with the usual umask 022 (the hub runs with 077)."""

    def preexec():  # pragma: nocover - runs in the child
        if setuid is not None:
            setuid()
        os.umask(0o022)

    return preexec


async def pull_material(pulls: list[tuple[str, Material]], home: str, run_as: str | None, log) -> int:
    """Run :func:`pull_script` as ``run_as`` (None: this process's user); the number of failed courses."""
    from jupyterhub.spawner import set_user_setuid

    bin_dir = os.path.dirname(sys.executable)
    env = pull_env(home, f"{bin_dir}:/usr/local/bin:/usr/bin:/bin")
    env["GITPULLER"] = os.path.join(bin_dir, "gitpuller")
    script = pull_script(pulls, home, report_failures=True)
    try:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            script,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            env=env,
            cwd=home,
            preexec_fn=_as_user(set_user_setuid(run_as) if run_as else None),
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), PULL_TIMEOUT * len(pulls) + 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.warning("Course material for %s: the pull took too long and was stopped", run_as or home)
            return len(pulls)
    except OSError as e:
        log.warning("Course material for %s could not be pulled: %s", run_as or home, e)
        return len(pulls)
    text = out.decode(errors="replace").strip()
    if proc.returncode:
        log.warning(
            "Course material for %s: %d course(s) not updated (the server starts anyway):\n%s",
            run_as or home,
            proc.returncode,
            text,
        )
    else:
        log.info("Course material for %s:\n%s", run_as or home, text)
    return proc.returncode


# ---------------------------------------------------------------------------
# Links (pure)
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Rosters
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# The `workbench course` sub-commands
# ---------------------------------------------------------------------------
