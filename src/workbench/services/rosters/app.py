"""The roster service: course rosters loaded by a course's instructors (or hub admins), kept across logins.

``python -m workbench.services.rosters.app`` runs it as a hub-managed service (``rosters``, see
:func:`workbench.embedded.hub.services`). It serves, under ``/services/rosters/api/``:

- ``POST courses/<course>/students``: a roster, as CSV text (``username``, optional ``email`` and
  ``name`` columns, like ``workbench course add-students``) or JSON rows (a list of user names or
  ``{username, email, name}`` objects). The roster *replaces* the course's roster (``?mode=add`` adds
  to it): students of the old roster not in the new one leave the course group.
- ``GET courses/<course>/students``: the roster and the group's members.
- ``DELETE courses/<course>/students/<user>``: one student off the roster and out of the group.

Who may call it (:func:`check_caller`): hub admins, and the instructors of that course
(``groups.<course>.instructors`` in the policy), with a token holding
``access:services!service=rosters`` (instructors get it by their course role); anybody else gets
403 saying so. Instructors get no hub scope to change groups or create users: the service does it
with its own token, after its own checks, so an instructor can never put an arbitrary hub user into
their course (and then open that user's server with their course-wide ``access:servers``).

Every row is checked first (:func:`workbench.courses.material.parse_roster`), then the safety rules
(:func:`refusals`): no hub admin, no instructor of any course, no member of a non-course group and
no holder of a hub role is ever put on a roster. Any problem is answered 400 with each problem on
its line and nothing is changed. Missing users are created, never as admins.

The roster is kept in the hub group's ``properties`` (``{"workbench_roster": [names]}``), so it
lives in the hub's own database. Logins keep it: the authenticators (demo and OAuth) compute a
user's groups from the identity provider or the policy (``manage_groups``) and then add the course
groups whose roster lists the user (:func:`merge_roster_groups`, reading the hub's ORM); taken off
a roster, a student leaves the group at once (through the API) and is not put back at their next
login.

The service's own token (role ``workbench-rosters``, :func:`service_scopes`) has ``admin:users``,
the only JupyterHub scope that can create users (``POST /users`` and ``POST /users/<name>`` need
it; ``users`` only modifies existing ones and there is no narrower or filterable alternative for a
user who does not exist yet), and ``groups!group=<course>`` per course: add and remove members and
write the group's properties, of course groups only (``admin:groups`` is not needed: the embedded
hub creates every policy group at start, as its roles name them). As the service is not a hub
admin, the hub itself refuses it making or changing admins.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from tornado import web

from workbench.auth.groups import roster_of
from workbench.courses.material import is_course
from workbench.courses.roster import Student, parse_roster, parse_roster_rows
from workbench.names import ROSTER_PROPERTY, ROSTERS_SERVICE
from workbench.names import ROSTERS_ACCESS_SCOPE as ACCESS_SCOPE
from workbench.policy import Policy
from workbench.services.base import HubClient, JsonHandler
from workbench.services.rosters.rules import course_names, needs_service, service_scopes  # noqa: F401

log = logging.getLogger("workbench.services.rosters.app")

SERVICE_NAME = ROSTERS_SERVICE


class Refused(Exception):
    """The caller may not do this; the message says why."""


# ---------------------------------------------------------------------------
# Policy: which courses, who may load them, what the service's token may do (pure)
# ---------------------------------------------------------------------------


def check_caller(policy: Policy, caller: Mapping[str, Any], course: str) -> None:
    """Raise :class:`Refused` unless ``caller`` (the hub's model of a token) may load ``course``'s roster (pure).

    Allowed: hub admins, and the course's instructors (``groups.<course>.instructors``), with a
    token that may access the service. Everybody else is refused, services included.
    """
    name = caller.get("name", "?")
    scopes = set(caller.get("scopes") or [])
    if caller.get("kind", "user") != "user":
        raise Refused(f"the service {name!r} may not load rosters; use an admin's or an instructor's token")
    if not scopes & {ACCESS_SCOPE, "access:services"}:
        raise Refused(f"this token of {name} lacks the scope {ACCESS_SCOPE}; use a token with your full permissions")
    if caller.get("admin"):
        return
    if is_course(policy, course) and name in policy.groups[course].instructors:
        return
    raise Refused(
        f"{name} may not load the roster of {course}: only hub admins and the course's instructors "
        f"(groups.{course}.instructors in the policy) may"
    )


# ---------------------------------------------------------------------------
# Safety rules and the change to make (pure)
# ---------------------------------------------------------------------------


def refusals(
    policy: Policy, students: Iterable[Student], users: Mapping[str, Mapping | None], where: str = "line"
) -> list[str]:
    """Why rows may not be put on a roster, as ``<where> N: ...`` (pure; empty: all may).

    ``users`` maps each student's name to their hub model (``admin``, ``groups``, ``roles``), or
    None when the hub has no such user yet. Never rostered: hub admins (and the policy's admin demo
    accounts), instructors of any course, members of a group that is not a course (research,
    startup, admin or unknown groups: a roster must not reach into them), holders of a hub role;
    this counts the groups the policy itself gives a name (``auth.demo_users``), so a demo account
    of a research group is refused before it ever logged in. A roster longer than
    ``courses.max_students`` is refused as a whole. (Whoever the identity provider later puts in a
    non-course group loses the roster's courses at that login: :func:`workbench.auth.groups.with_roster_groups`.)
    """
    admin_groups = set(policy.auth.admin_groups)
    problems = []
    for s in students:
        model = users.get(s.username) or {}
        demo = policy.auth.demo_users.get(s.username) if policy.auth.type == "demo" else None
        groups = list(dict.fromkeys([*(model.get("groups") or []), *(demo.groups if demo else [])]))
        taught = [c for c in course_names(policy) if s.username in policy.groups[c].instructors]
        others = [g for g in groups if not is_course(policy, g)]
        roles = [r for r in model.get("roles") or [] if r != "user"]
        head = f"{where} {s.line}: {s.username!r}"
        if model.get("admin") or (demo and demo.admin) or admin_groups.intersection(groups):
            problems.append(f"{head} is a hub admin; admins are never put on a course roster")
        elif taught:
            problems.append(
                f"{head} teaches {', '.join(taught)}; instructors are never put on a roster "
                f"(they come from groups.<course>.instructors in the policy)"
            )
        elif others:
            problems.append(
                f"{head} is a member of {', '.join(others)}, which is not a course; a roster only takes "
                f"students (users in course groups only): ask a platform admin"
            )
        elif roles:
            problems.append(f"{head} holds the hub role(s) {', '.join(roles)}; a roster only takes plain users")
    return problems


def size_problem(policy: Policy, count: int, kept: int = 0) -> str | None:
    """Why a roster of ``count`` new names (plus ``kept`` names of the old roster) is too long (pure; None: it is not)."""
    limit = policy.courses.max_students
    total = count + kept
    if total <= limit:
        return None
    what = f"{count} students" + (f" plus {kept} already on the roster (mode add)" if kept else "")
    return (
        f"the roster would list {what}, more than courses.max_students ({limit}) of the policy; nothing was changed: "
        "split the course or ask the platform team to raise courses.max_students"
    )


@dataclass(frozen=True)
class RosterChange:
    """What loading a roster changes in the hub (see :func:`plan_roster`)."""

    course: str
    roster: tuple[str, ...]  # the roster afterwards
    create_group: bool = False
    create: tuple[str, ...] = ()  # users to create
    add: tuple[str, ...] = ()  # to add to the group
    remove: tuple[str, ...] = ()  # off the roster and out of the group
    already: tuple[str, ...] = ()  # students already members
    roster_changed: bool = False

    def report(self) -> list[str]:
        c = self.course
        lines = []
        if self.create_group:
            lines.append(f"created the hub group {c}")
        if self.create:
            lines.append(f"created {len(self.create)} hub user(s): {', '.join(self.create)}")
        if self.add:
            lines.append(
                f"added {len(self.add)} student(s) to {c}: {', '.join(self.add)}"
                + (f" ({len(self.already)} already members)" if self.already else "")
            )
        if self.remove:
            lines.append(
                f"removed {len(self.remove)} student(s) no longer on the roster from {c}: {', '.join(self.remove)}"
            )
        if not lines:
            n = len(self.already)
            lines.append(
                f"all {n} students are already in {c}; "
                + ("the roster now lists them" if self.roster_changed else "nothing to do")
            )
        return lines

    def to_json(self) -> dict:
        return {
            "course": self.course,
            "students": list(self.roster),
            "created_group": self.create_group,
            "created": list(self.create),
            "added": list(self.add),
            "removed": list(self.remove),
            "already": list(self.already),
            "report": self.report(),
        }


def plan_roster(
    course: str, names: list[str], users: Mapping[str, Mapping | None], group: Mapping | None, replace: bool = True
) -> RosterChange:
    """The change that makes ``names`` the roster of ``course`` (``replace``) or adds them to it (pure).

    ``group`` is the hub group's model (None: no such group yet); ``users`` maps names to hub
    models (None: not in the hub yet). Only students of the old roster can be removed, never
    members that the identity provider or the policy put in the group.
    """
    old = roster_of(group)
    members = set((group or {}).get("users") or [])
    new = list(dict.fromkeys(names if replace else [*old, *names]))
    dropped = [n for n in old if n not in new]
    return RosterChange(
        course=course,
        roster=tuple(new),
        create_group=group is None,
        create=tuple(n for n in names if users.get(n) is None),
        add=tuple(n for n in names if n not in members),
        remove=tuple(n for n in dropped if n in members),
        already=tuple(n for n in names if n in members),
        roster_changed=new != old,
    )


# ---------------------------------------------------------------------------
# Logins keep roster memberships (the authenticators' hook)
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------


class HubError(Exception):
    """The hub refused or failed a call of the service; the message says which and what was done."""


class RosterService:
    """State of the handlers: the policy, HubAuth (callers), the hub client (the service's own token)."""

    def __init__(self, policy: Policy, hub_auth, hub, prefix: str = f"/services/{SERVICE_NAME}/"):
        self.policy = policy
        self.hub_auth = hub_auth
        self.hub = hub  # workbench.services.base.HubClient
        self.prefix = "/" + prefix.strip("/") + "/"
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, course: str) -> asyncio.Lock:
        return self._locks.setdefault(course, asyncio.Lock())

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One hub API call with the service's token: ``(status, JSON body or None)``."""
        hub = self.hub
        r = await hub.http.fetch(
            f"{hub.api_url}{path}",
            method=method,
            raise_error=False,
            request_timeout=60,
            headers={"Authorization": f"token {hub.token}", "Content-Type": "application/json"},
            body=None if body is None else json.dumps(body),
            allow_nonstandard_methods=True,
        )
        if r.code == 599:
            raise HubError(f"the hub did not answer {method} {path}: {r.error}")
        try:
            doc = json.loads(r.body) if r.body else None
        except ValueError:
            doc = None
        return r.code, doc

    async def must(self, method: str, path: str, body: Any, what: str, done: list[str]) -> Any:
        code, doc = await self.call(method, path, body)
        if code >= 300:
            message = doc.get("message") if isinstance(doc, dict) else ""
            so_far = f" Already done: {'; '.join(done)}." if done else " Nothing was changed."
            raise HubError(f"the hub refused to {what} ({code}: {message or 'no message'}).{so_far}")
        return doc

    async def group(self, course: str) -> dict | None:
        code, doc = await self.call("GET", f"/groups/{quote(course, safe='')}")
        if code == 404:
            return None
        if code != 200:
            raise HubError(f"cannot read the hub group {course} ({code}); nothing was changed")
        return doc

    async def users(self, names: list[str]) -> dict[str, dict | None]:
        async def one(name):
            code, doc = await self.call("GET", f"/users/{quote(name, safe='')}")
            if code not in (200, 404):
                raise HubError(f"cannot read the hub user {name} ({code}); nothing was changed")
            return name, doc if code == 200 else None

        out: dict[str, dict | None] = {}
        for i in range(0, len(names), 20):
            out.update(await asyncio.gather(*(one(n) for n in names[i : i + 20])))
        return out

    async def load(self, course: str, students: list[Student], where: str, replace: bool) -> RosterChange:
        """Check and apply a roster (one at a time per course). Raises :class:`RosterProblems`, :class:`HubError`."""
        names = [s.username for s in students]
        if too_long := size_problem(self.policy, len(names)):
            raise RosterProblems([too_long])  # before asking the hub about each name
        async with self.lock(course):
            users = await self.users(names)
            problems = refusals(self.policy, students, users, where)
            if problems:
                raise RosterProblems(problems)
            change = plan_roster(course, names, users, await self.group(course), replace)
            kept = len(change.roster) - len(set(names))  # mode add: the old roster's other names stay
            if too_long := size_problem(self.policy, len(set(names)), kept):
                raise RosterProblems([too_long])
            g = f"/groups/{quote(course, safe='')}"
            done: list[str] = []
            if change.create_group:
                await self.must("POST", g, None, f"create the group {course}", done)
                done.append(f"created the hub group {course}")
                group = await self.group(course) or {}
            else:
                group = await self.group(course) or {}
            # the roster first: it is what logins honour, so a later failure is mended at the next login
            if change.roster_changed:
                props = {**(group.get("properties") or {}), ROSTER_PROPERTY: list(change.roster)}
                await self.must("PUT", f"{g}/properties", props, f"record the roster of {course}", done)
                done.append(f"recorded the roster of {course}")
            if change.create:
                await self.must(
                    "POST",
                    "/users",
                    {"usernames": list(change.create), "admin": False},
                    f"create the users {', '.join(change.create)}",
                    done,
                )
                done.append(f"created {', '.join(change.create)}")
            if change.add:
                await self.must("POST", f"{g}/users", {"users": list(change.add)}, f"add students to {course}", done)
                done.append(f"added {', '.join(change.add)}")
            if change.remove:
                await self.must(
                    "DELETE",
                    f"{g}/users",
                    {"users": list(change.remove)},
                    f"remove {', '.join(change.remove)} from {course}",
                    done,
                )
            log.info("roster of %s: %s", course, "; ".join(change.report()))
            return change

    async def remove(self, course: str, name: str) -> list[str]:
        async with self.lock(course):
            group = await self.group(course)
            roster = roster_of(group)
            if name not in roster:
                raise RosterMissing(
                    f"{name} is not on the roster of {course} (members from the identity provider or the policy "
                    f"are not the roster's to remove)"
                )
            g = f"/groups/{quote(course, safe='')}"
            props = {**(group.get("properties") or {}), ROSTER_PROPERTY: [n for n in roster if n != name]}
            await self.must("PUT", f"{g}/properties", props, f"record the roster of {course}", [])
            if name in (group.get("users") or []):
                await self.must(
                    "DELETE",
                    f"{g}/users",
                    {"users": [name]},
                    f"remove {name} from {course}",
                    [f"took {name} off the roster"],
                )
            log.info("roster of %s: removed %s", course, name)
            return [f"removed {name} from the roster of {course} and from its hub group"]

    def make_app(self) -> web.Application:
        p = self.prefix
        handlers = [
            (rf"{p}api/health", HealthHandler),
            (rf"{p}api/courses/([^/]+)/students", StudentsHandler),
            (rf"{p}api/courses/([^/]+)/students/([^/]+)", StudentHandler),
        ]
        return web.Application(handlers, service=self, default_handler_class=NotFoundHandler)


class RosterProblems(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


class RosterMissing(Exception):
    pass


# -- handlers (the quota service's base handler: token auth with HubAuth, JSON errors) --------------


def _error(status: int, message: str, problems: list[str] | None = None) -> web.HTTPError:
    e = web.HTTPError(status, "%s", message)  # JsonHandler.write_error formats log_message % args
    if problems:
        e.problems = problems
    return e


class BaseHandler(JsonHandler):
    @property
    def svc(self) -> RosterService:
        return self.settings["service"]

    async def caller(self, course: str) -> dict:
        """The token's owner if they may change ``course``'s roster (401, 403 and 404 otherwise)."""
        m = await self.token_model(self.svc.hub_auth)
        model = {
            "name": m["name"],
            "kind": m.get("kind", "user"),
            "admin": bool(m.get("admin")),
            "scopes": sorted(m.get("scopes") or []),
        }
        policy = self.svc.policy
        if not is_course(policy, course):
            try:
                check_caller(policy, model, course)  # a stranger learns nothing about the policy
            except Refused as e:
                raise _error(403, str(e)) from None
            raise _error(
                404, f"{course!r} is not a course of the policy; courses: {', '.join(course_names(policy)) or '(none)'}"
            )
        try:
            check_caller(policy, model, course)
        except Refused as e:
            raise _error(403, str(e)) from None
        return model


class NotFoundHandler(BaseHandler):
    def prepare(self):
        raise _error(404, f"no such endpoint; see {self.svc.prefix}api/courses/<course>/students")


class HealthHandler(BaseHandler):
    async def get(self):
        async def check() -> dict:
            return {"courses": course_names(self.svc.policy)}

        await self.write_health(self.svc.hub_auth, check)


class StudentsHandler(BaseHandler):
    async def get(self, course: str):
        await self.caller(course)
        try:
            group = await self.svc.group(course)
        except HubError as e:
            raise _error(502, str(e)) from None
        self.write_json({"course": course, "students": roster_of(group), "members": (group or {}).get("users", [])})

    async def post(self, course: str):
        who = await self.caller(course)
        mode = self.get_argument("mode", "replace")
        if mode not in ("replace", "add"):
            raise _error(400, f"mode must be 'replace' (the default) or 'add', got {mode!r}")
        if self.request.headers.get("Content-Type", "").split(";")[0].strip() == "application/json":
            students, problems = parse_roster_rows(self.body_json())
            where = "row"
        else:
            try:
                text = self.request.body.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise _error(400, f"the roster is not UTF-8 text: {e}") from None
            students, problems = parse_roster(text)
            where = "line"
        if problems:
            raise _error(400, f"{len(problems)} problem(s) in the roster; nothing was changed", problems)
        try:
            change = await self.svc.load(course, students, where, mode == "replace")
        except RosterProblems as e:
            raise _error(400, f"{len(e.problems)} problem(s) in the roster; nothing was changed", e.problems) from None
        except HubError as e:
            raise _error(502, str(e)) from None
        log.info("%s loaded the roster of %s (%d students, mode %s)", who["name"], course, len(students), mode)
        self.write_json(change.to_json())


class StudentHandler(BaseHandler):
    async def delete(self, course: str, name: str):
        who = await self.caller(course)
        try:
            report = await self.svc.remove(course, name.strip().lower())
        except RosterMissing as e:
            raise _error(404, str(e)) from None
        except HubError as e:
            raise _error(502, str(e)) from None
        log.info("%s took %s off the roster of %s", who["name"], name, course)
        self.write_json({"course": course, "removed": name, "report": report})


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from workbench.services.base import add_common_args

    return add_common_args(
        argparse.ArgumentParser(
            prog="python -m workbench.services.rosters.app",
            description="The Workbench roster service (a JupyterHub service): course rosters loaded by instructors.",
        )
    )


def main(argv: list[str] | None = None) -> int:
    from jupyterhub.services.auth import HubAuth

    from workbench.services.base import serve_until_signal, service_setup

    args = build_parser().parse_args(argv)
    setup = service_setup(SERVICE_NAME, args, default_port=8015)
    if isinstance(setup, int):
        return setup
    log.info("rosters of courses: %s", ", ".join(course_names(setup.policy)))

    def build():
        hub_auth = HubAuth(api_url=setup.api_url, api_token=setup.token, cache_max_age=60, access_scopes={ACCESS_SCOPE})
        return RosterService(
            setup.policy, hub_auth, HubClient(setup.api_url, setup.token), setup.prefix
        ).make_app(), None

    serve_until_signal(setup, build)
    return 0


if __name__ == "__main__":
    sys.exit(main())
