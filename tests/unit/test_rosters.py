"""The roster service's pure parts: who may load which course, rows it refuses, the change it makes,
the order it talks to the hub in, and logins that keep roster memberships (workbench.services.rosters.app)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from jupyterhub import orm

from workbench.auth.demo import DemoAuthenticator
from workbench.auth.groups import merge_roster_groups, rostered_courses, with_roster_groups
from workbench.courses.roster import Student, parse_roster
from workbench.policy import parse_policy
from workbench.services.rosters.app import (
    ACCESS_SCOPE,
    ROSTER_PROPERTY,
    Refused,
    RosterChange,
    RosterProblems,
    RosterService,
    check_caller,
    plan_roster,
    refusals,
    service_scopes,
)

DEMO = Path(__file__).resolve().parents[2] / "hub_config" / "demo.yaml"


def demo_with_two_courses():
    data = yaml.safe_load(DEMO.read_text())
    data["groups"]["course-stats202"] = {"kind": "course", "instructors": ["teacher2"], "profiles": ["cpu-small"]}
    data["auth"]["demo_users"]["teacher2"] = {"groups": ["course-stats202"]}
    data["auth"]["demo_users"]["late"] = {"groups": []}
    return parse_policy(data)


P = demo_with_two_courses()


def caller(name="instructor", admin=False, scopes=(ACCESS_SCOPE,), kind="user"):
    return {"name": name, "admin": admin, "scopes": list(scopes), "kind": kind}


# -- who may load which course ------------------------------------------------------------------


def test_instructors_load_their_own_course_only():
    check_caller(P, caller("instructor"), "course-ml101")
    check_caller(P, caller("teacher2"), "course-stats202")
    with pytest.raises(
        Refused,
        match=r"instructor may not load the roster of course-stats202: only hub admins "
        r"and the course's instructors \(groups.course-stats202.instructors",
    ):
        check_caller(P, caller("instructor"), "course-stats202")


def test_admins_load_any_course_and_nobody_else_does():
    check_caller(P, caller("admin", admin=True, scopes=["access:services"]), "course-stats202")
    for name in ("student1", "researcher"):
        with pytest.raises(Refused, match=f"{name} may not load the roster of course-ml101"):
            check_caller(P, caller(name), "course-ml101")
    with pytest.raises(Refused, match="the service 'quota' may not load rosters"):
        check_caller(P, caller("quota", kind="service", admin=True), "course-ml101")


def test_a_token_without_access_to_the_service_is_refused_even_for_an_admin():
    with pytest.raises(Refused, match=f"lacks the scope {ACCESS_SCOPE}"):
        check_caller(P, caller("admin", admin=True, scopes=["read:users"]), "course-ml101")


def test_the_service_token_may_create_users_and_change_course_groups_only():
    assert service_scopes(P) == ["admin:users", "groups!group=course-ml101", "groups!group=course-stats202"]


# -- safety rules ---------------------------------------------------------------------------------


def test_rows_that_a_roster_never_takes():
    students, problems = parse_roster("username\nnew1\nresearcher\ninstructor\nadmin\nboss\nop\nstudent1\nteacher2\n")
    assert not problems
    users = {
        "researcher": {"admin": False, "groups": ["physics-lab"], "roles": ["user"]},
        "instructor": {"admin": False, "groups": ["course-ml101"], "roles": ["user"]},
        "admin": None,  # a demo admin who has not logged in yet: the policy says so
        "boss": {"admin": True, "groups": [], "roles": ["admin"]},
        "op": {"admin": False, "groups": [], "roles": ["user", "workbench-ops"]},
        "student1": {"admin": False, "groups": ["course-ml101", "course-stats202"], "roles": ["user"]},
        "new1": None,
    }
    assert refusals(P, students, users) == [
        (
            "line 3: 'researcher' is a member of physics-lab, which is not a course; a roster only takes students "
            "(users in course groups only): ask a platform admin"
        ),
        (
            "line 4: 'instructor' teaches course-ml101; instructors are never put on a roster (they come from "
            "groups.<course>.instructors in the policy)"
        ),
        "line 5: 'admin' is a hub admin; admins are never put on a course roster",
        "line 6: 'boss' is a hub admin; admins are never put on a course roster",
        "line 7: 'op' holds the hub role(s) workbench-ops; a roster only takes plain users",
        (
            "line 9: 'teacher2' teaches course-stats202; instructors are never put on a roster (they come from "
            "groups.<course>.instructors in the policy)"
        ),
    ]
    assert refusals(P, [Student(2, "x")], {"x": {"groups": ["unknown-group"]}}, where="row") == [
        (
            "row 2: 'x' is a member of unknown-group, which is not a course; a roster only takes students "
            "(users in course groups only): ask a platform admin"
        )
    ]


# -- the change -----------------------------------------------------------------------------------


def group(users, roster=None):
    return {
        "name": "course-ml101",
        "users": list(users),
        "properties": {"colour": "blue", **({ROSTER_PROPERTY: roster} if roster is not None else {})},
    }


def test_a_first_roster_creates_users_and_adds_the_new_members():
    change = plan_roster(
        "course-ml101",
        ["alice", "bob", "student1"],
        {"alice": None, "bob": {}, "student1": {}},
        group(["instructor", "student1"]),
    )
    assert change == RosterChange(
        "course-ml101",
        ("alice", "bob", "student1"),
        create=("alice",),
        add=("alice", "bob"),
        already=("student1",),
        roster_changed=True,
    )
    assert change.report() == [
        "created 1 hub user(s): alice",
        "added 2 student(s) to course-ml101: alice, bob (1 already members)",
    ]


def test_a_new_roster_replaces_the_old_one_but_never_touches_other_members():
    g = group(["instructor", "student1", "alice", "bob"], roster=["alice", "bob"])
    change = plan_roster("course-ml101", ["bob", "carol"], {"bob": {}, "carol": {}}, g)
    assert change.roster == ("bob", "carol") and change.add == ("carol",) and change.remove == ("alice",)
    assert change.report() == [
        "added 1 student(s) to course-ml101: carol (1 already members)",
        "removed 1 student(s) no longer on the roster from course-ml101: alice",
    ]
    added = plan_roster("course-ml101", ["carol"], {"carol": {}}, g, replace=False)
    assert added.roster == ("alice", "bob", "carol") and added.remove == ()


def test_nothing_to_do_and_a_missing_group():
    same = plan_roster("course-ml101", ["alice"], {"alice": {}}, group(["alice"], roster=["alice"]))
    assert same.report() == ["all 1 students are already in course-ml101; nothing to do"]
    recorded = plan_roster("course-ml101", ["alice"], {"alice": {}}, group(["alice"]))
    assert recorded.report() == ["all 1 students are already in course-ml101; the roster now lists them"]
    fresh = plan_roster("course-ml101", ["alice"], {"alice": None}, None)
    assert fresh.create_group and fresh.report()[0] == "created the hub group course-ml101"


class FakeHub:
    """The hub's REST API as RosterService.call sees it."""

    def __init__(self, users, group_model):
        self.users, self.group, self.calls = users, group_model, []

    async def __call__(self, method, path, body=None):
        self.calls.append((method, path, body))
        if method == "GET" and path.startswith("/users/"):
            model = self.users.get(path[len("/users/") :])
            return (200, model) if model is not None else (404, None)
        if method == "GET" and path == "/groups/course-ml101":
            return (200, self.group) if self.group else (404, None)
        return 200, {}


