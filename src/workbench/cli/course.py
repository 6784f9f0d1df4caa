"""`workbench course …`: course links, and rosters sent to the hub's rosters service."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import quote

from workbench.courses.links import DEFAULT_HUB_URL, course_link, hub_base
from workbench.courses.material import is_course
from workbench.courses.roster import parse_roster
from workbench.names import ROSTERS_SERVICE as ROSTER_SERVICE


def roster_url(hub_url: str, course: str, student: str | None = None) -> str:
    """The roster service's endpoint of ``course`` (:mod:`workbench.services.rosters.app`) at ``hub_url`` (pure)."""
    url = f"{hub_base(hub_url)}/services/{ROSTER_SERVICE}/api/courses/{quote(course, safe='')}/students"
    return url if student is None else f"{url}/{quote(student, safe='')}"


def roster_request(
    method: str,
    hub_url: str,
    token: str,
    course: str,
    student: str | None = None,
    text: str | None = None,
    mode: str | None = None,
    timeout: float = 120,
):
    """One request to the roster service with ``token`` (``requests``): a CSV ``text`` to POST, or none."""
    import requests

    headers = {"Authorization": f"token {token}"}
    if text is not None:
        headers["Content-Type"] = "text/csv; charset=utf-8"
    return requests.request(
        method,
        roster_url(hub_url, course, student),
        headers=headers,
        params={"mode": mode} if mode else None,
        data=None if text is None else text.encode("utf-8"),
        timeout=timeout,
    )


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
            return (
                3,
                [],
                [
                    (
                        f"the hub at {hub_url} has no roster service (/services/{ROSTER_SERVICE}/): is it a "
                        f"workbench hub with a course in its policy? Nothing was changed."
                    )
                ],
            )
        return 3, [], [f"unexpected answer from the roster service ({resp.status_code}): {resp.text.strip()[:200]}"]
    if resp.status_code == 200:
        return 0, list(doc.get("report") or []), []
    if resp.status_code == 400 and doc.get("problems"):
        problems = list(doc["problems"])
        return 2, [], [f"{label}: {len(problems)} problem(s); nothing was changed:", *(f"  {p}" for p in problems)]
    # a 502 (the hub refused the service midway) says itself what was done
    done = "" if resp.status_code == 502 else " Nothing was changed."
    return 3, [], [f"{doc.get('message') or resp.reason} ({resp.status_code}).{done}"]


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
    add.add_argument(
        "--add-only",
        action="store_true",
        help="only add: keep the students of earlier rosters that are not in this file",
    )
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
    parser.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help="file holding the hub API token, readable by you only (mode 0600) (default: $JUPYTERHUB_API_TOKEN)",
    )
    # removed: a token on the command line is visible to every user of the machine (ps, /proc/<pid>/cmdline)
    parser.add_argument("--token", default=None, help=argparse.SUPPRESS)
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
        print(
            f"workbench course {command}: {args.course!r} is not a course of {args.config}; "
            f"courses: {', '.join(courses) or '(none)'}",
            file=sys.stderr,
        )
        return None
    if args.token is not None:
        print(
            f"workbench course {command}: --token is no longer accepted (a token on the command line is visible to "
            "every user of the machine); set $JUPYTERHUB_API_TOKEN or pass --token-file PATH (a file only you can read)",
            file=sys.stderr,
        )
        return None
    if args.token_file:
        token, problem = read_token_file(args.token_file)
        if problem:
            print(f"workbench course {command}: --token-file: {problem}", file=sys.stderr)
            return None
        return token
    token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
    if not token:
        print(
            f"workbench course {command}: no hub token; set $JUPYTERHUB_API_TOKEN or pass --token-file PATH",
            file=sys.stderr,
        )
        return None
    return token


def read_token_file(path: str) -> tuple[str, str | None]:
    """``(token, None)`` from a file only its owner can read, else ``("", why)``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        return "", f"cannot read {path}: {e.strerror}"
    with os.fdopen(fd) as f:
        mode = os.fstat(f.fileno()).st_mode & 0o777
        if mode & 0o077:
            return "", (
                f"{path} can be read by other users (mode {mode:04o}); a token must be private: chmod 600 {path}"
            )
        token = f.read().strip()
    if not token:
        return "", f"{path} is empty; write the hub API token into it"
    return token, None


def _ask_service(command: str, label: str, args, method: str, **kw) -> int:
    import requests

    try:
        resp = roster_request(method, args.hub_url, kw.pop("token"), args.course, **kw)
    except requests.RequestException as e:
        print(
            f"workbench course {command}: cannot reach the hub at {args.hub_url}: {e}. Nothing was changed.",
            file=sys.stderr,
        )
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
    return _ask_service(
        "add-students", args.file, args, "POST", token=token, text=text, mode="add" if args.add_only else "replace"
    )


def cmd_course_remove_student(args) -> int:
    token = _course_and_token(args, "remove-student")
    if token is None:
        return 2
    return _ask_service("remove-student", args.user, args, "DELETE", token=token, student=args.user.strip().lower())
