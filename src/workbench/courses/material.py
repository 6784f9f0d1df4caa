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
import csv
import functools
import grp
import io
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

from workbench.policy import Material, Policy

#: left in ``~/<course>`` when the material could not be pulled (removed by the next good pull)
NOTE_NAME = "MATERIAL-NOT-UPDATED.txt"
#: seconds one course's pull may take before it is given up
PULL_TIMEOUT = 300
#: prefix of the Unix group of a course's instructors (embedded mode)
INSTRUCTOR_GROUP_PREFIX = "wb-i-"
DEFAULT_HUB_URL = "http://127.0.0.1:8000"
#: the hub service that loads rosters (:mod:`workbench.services.rosters.app`)
ROSTER_SERVICE = "rosters"


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
                log.warning("Course %s: could not prepare the materials folder for %s: %s", course, spawner.user.name, e)
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


async def pull_material(pulls: list[tuple[str, Material]], home: str, run_as: str | None, log) -> int:
    """Run :func:`pull_script` as ``run_as`` (None: this process's user); the number of failed courses."""
    from jupyterhub.spawner import set_user_setuid

    bin_dir = os.path.dirname(sys.executable)
    env = pull_env(home, f"{bin_dir}:/usr/local/bin:/usr/bin:/bin")
    env["GITPULLER"] = os.path.join(bin_dir, "gitpuller")
    script = pull_script(pulls, home, report_failures=True)
    try:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", script,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
            env=env, cwd=home, preexec_fn=set_user_setuid(run_as) if run_as else None,
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
        log.warning("Course material for %s: %d course(s) not updated (the server starts anyway):\n%s",
                    run_as or home, proc.returncode, text)
    else:
        log.info("Course material for %s:\n%s", run_as or home, text)
    return proc.returncode


# ---------------------------------------------------------------------------
# Links (pure)
# ---------------------------------------------------------------------------


def hub_base(url: str) -> str:
    """The hub's public base URL from what a user may paste (``.../``, ``.../hub``, ``.../hub/api``) (pure)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--hub-url must be the hub's address like https://workbench.example.edu, got {url!r}")
    path = parts.path.rstrip("/")
    for suffix in ("/hub/api", "/hub"):
        path = path.removesuffix(suffix)
    return f"{parts.scheme}://{parts.netloc}{path}"


class CourseError(ValueError):
    """A course command that cannot be done; the message says why and what to do."""


def course_material(policy: Policy, course: str) -> Material:
    """The course's git material, or :class:`CourseError` naming the problem (pure)."""
    group = policy.groups.get(course)
    courses = [n for n, g in policy.groups.items() if g.kind == "course"]
    if group is None or group.kind != "course":
        what = "is not a group of the policy" if group is None else f"is a {group.kind} group, not a course"
        raise CourseError(f"{course!r} {what}; courses: {', '.join(courses) or '(none)'}")
    if group.material is None:
        raise CourseError(
            f"course {course!r} has no material; add it to the policy, e.g. "
            f"groups.{course}.material: {{git: https://git.example.edu/{course}.git, branch: main}}"
        )
    return group.material


def course_link(policy: Policy, course: str, path: str, hub_url: str = DEFAULT_HUB_URL) -> str:
    """An nbgitpuller link that pulls the course's material into ``~/<course>`` and opens ``path`` in it (pure).

    ``/hub/user-redirect/`` sends each student to their own server (started if needed), whose
    nbgitpuller extension merges the material into the same folder as the pull at start
    (``targetpath``) and then opens ``lab/tree/<course>/<path>``.
    """
    material = course_material(policy, course)
    rel = path.strip().lstrip("/")
    if not rel or any(part in ("..", ".") for part in rel.split("/")):
        raise CourseError(f"PATH must be a file or folder of the material relative to its top, like week1/intro.ipynb, got {path!r}")
    query = urlencode(
        {
            "repo": material.git,
            "branch": material.branch,
            "targetpath": course,
            "urlpath": f"lab/tree/{quote(course)}/{quote(rel)}",
        }
    )
    return f"{hub_base(hub_url)}/hub/user-redirect/git-pull?{query}"


# ---------------------------------------------------------------------------
# Rosters
# ---------------------------------------------------------------------------

ROSTER_COLUMNS = ("username", "email", "name")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


@dataclass(frozen=True)
class Student:
    line: int
    username: str
    email: str = ""
    name: str = ""