def service(hub) -> RosterService:
    svc = RosterService(P, None, None)
    svc.call = hub
    return svc


def test_the_service_records_the_roster_first_and_keeps_other_properties():
    hub = FakeHub({"student1": {"groups": ["course-ml101"]}}, group(["student1"], roster=["gone"]))
    students, _ = parse_roster("username\nalice\nstudent1\n")
    change = asyncio.run(service(hub).load("course-ml101", students, "line", replace=True))
    assert change.create == ("alice",)
    writes = [c for c in hub.calls if c[0] != "GET"]
    assert writes == [
        ("PUT", "/groups/course-ml101/properties", {"colour": "blue", ROSTER_PROPERTY: ["alice", "student1"]}),
        ("POST", "/users", {"usernames": ["alice"], "admin": False}),
        ("POST", "/groups/course-ml101/users", {"users": ["alice"]}),
    ]  # "gone" was on the roster but is not a member: nothing to remove from the group


def test_a_refused_row_changes_nothing():
    hub = FakeHub({"researcher": {"groups": ["physics-lab"]}}, group([]))
    students, _ = parse_roster("username\nalice\nresearcher\n")
    with pytest.raises(RosterProblems) as info:
        asyncio.run(service(hub).load("course-ml101", students, "line", replace=True))
    assert info.value.problems[0].startswith("line 3: 'researcher' is a member of physics-lab")
    assert [c for c in hub.calls if c[0] != "GET"] == []


# -- logins keep roster memberships ---------------------------------------------------------------


def test_roster_groups_are_added_to_the_providers_groups():
    groups = [
        ("course-ml101", {ROSTER_PROPERTY: ["late", "alice"]}),
        ("course-stats202", {}),
        ("physics-lab", None),
        ("odd", {ROSTER_PROPERTY: "late"}),
    ]
    assert rostered_courses(groups, "late") == ["course-ml101"]
    assert with_roster_groups(["startup-acme", "course-ml101"], ["course-ml101", "x"]) == [
        "startup-acme",
        "course-ml101",
        "x",
    ]
    assert with_roster_groups([], ["course-ml101", "x"], allowed={"course-ml101"}) == ["course-ml101"]


@pytest.fixture
def db():
    session = orm.new_session_factory("sqlite://")()
    session.add(orm.Group(name="course-ml101", properties={ROSTER_PROPERTY: ["late"]}))
    session.add(orm.Group(name="course-stats202", properties={}))
    session.commit()
    yield session
    session.close()


