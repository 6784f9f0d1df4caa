"""Course rosters through the real embedded hub and its roster service (workbench.services.rosters.app).

The policy is demo.yaml (``instructor`` teaches course-ml101) plus a second course taught by
someone else and a demo account in no group (``late``), whom only a roster puts in a course.
"""

from __future__ import annotations

import pytest
import requests
import yaml

from workbench.cli.main import main

from .harness import DEMO, Workbench, state_dir

pytestmark = pytest.mark.integration


def token_file(token: str) -> str:
    """A private (0600) file holding ``token``, for ``workbench course ... --token-file``."""
    import tempfile

    fd, path = tempfile.mkstemp(prefix="wb-token-")
    with open(fd, "w") as f:
        f.write(token)
    return path


COURSE = "course-ml101"
ROSTER_PROPERTY = "workbench_roster"
MAX_STUDENTS = 4


@pytest.fixture(scope="module")
def wb():
    state = state_dir()
    data = yaml.safe_load(DEMO.read_text())
    data["groups"]["course-stats202"] = {"kind": "course", "instructors": ["teacher2"], "profiles": ["cpu-small"]}
    data["auth"]["demo_users"]["teacher2"] = {"groups": ["course-stats202"]}
    data["auth"]["demo_users"]["late"] = {"groups": []}
    data["auth"]["demo_users"]["rs-lab"] = {"groups": ["physics-lab"]}  # never logs in during these tests
    data["courses"] = {"max_students": MAX_STUDENTS}
    config = state.parent / "rosters.yaml"
    config.write_text(yaml.safe_dump(data))
    w = Workbench(state, config=config).start()
    w.policy_file = config
    yield w
    assert w.stop() == 0
    assert not w.leftovers()


def token(w: Workbench, name: str) -> str:
    session = w.login(name)
    assert session.login_status == 302, f"{name} could not log in"
    return w.new_token(session, name)


def post_roster(w: Workbench, tok: str, course: str, text: str, **params) -> requests.Response:
    return requests.post(
        f"{w.url}/services/rosters/api/courses/{course}/students",
        data=text.encode(),
        params=params,
        headers={"Authorization": f"token {tok}", "Content-Type": "text/csv"},
        timeout=60,
    )


def groups_of(w: Workbench, admin: str, name: str) -> list[str]:
    r = w.token_api(admin, "GET", f"/users/{name}")
    assert r.status_code == 200, r.text
    return r.json()["groups"]