@functools.cache
def _hub_authenticator():
    from jupyterhub.auth import Authenticator

    return Authenticator()


def username_problem(raw: str) -> str | None:
    """Why ``raw`` cannot be a hub user name (None: it can), after JupyterHub's own rules (pure).

    JupyterHub refuses empty names, ``/``, names of dots only and surrounding spaces
    (``Authenticator.validate_username``) and lowercases names; login names have no spaces
    either, so a space anywhere is refused (a display name belongs in the ``name`` column).
    """
    if not raw.strip():
        return "username is empty"
    if any(c.isspace() for c in raw):
        return f"username {raw!r} has a space; use the login name (e.g. {re.sub(r'[^a-z0-9]+', '.', raw.lower()).strip('.')!r}) and put the full name in the 'name' column"
    if any(not c.isprintable() for c in raw):
        return f"username {raw!r} has a control character"
    if not _hub_authenticator().validate_username(raw.lower()):
        return f"username {raw!r} is not a valid JupyterHub user name (no '/', not only dots)"
    return None


def _check_student(where: str, n: int, raw: str, email: str, name: str, seen: dict[str, int]) -> Student | str:
    """One roster row as a :class:`Student`, or its problem as ``<where> N: ...`` (pure; ``seen`` is updated)."""
    if why := username_problem(raw):
        return f"{where} {n}: {why}"
    username = raw.lower()
    if username in seen:
        return f"{where} {n}: username {username!r} is already on {where} {seen[username]}"
    seen[username] = n
    if email and not _EMAIL_RE.match(email):
        return f"{where} {n}: email {email!r} of {username!r} is not an email address"
    return Student(n, username, email, name)


def _collect(checked: list[Student | str]) -> tuple[list[Student], list[str]]:
    students = [c for c in checked if isinstance(c, Student)]
    problems = [c for c in checked if isinstance(c, str)]
    if not students and not problems:
        problems.append("no students: the file has a header but no rows")
    return students, problems


def parse_roster(text: str) -> tuple[list[Student], list[str]]:
    """Students of a roster CSV, and its problems as ``line N: ...`` (pure).

    The header must have a ``username`` column; ``email`` and ``name`` are optional, other
    columns are ignored. User names are lowercased as JupyterHub does. Every row is checked (empty
    or invalid user name, malformed email, too many fields, duplicates); blank lines are skipped.
    """
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    rows = [(reader.line_num, row) for row in reader]
    rows = [(n, row) for n, row in rows if any(cell.strip() for cell in row)]
    if not rows:
        return [], ["the file is empty; it needs a header line with a 'username' column, then one student a line"]
    header_line, header = rows[0]
    header = [h.strip().lower() for h in header]
    if "username" not in header:
        return [], [(f"line {header_line}: no 'username' column in the header ({', '.join(header)}); "
                    f"the first line must name the columns, e.g. username,email,name")]
    col = {name: header.index(name) for name in ROSTER_COLUMNS if name in header}
    checked: list[Student | str] = []
    seen: dict[str, int] = {}
    for n, row in rows[1:]:
        if len(row) > len(header):
            checked.append(f"line {n}: {len(row)} fields but the header has {len(header)} (a comma inside a name needs quotes)")
            continue
        cell = {name: (row[i] if i < len(row) else "").strip() for name, i in col.items()}
        raw = row[col["username"]] if col["username"] < len(row) else ""
        checked.append(_check_student("line", n, raw, cell.get("email", ""), cell.get("name", ""), seen))
    return _collect(checked)


def parse_roster_rows(rows) -> tuple[list[Student], list[str]]:
    """Students of a roster given as JSON rows, and its problems as ``row N: ...`` (pure).

    ``rows`` is a list (or ``{"students": [...]}``) of user names or of objects with ``username``
    and optional ``email`` and ``name``; rows are numbered from 1 and checked like CSV lines.
    """
    if isinstance(rows, dict) and set(rows) == {"students"}:
        rows = rows["students"]
    if not isinstance(rows, list):
        return [], [("the JSON body must be a list of students (user names or {username, email, name} objects), "
                     "or {\"students\": [...]}")]
    if not rows:
        return [], ["no students: the list is empty"]
    checked: list[Student | str] = []
    seen: dict[str, int] = {}
    for n, row in enumerate(rows, 1):
        if isinstance(row, str):
            row = {"username": row}
        if not isinstance(row, dict) or not all(isinstance(v, str) for v in row.values()):
            checked.append(f"row {n}: expected a user name or an object of strings with a 'username', got {row!r}"[:200])
            continue
        extra = sorted(set(row) - set(ROSTER_COLUMNS))
        if extra:
            checked.append(f"row {n}: unknown field(s) {', '.join(extra)}; a row has username, email and name")
            continue
        checked.append(_check_student("row", n, row.get("username", ""), row.get("email", "").strip(),
                                      row.get("name", "").strip(), seen))
    return _collect(checked)