def test_merge_reads_the_hubs_database(db):
    assert merge_roster_groups(db, "late", []) == ["course-ml101"]
    assert merge_roster_groups(db, "student1", ["course-ml101"]) == ["course-ml101"]
    assert merge_roster_groups(None, "late", ["a"]) == ["a"]
    broken = SimpleNamespace(query=lambda *a: 1 / 0)
    assert merge_roster_groups(broken, "late", ["a"]) == ["a"]  # logged; the login goes on


def test_a_rostered_demo_account_keeps_its_course_at_login(db):
    auth = DemoAuthenticator(accounts={"late": {"groups": []}, "student1": {"groups": ["course-ml101"]}}, password="pw")
    login = lambda name, handler: asyncio.run(auth.authenticate(handler, {"username": name, "password": "pw"}))
    assert login("late", SimpleNamespace(db=db))["groups"] == ["course-ml101"]
    assert login("student1", SimpleNamespace(db=db))["groups"] == ["course-ml101"]
    db.query(orm.Group).filter_by(name="course-ml101").one().properties = {ROSTER_PROPERTY: []}
    db.commit()
    assert login("late", SimpleNamespace(db=db))["groups"] == []  # off the roster: gone at the next login


def test_a_rostered_oauth_user_logs_in_without_a_course_group_from_the_provider(db, monkeypatch):
    from oauthenticator.oauth2 import OAuthenticator

    from workbench.auth.oauth import WorkbenchGenericOAuthenticator

    monkeypatch.setenv("WB_TEST_SECRET", "s")
    auth = WorkbenchGenericOAuthenticator(
        client_secret_env="WB_TEST_SECRET", manage_groups=True, allowed_groups={"course-ml101", "physics-lab"}
    )

    async def provider_says(self, handler, data=None, **kw):
        return {"name": "late", "admin": False, "auth_state": {}, "groups": []}

    monkeypatch.setattr(OAuthenticator, "authenticate", provider_says)

    async def run():
        model = await auth.authenticate(SimpleNamespace(db=db), {})
        assert await auth.check_allowed(model["name"], model) is True
        return model

    assert asyncio.run(run())["groups"] == ["course-ml101"]


def test_a_user_in_a_non_course_group_gets_no_course_from_a_roster(db, monkeypatch):
    """Whom the provider puts in a research group later cannot be reached through an earlier roster."""
    from oauthenticator.oauth2 import OAuthenticator

    from workbench.auth.oauth import WorkbenchGenericOAuthenticator

    courses = ["course-ml101", "course-stats202"]
    assert with_roster_groups(["physics-lab"], ["course-ml101"], courses=courses) == ["physics-lab"]
    assert with_roster_groups(["course-stats202"], ["course-ml101"], courses=courses) == [
        "course-stats202",
        "course-ml101",
    ]
    monkeypatch.setenv("WB_TEST_SECRET", "s")
    auth = WorkbenchGenericOAuthenticator(
        client_secret_env="WB_TEST_SECRET",
        manage_groups=True,
        allowed_groups={"course-ml101", "physics-lab"},
        course_groups=courses,
    )

    async def provider_says(self, handler, data=None, **kw):
        return {"name": "late", "admin": False, "auth_state": {}, "groups": ["physics-lab"]}

    monkeypatch.setattr(OAuthenticator, "authenticate", provider_says)
    assert asyncio.run(auth.authenticate(SimpleNamespace(db=db), {}))["groups"] == ["physics-lab"]
    demo = DemoAuthenticator(accounts={"late": {"groups": ["physics-lab"]}}, password="pw", course_groups=courses)
    model = asyncio.run(demo.authenticate(SimpleNamespace(db=db), {"username": "late", "password": "pw"}))
    assert model["groups"] == ["physics-lab"]


def test_a_roster_longer_than_max_students_is_refused_before_asking_the_hub():
    data = yaml.safe_load(DEMO.read_text())
    data["courses"] = {"max_students": 2}
    policy = parse_policy(data)
    hub = FakeHub({}, group([], roster=["old1"]))
    svc = service(hub)
    svc.policy = policy
    students, _ = parse_roster("username\na1\na2\na3\n")
    with pytest.raises(RosterProblems) as info:
        asyncio.run(svc.load("course-ml101", students, "line", replace=True))
    assert info.value.problems == [
        "the roster would list 3 students, more than courses.max_students (2) of the policy; nothing was changed: "
        "split the course or ask the platform team to raise courses.max_students"
    ]
    assert hub.calls == []
    # mode add counts the students already on the roster
    students, _ = parse_roster("username\na1\na2\n")
    with pytest.raises(RosterProblems) as info:
        asyncio.run(svc.load("course-ml101", students, "line", replace=False))
    assert "would list 2 students plus 1 already on the roster (mode add)" in info.value.problems[0]
    assert [c for c in hub.calls if c[0] != "GET"] == []


@pytest.mark.parametrize("value", [0, -5])
def test_max_students_must_be_positive(value):
    from workbench.policy import PolicyError

    data = yaml.safe_load(DEMO.read_text())
    data["courses"] = {"max_students": value}
    with pytest.raises(PolicyError) as info:
        parse_policy(data)
    assert (
        "courses.max_students",
        f"must be at least 1 (the most students one roster may list, e.g. 500), got {value}",
    ) in info.value.problems
