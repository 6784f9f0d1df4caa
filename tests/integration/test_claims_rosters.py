"""README claims about rosters, through the real roster service and the real hub (no stand-in hub).

One real `workbench up` per module: demo.yaml plus a second course taught by ``teacher2``, a researcher
demo account that never logs in (``rs-lab2``) and ``op``, who holds a hub role. The hub runs Workbench's own
``jupyterhub_config.py`` from a copy of the config folder (``--hub-config-dir``) that adds one line: the role
``workbench-ops`` for ``op`` (the policy cannot grant hub roles; an operator's own config can, and the roster
service must still refuse its holder). Nothing is mocked.

Fixtures (module): ``wb`` (the workbench, with ``policy_file``), ``tokens`` (API tokens by user name).

Claims (docs/claims.md):
- an instructor cannot roster a hub admin, a member of another (non-course) group, another course's instructor or
  a holder of a hub role: 400, each refusal naming the user and the reason, and nothing changes in the hub;
- ``workbench course add-students --add-only`` adds without removing the students an earlier roster added.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import requests
import yaml

from workbench.cli.main import main

from .harness import DEMO, REPO, Workbench, state_dir

pytestmark = pytest.mark.integration

COURSE = "course-ml101"
OTHER = "course-stats202"
ROSTER_PROPERTY = "workbench_roster"

HUB_CONFIG = """\
# Workbench's own hub configuration (hub_config/jupyterhub_config.py), plus a hub role held by `op`
from workbench.embedded.hub import configure_hub