def roster_url(hub_url: str, course: str, student: str | None = None) -> str:
    """The roster service's endpoint of ``course`` (:mod:`workbench.services.rosters.app`) at ``hub_url`` (pure)."""
    url = f"{hub_base(hub_url)}/services/{ROSTER_SERVICE}/api/courses/{quote(course, safe='')}/students"
    return url if student is None else f"{url}/{quote(student, safe='')}"


def roster_request(method: str, hub_url: str, token: str, course: str, student: str | None = None,
                   text: str | None = None, mode: str | None = None, timeout: float = 120):
    """One request to the roster service with ``token`` (``requests``): a CSV ``text`` to POST, or none."""
    import requests

    headers = {"Authorization": f"token {token}"}
    if text is not None:
        headers["Content-Type"] = "text/csv; charset=utf-8"
    return requests.request(method, roster_url(hub_url, course, student), headers=headers,
                            params={"mode": mode} if mode else None,
                            data=None if text is None else text.encode("utf-8"), timeout=timeout)


def roster_answer(resp, label: str, hub_url: str) -> tuple[int, list[str], list[str]]:
    """``(exit code, stdout lines, stderr lines)`` for the roster service's answer ``resp`` (pure).

    0 and the service's report when it applied the change; 2 and each problem with its line when a
    row was refused (a bad row, or a safety rule of the service) and nothing was changed; 3 otherwise.
    """
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        if resp.status_code == 404:
            return 3, [], [(f"the hub at {hub_url} has no roster service (/services/{ROSTER_SERVICE}/): is it a "
                            f"workbench hub with a course in its policy? Nothing was changed.")]
        return 3, [], [f"unexpected answer from the roster service ({resp.status_code}): {resp.text.strip()[:200]}"]
    if resp.status_code == 200:
        return 0, list(doc.get("report") or []), []
    if resp.status_code == 400 and doc.get("problems"):
        problems = list(doc["problems"])
        return 2, [], [f"{label}: {len(problems)} problem(s); nothing was changed:", *(f"  {p}" for p in problems)]
    # a 502 (the hub refused the service midway) says itself what was done
    done = "" if resp.status_code == 502 else " Nothing was changed."
    return 3, [], [f"{doc.get('message') or resp.reason} ({resp.status_code}).{done}"]



# ---------------------------------------------------------------------------
# The `workbench course` sub-commands
# ---------------------------------------------------------------------------


def add_course_arguments(parser) -> None:
    """``workbench course link``, ``add-students`` and ``remove-student`` (argparse)."""
    from workbench.embedded.up import DEFAULT_CONFIG

    sub = parser.add_subparsers(dest="course_command", metavar="ACTION", required=True)
    link = sub.add_parser(
        "link",
        help="print a link that gives a student the course material and opens a file of it",
        description="Print an nbgitpuller link: opened by a logged-in student, it starts their server if needed, "
        "merges the course's git material into ~/COURSE (keeping their edits) and opens PATH there. Exit code 2 "
        "when the course is unknown or has no material.",
    )
    link.add_argument("course", metavar="COURSE", help="the course group")
    link.add_argument("path", metavar="PATH", help="file or folder of the material to open, e.g. week1/intro.ipynb")
    link.add_argument("--hub-url", default=DEFAULT_HUB_URL, help="the hub's public address (default: %(default)s)")
    link.add_argument("--config", default=str(DEFAULT_CONFIG), help="platform YAML (default: %(default)s)")
    link.set_defaults(func=cmd_course_link)

    add = sub.add_parser(
        "add-students",
        help="load a roster CSV into a course (through the hub's roster service)",
        description="Load a roster (CSV with a header: a 'username' column, optional 'email' and 'name') into the "
        "course's hub group through the hub's roster service (workbench.services.rosters.app), with an admin's or one of the "
        "course's instructors' token. Every row is checked first, here and by the service; if any is wrong (or is "
        "a hub admin, an instructor, or a member of a non-course group), each problem is printed with its line and "
        "nothing is changed (exit code 2). Missing users are created (never as admins) and all are added to the "
        "group. The file is the course's whole roster: students an earlier roster added who are not in it leave "
        "the course (--add-only keeps them). Exit code 3 when the hub or the service refuses.",
    )
    add.add_argument("course", metavar="COURSE", help="the course group")
    add.add_argument("file", metavar="FILE.csv", help="roster CSV")
    add.add_argument("--add-only", action="store_true",
                     help="only add: keep the students of earlier rosters that are not in this file")
    _roster_service_arguments(add, DEFAULT_CONFIG)
    add.set_defaults(func=cmd_course_add_students)

    remove = sub.add_parser(
        "remove-student",
        help="take a student off a course's roster (through the hub's roster service)",
        description="Remove USER from the course's roster and hub group (workbench.services.rosters.app), with an admin's or "
        "one of the course's instructors' token. Exit code 3 when the hub or the service refuses (e.g. USER is "
        "not on the roster: members from the identity provider are not the roster's to remove).",
    )
    remove.add_argument("course", metavar="COURSE", help="the course group")
    remove.add_argument("user", metavar="USER", help="the student's hub user name")
    _roster_service_arguments(remove, DEFAULT_CONFIG)
    remove.set_defaults(func=cmd_course_remove_student)


