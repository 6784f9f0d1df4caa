"""Course roster files: a CSV of students (username, email, name), every row checked before anything is applied."""

from __future__ import annotations

import csv
import functools
import io
import re
from dataclasses import dataclass

from workbench.sysusers import hub_username_problem

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
    if why := hub_username_problem(raw):
        return f"{why}: no account can be made for it; use the student's login name"
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
        return [], [
            (
                f"line {header_line}: no 'username' column in the header ({', '.join(header)}); "
                f"the first line must name the columns, e.g. username,email,name"
            )
        ]
    col = {name: header.index(name) for name in ROSTER_COLUMNS if name in header}
    checked: list[Student | str] = []
    seen: dict[str, int] = {}
    for n, row in rows[1:]:
        if len(row) > len(header):
            checked.append(
                f"line {n}: {len(row)} fields but the header has {len(header)} (a comma inside a name needs quotes)"
            )
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
        return [], [
            (
                "the JSON body must be a list of students (user names or {username, email, name} objects), "
                'or {"students": [...]}'
            )
        ]
    if not rows:
        return [], ["no students: the list is empty"]
    checked: list[Student | str] = []
    seen: dict[str, int] = {}
    for n, row in enumerate(rows, 1):
        if isinstance(row, str):
            row = {"username": row}
        if not isinstance(row, dict) or not all(isinstance(v, str) for v in row.values()):
            checked.append(
                f"row {n}: expected a user name or an object of strings with a 'username', got {row!r}"[:200]
            )
            continue
        extra = sorted(set(row) - set(ROSTER_COLUMNS))
        if extra:
            checked.append(f"row {n}: unknown field(s) {', '.join(extra)}; a row has username, email and name")
            continue
        checked.append(
            _check_student(
                "row", n, row.get("username", ""), row.get("email", "").strip(), row.get("name", "").strip(), seen
            )
        )
    return _collect(checked)