configure_hub(c)  # noqa: F821
c.JupyterHub.load_roles = [  # noqa: F821
    *c.JupyterHub.load_roles,  # noqa: F821
    {"name": "workbench-ops", "description": "operators (test)", "scopes": ["read:metrics"], "users": ["op"]},
]
"""


@pytest.fixture(scope="module")
def wb():
    state = state_dir()
    data = yaml.safe_load(DEMO.read_text())
    data["groups"][OTHER] = {"kind": "course", "instructors": ["teacher2"], "profiles": ["cpu-small"]}
    data["auth"]["demo_users"].update({"teacher2": {"groups": [OTHER]}, "rs-lab2": {"groups": ["physics-lab"]}})
    config = state.parent / "rosters.yaml"
    config.write_text(yaml.safe_dump(data))
    hub_config = state.parent / "hub_config"
    hub_config.mkdir()
    (hub_config / "jupyterhub_config.py").write_text(HUB_CONFIG)
    shutil.copy(REPO / "hub_config" / "dask_gateway_config.py", hub_config / "dask_gateway_config.py")
    w = Workbench(state, config=config, extra_args=("--hub-config-dir", str(hub_config))).start()
    w.policy_file = config
    yield w
    assert w.stop() == 0, w.output()[-3000:]
    assert not w.leftovers(), w.leftovers()


@pytest.fixture(scope="module")
def tokens(wb):
    out = {}
    for name in ("admin", "instructor", "researcher", "teacher2"):
        session = wb.login(name)
        assert session.login_status == 302, f"{name} could not log in"
        out[name] = wb.new_token(session, name)
    return out


def post_roster(w: Workbench, tok: str, course: str, text: str, **params) -> requests.Response:
    return requests.post(
        f"{w.url}/services/rosters/api/courses/{course}/students",
        data=text.encode(),
        params=params,
        headers={"Authorization": f"token {tok}", "Content-Type": "text/csv"},
        timeout=60,
    )


def hub_state(w: Workbench, admin: str, names: list[str]) -> dict:
    """What a roster could change in the hub: both courses' members and properties, and each user's groups."""
    state = {}
    for g in (COURSE, OTHER):
        model = w.token_api(admin, "GET", f"/groups/{g}").json()
        state[g] = (sorted(model["users"]), model["properties"])
    for name in names:
        r = w.token_api(admin, "GET", f"/users/{name}")
        state[name] = (r.status_code, sorted(r.json()["groups"]) if r.status_code == 200 else None)
    return state


def cli(w: Workbench, token: str, *args: str) -> int:
    fd, path = tempfile.mkstemp(prefix="wb-token-")  # 0600: the CLI refuses a token file others can read
    with os.fdopen(fd, "w") as f:
        f.write(token)
    try:
        return main([*args, "--hub-url", w.url, "--token-file", path, "--config", str(w.policy_file)])
    finally:
        os.unlink(path)


def test_the_hub_gives_op_a_role_and_no_group(wb, tokens):
    """The premise of the role-holder refusal: the real hub made ``op`` from its roles, with that role."""
    model = wb.token_api(tokens["admin"], "GET", "/users/op").json()
    assert "workbench-ops" in model["roles"] and model["groups"] == [] and model["admin"] is False, model


def test_an_instructor_cannot_roster_role_holders_or_another_courses_instructor(wb, tokens):
    names = ["rs-fresh", "admin", "researcher", "rs-lab2", "teacher2", "op"]
    before = hub_state(wb, tokens["admin"], names)
    assert before["rs-fresh"] == (404, None) and before["rs-lab2"] == (404, None)  # never logged in

    for mode in ("replace", "add"):
        r = post_roster(wb, tokens["instructor"], COURSE, "username\n" + "\n".join(names) + "\n", mode=mode)
        assert r.status_code == 400, r.text
        assert r.json()["problems"] == [
            "line 3: 'admin' is a hub admin; admins are never put on a course roster",
            (
                "line 4: 'researcher' is a member of physics-lab, which is not a course; a roster only takes "
                "students (users in course groups only): ask a platform admin"
            ),
            (
                "line 5: 'rs-lab2' is a member of physics-lab, which is not a course; a roster only takes "
                "students (users in course groups only): ask a platform admin"
            ),
            (
                "line 6: 'teacher2' teaches course-stats202; instructors are never put on a roster (they come "
                "from groups.<course>.instructors in the policy)"
            ),
            "line 7: 'op' holds the hub role(s) workbench-ops; a roster only takes plain users",
        ], mode
        assert hub_state(wb, tokens["admin"], names) == before, mode  # nothing created, added or recorded

    # the other course's instructor may not load this course's roster at all, nor this one theirs
    r = post_roster(wb, tokens["teacher2"], COURSE, "username\nrs-fresh\n")
    assert r.status_code == 403, r.text
    assert r.json()["message"] == (
        f"teacher2 may not load the roster of {COURSE}: only hub admins and "
        f"the course's instructors (groups.{COURSE}.instructors in the policy) may"
    )
    r = post_roster(wb, tokens["instructor"], OTHER, "username\nrs-fresh\n")
    assert r.status_code == 403 and "instructor may not load the roster of course-stats202" in r.json()["message"]
    # and the hub's own API refuses the instructor too (no groups scope of their own)
    r = wb.token_api(tokens["instructor"], "POST", f"/groups/{COURSE}/users", json={"users": ["teacher2"]})
    assert r.status_code == 403, r.text
    assert hub_state(wb, tokens["admin"], names) == before


def test_add_only_through_the_cli_keeps_the_students_an_earlier_roster_added(wb, tokens, capsys):
    admin = tokens["admin"]
    roster = wb.policy_file.parent / "roster.csv"

    def students() -> list[str]:
        return wb.token_api(admin, "GET", f"/groups/{COURSE}").json()["properties"].get(ROSTER_PROPERTY)

    def members() -> list[str]:
        return sorted(wb.token_api(admin, "GET", f"/groups/{COURSE}").json()["users"])

    roster.write_text("username,email,name\nao-one,,\nao-two,,\n")
    assert cli(wb, tokens["instructor"], "course", "add-students", COURSE, str(roster)) == 0, capsys.readouterr()
    capsys.readouterr()
    assert students() == ["ao-one", "ao-two"]

    roster.write_text("username\nao-three\n")
    rc = cli(wb, tokens["instructor"], "course", "add-students", COURSE, str(roster), "--add-only")
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    assert out.out.splitlines() == [
        "created 1 hub user(s): ao-three",
        f"added 1 student(s) to {COURSE}: ao-three",
    ]
    assert students() == ["ao-one", "ao-two", "ao-three"]  # the earlier ones stay on the roster
    assert {"ao-one", "ao-two", "ao-three"} <= set(members())  # and in the hub group
    for name in ("ao-one", "ao-two", "ao-three"):
        assert wb.token_api(admin, "GET", f"/users/{name}").json()["groups"] == [COURSE]

    # the same file without --add-only replaces the roster: what --add-only kept is removed (the flag matters)
    rc = cli(wb, tokens["instructor"], "course", "add-students", COURSE, str(roster))
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    assert out.out.splitlines() == [
        f"removed 2 student(s) no longer on the roster from {COURSE}: ao-one, ao-two",
    ]
    assert students() == ["ao-three"]
    assert "ao-one" not in members() and "ao-two" not in members() and "ao-three" in members()