def _roster_service_arguments(parser, default_config) -> None:
    parser.add_argument("--hub-url", default=DEFAULT_HUB_URL, help="the hub's address (default: %(default)s)")
    parser.add_argument("--token", default=None, help="hub API token (default: $JUPYTERHUB_API_TOKEN)")
    parser.add_argument("--config", default=str(default_config), help="platform YAML (default: %(default)s)")


def cmd_course_link(args) -> int:
    from workbench.cli.util import load_policy_or_report

    policy = load_policy_or_report(args.config)
    if policy is None:
        return 2
    try:
        print(course_link(policy, args.course, args.path, args.hub_url))
    except ValueError as e:
        print(f"workbench course link: {e}", file=sys.stderr)
        return 2
    return 0


def _course_and_token(args, command: str) -> str | None:
    """The token for a roster command after checking the course against the policy; None: refused (printed)."""
    from workbench.cli.util import load_policy_or_report

    policy = load_policy_or_report(args.config)
    if policy is None:
        return None
    if not is_course(policy, args.course):
        courses = [n for n, g in policy.groups.items() if g.kind == "course"]
        print(f"workbench course {command}: {args.course!r} is not a course of {args.config}; "
              f"courses: {', '.join(courses) or '(none)'}", file=sys.stderr)
        return None
    token = args.token or os.environ.get("JUPYTERHUB_API_TOKEN", "")
    if not token:
        print(f"workbench course {command}: no hub token; pass --token or set $JUPYTERHUB_API_TOKEN", file=sys.stderr)
        return None
    return token


def _ask_service(command: str, label: str, args, method: str, **kw) -> int:
    import requests

    try:
        resp = roster_request(method, args.hub_url, kw.pop("token"), args.course, **kw)
    except requests.RequestException as e:
        print(f"workbench course {command}: cannot reach the hub at {args.hub_url}: {e}. Nothing was changed.",
              file=sys.stderr)
        return 3
    rc, out, err = roster_answer(resp, label, args.hub_url)
    for line in out:
        print(line)
    for i, line in enumerate(err):
        print(line if rc == 2 or i else f"workbench course {command}: {line}", file=sys.stderr)
    return rc


def cmd_course_add_students(args) -> int:
    token = _course_and_token(args, "add-students")
    if token is None:
        return 2
    try:
        text = Path(args.file).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        print(f"workbench course add-students: cannot read {args.file}: {e}", file=sys.stderr)
        return 2
    _, problems = parse_roster(text)
    if problems:  # checked here first, so a bad file never reaches the hub
        print(f"{args.file}: {len(problems)} problem(s); nothing was changed:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    return _ask_service("add-students", args.file, args, "POST", token=token, text=text,
                        mode="add" if args.add_only else "replace")


def cmd_course_remove_student(args) -> int:
    token = _course_and_token(args, "remove-student")
    if token is None:
        return 2
    return _ask_service("remove-student", args.user, args, "DELETE", token=token, student=args.user.strip().lower())