def test_instructor_loads_a_roster_that_logins_keep(wb, capsys):
    admin, instructor = token(wb, "admin"), token(wb, "instructor")
    token(wb, "researcher")  # in the hub, in physics-lab
    roster_of = lambda: wb.token_api(admin, "GET", f"/groups/{COURSE}").json()["properties"].get(ROSTER_PROPERTY)

    # a roster with new users and a demo account in no group: created (as non-admins) and added
    r = post_roster(wb, instructor, COURSE, "username,email,name\nrs-new1,new1@uni.example,New One\nLate,,\n")
    assert r.status_code == 200, r.text
    assert r.json()["report"] == [
        "created 2 hub user(s): rs-new1, late",
        f"added 2 student(s) to {COURSE}: rs-new1, late",
    ]
    new1 = wb.token_api(admin, "GET", "/users/rs-new1").json()
    assert new1["admin"] is False and new1["groups"] == [COURSE]
    assert roster_of() == ["rs-new1", "late"]
    got = requests.get(
        f"{wb.url}/services/rosters/api/courses/{COURSE}/students",
        headers={"Authorization": f"token {instructor}"},
        timeout=30,
    ).json()
    assert got["students"] == ["rs-new1", "late"] and {"instructor", "rs-new1", "late"} <= set(got["members"])

    # not another course, not for a student
    r = post_roster(wb, instructor, "course-stats202", "username\nrs-new2\n")
    assert r.status_code == 403
    assert r.json()["message"] == (
        "instructor may not load the roster of course-stats202: only hub admins and "
        "the course's instructors (groups.course-stats202.instructors in the policy) may"
    )
    assert post_roster(wb, token(wb, "student1"), COURSE, "username\nrs-new2\n").status_code == 403
    # an admin may load any course's, here one that nobody has logged in to yet
    r = post_roster(wb, admin, "course-stats202", "username\nrs-stat1\n")
    assert r.status_code == 200, r.text
    assert r.json()["report"][-2:] == [
        "created 1 hub user(s): rs-stat1",
        "added 1 student(s) to course-stats202: rs-stat1",
    ]

    # a researcher's row is refused with its line, and nothing is applied
    r = post_roster(wb, instructor, COURSE, "username\nrs-new2\nresearcher\nrs-new1\n")
    assert r.status_code == 400, r.text
    assert r.json()["problems"] == [
        (
            "line 3: 'researcher' is a member of physics-lab, which is not a course; a roster only takes students "
            "(users in course groups only): ask a platform admin"
        )
    ]
    assert wb.token_api(admin, "GET", "/users/rs-new2").status_code == 404
    assert "researcher" not in wb.token_api(admin, "GET", f"/groups/{COURSE}").json()["users"]
    assert roster_of() == ["rs-new1", "late"]

    # the instructor still cannot do it with the hub's API directly
    assert (
        wb.token_api(instructor, "POST", f"/groups/{COURSE}/users", json={"users": ["researcher"]}).status_code == 403
    )

    # a rostered demo account logs in again through the login form and keeps the course
    assert groups_of(wb, admin, "late") == [COURSE]
    assert wb.login("late").login_status == 302
    assert groups_of(wb, admin, "late") == [COURSE]

    # the CLI replaces the roster: late is off it, out of the group at once, and not back at the next login
    roster = wb.policy_file.parent / "roster.csv"
    roster.write_text("username,email,name\nrs-new1,,\nstudent1,,\n")
    rc = main(
        [
            "course",
            "add-students",
            COURSE,
            str(roster),
            "--hub-url",
            wb.url,
            "--token-file",
            token_file(instructor),
            "--config",
            str(wb.policy_file),
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    assert out.out.splitlines() == [f"removed 1 student(s) no longer on the roster from {COURSE}: late"]
    assert roster_of() == ["rs-new1", "student1"]
    assert groups_of(wb, admin, "late") == []
    assert wb.login("late").login_status == 302
    assert groups_of(wb, admin, "late") == []

    # a refused row through the CLI: each problem with its line, exit 2
    roster.write_text("username\nrs-new1\nadmin\n")
    rc = main(
        [
            "course",
            "add-students",
            COURSE,
            str(roster),
            "--hub-url",
            wb.url,
            "--token-file",
            token_file(instructor),
            "--config",
            str(wb.policy_file),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"{roster}: 1 problem(s); nothing was changed:" in err
    assert "line 3: 'admin' is a hub admin; admins are never put on a course roster" in err

    # one student off the roster (the DELETE endpoint, via the CLI), with an admin's token
    rc = main(
        [
            "course",
            "remove-student",
            COURSE,
            "rs-new1",
            "--hub-url",
            wb.url,
            "--token-file",
            token_file(admin),
            "--config",
            str(wb.policy_file),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert roster_of() == ["student1"] and groups_of(wb, admin, "rs-new1") == []
    assert (
        main(
            [
                "course",
                "remove-student",
                COURSE,
                "rs-new1",
                "--hub-url",
                wb.url,
                "--token-file",
                token_file(admin),
                "--config",
                str(wb.policy_file),
            ]
        )
        == 3
    )
    assert "rs-new1 is not on the roster of course-ml101" in capsys.readouterr().err

    # student1 is in the course by the policy too: a login keeps it either way
    assert wb.login("student1").login_status == 302
    assert COURSE in groups_of(wb, admin, "student1")


def test_an_instructors_notebook_token_may_load_rosters_a_students_may_not(wb):
    """The server token asks for the roster service's access scope; JupyterHub grants it only to its holders."""
    from .test_embedded import server_process

    students_url = f"{wb.url}/services/rosters/api/courses/{COURSE}/students"
    codes = {}
    for name in ("instructor", "student1"):
        tok = token(wb, name)
        wb.start_server(tok, name)
        try:
            server_token = server_process(wb, name).environ()["JUPYTERHUB_API_TOKEN"]
            codes[name] = requests.get(
                students_url, headers={"Authorization": f"token {server_token}"}, timeout=30
            ).status_code
        finally:
            wb.stop_server(tok, name)
    assert codes == {"instructor": 200, "student1": 403}, codes


def test_rosters_never_reach_other_groups_members_and_have_a_size_limit(wb):
    """Issue 10, item 2: a demo account the policy puts in a research group is refused even before it ever logged in,
    and a roster longer than courses.max_students is refused as a whole; in both cases nothing is created."""
    admin, instructor = token(wb, "admin"), token(wb, "instructor")
    before = wb.token_api(admin, "GET", f"/groups/{COURSE}").json()

    r = post_roster(wb, instructor, COURSE, "username\nrs-fresh1\nrs-lab\n", mode="add")
    assert r.status_code == 400, r.text
    assert r.json()["problems"] == [
        "line 3: 'rs-lab' is a member of physics-lab, which is not a course; a roster only takes students "
        "(users in course groups only): ask a platform admin"
    ]

    names = [f"rs-many{i}" for i in range(MAX_STUDENTS + 1)]
    r = post_roster(wb, instructor, COURSE, "username\n" + "\n".join(names) + "\n")
    assert r.status_code == 400, r.text
    assert r.json()["problems"] == [
        f"the roster would list {MAX_STUDENTS + 1} students, more than courses.max_students ({MAX_STUDENTS}) of the "
        "policy; nothing was changed: split the course or ask the platform team to raise courses.max_students"
    ]

    for name in ("rs-fresh1", "rs-lab", *names):
        assert wb.token_api(admin, "GET", f"/users/{name}").status_code == 404, name
    after = wb.token_api(admin, "GET", f"/groups/{COURSE}").json()
    assert (after["users"], after["properties"]) == (before["users"], before["properties"])
