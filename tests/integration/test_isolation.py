"""Isolation between users (issue 10), through the real embedded workbench, acting as the attacker would.

The policy is demo.yaml plus a demo student named ``g-physics-lab`` (in course-ml101): a hub name shaped like the
Unix group of the physics-lab group. Nothing is mocked: real hub, proxy, JupyterLab servers run as their own Unix
accounts (the test runs as root), the real quota, sessions and roster services.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
import yaml

from workbench.policy import load_policy
from workbench.sysusers import USER_PREFIX, system_username

from .harness import DEMO, Workbench
from .test_embedded import server_process, state_dir

pytestmark = pytest.mark.integration

LOOKALIKE = "g-physics-lab"  # a hub user named like the Unix group of physics-lab


def shared_folder(w: Workbench) -> Path:
    """physics-lab's shared folder (storage.shared of the workbench's policy: demo.yaml's default, or its copy in
    another account namespace, tests/integration/harness.py)."""
    return Path(load_policy(w.config).storage.shared.format(group="physics-lab"))


def term_start() -> datetime:
    """A term start 40 to 45 days ago: neither this month's first day nor one of the default term starts."""
    day = (datetime.now(UTC) - timedelta(days=40)).replace(hour=0, minute=0, second=0, microsecond=0)
    while day.day > 28 or day.strftime("%m-%d") in ("02-01", "09-01"):
        day -= timedelta(days=1)
    return day


@pytest.fixture(scope="module")
def wb():
    state = state_dir()
    data = yaml.safe_load(DEMO.read_text())
    data["auth"]["demo_users"][LOOKALIKE] = {"groups": ["course-ml101"]}
    start = term_start()
    data["groups"]["physics-lab"]["budget"].update(
        period="term", term_starts=[start.strftime("%m-%d"), (start + timedelta(days=120)).strftime("%m-%d")]
    )
    config = state.parent / "isolation.yaml"
    config.write_text(yaml.safe_dump(data))
    w = Workbench(state, config=config).start()
    if not w.system_users:
        w.stop()
        pytest.skip("isolation between Unix accounts needs root and a checkout other users can reach")
    yield w
    assert w.stop() == 0, w.output()
    assert not w.leftovers(), w.leftovers()


def token(w: Workbench, name: str) -> str:
    session = w.login(name)
    assert session.login_status == 302, f"{name} could not log in"
    return w.new_token(session, name)


def groups_of_process(pid: int) -> set[int]:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("Groups:"))
    return {int(g) for g in line.split()[1:]}


def as_user(unix: str, *cmd: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` as the Unix account ``unix`` with the groups a login of it would get (initgroups)."""
    entry = pwd.getpwnam(unix)
    groups = os.getgrouplist(unix, entry.pw_gid)
    return subprocess.run(list(cmd), user=unix, group=entry.pw_gid, extra_groups=groups, capture_output=True, text=True)


def status(w: Workbench, tok: str, owner: str) -> int:
    r = requests.get(f"{w.url}/user/{owner}/api/status", headers={"Authorization": f"token {tok}"}, timeout=30)
    return r.status_code


def test_refused_start_does_not_become_the_default_and_names_never_meet_groups(wb):
    """Items 4 and 1; the servers stay up for the next test (item 3)."""
    admin, researcher = token(wb, "admin"), token(wb, "researcher")

    # item 4: a malformed and an unentitled profile are refused, nothing starts, and a plain start then works
    for options in ({"profile": {"$ne": 1}}, {"profile": "cpu-small"}):
        r = wb.token_api(researcher, "POST", "/users/researcher/server", json=options)
        assert r.status_code == 403, r.text
        assert "is not available to you; your groups may use: cpu-large, h100-x1" in r.json()["message"]
        assert wb.token_api(admin, "GET", "/users/researcher").json()["servers"] == {}
    wb.start_server(researcher, "researcher")  # no options: the stored ones must not be the refused ones
    assert server_process(wb, "researcher").environ()["WORKBENCH_PROFILE"] == "cpu-large"
    assert "Start of researcher refused or failed: their stored start options stay {}" in wb.hub_log()
    assert "The stored start options of researcher" not in wb.hub_log()  # not a fallback from refused ones

    # item 1: the look-alike gets an account of its own, outside the group namespaces
    lookalike = token(wb, LOOKALIKE)
    wb.start_server(lookalike, LOOKALIKE)
    unix = system_username(LOOKALIKE)
    assert unix.startswith(f"{USER_PREFIX}ug-physics-lab-"), unix
    proc = server_process(wb, LOOKALIKE)
    assert proc.username() == unix
    with pytest.raises(KeyError):
        pwd.getpwnam(f"{USER_PREFIX}g-physics-lab")  # no account is named like the group
    group = grp.getgrnam(f"{USER_PREFIX}g-physics-lab")
    assert unix not in group.gr_mem and group.gr_gid not in groups_of_process(proc.pid)
    assert pwd.getpwnam(unix).pw_gid != group.gr_gid
    probe = as_user(unix, "ls", str(shared_folder(wb)))
    assert probe.returncode != 0 and "Permission denied" in probe.stderr
    assert as_user(f"{USER_PREFIX}researcher", "ls", str(shared_folder(wb))).returncode == 0  # a member can

    # item 1: a name that cannot have an account is refused by the hub's API, and nothing is created
    r = wb.token_api(admin, "POST", "/users", json={"usernames": ["eve:0:0"]})
    assert r.status_code == 400, r.text
    assert wb.token_api(admin, "GET", "/users/eve:0:0").status_code == 404


def test_instructor_token_reaches_students_servers_only(wb):
    """Item 3: the instructor's own token opens a student's server, not a researcher's; students not each other's."""
    instructor, student1 = token(wb, "instructor"), token(wb, "student1")
    lookalike = token(wb, LOOKALIKE)  # a student of the same course, whose server runs (previous test)
    researcher = token(wb, "researcher")
    wb.start_server(student1, "student1")
    try:
        assert status(wb, instructor, "student1") == 200
        assert status(wb, instructor, LOOKALIKE) == 200
        assert status(wb, instructor, "researcher") == 403
        assert status(wb, lookalike, "student1") == 403
        assert status(wb, student1, LOOKALIKE) == 403
        assert status(wb, student1, "student1") == 200
    finally:
        wb.stop_server(student1, "student1")
        wb.stop_server(lookalike, LOOKALIKE)
        wb.stop_server(researcher, "researcher")


def test_services_health_says_more_only_to_a_valid_token(wb):
    """Item 6: /api/health of quota, sessions and rosters answers only ok/unhealthy without a login."""
    admin = token(wb, "admin")
    for service, detail in (("quota", "database"), ("sessions", None), ("rosters", "courses")):
        url = f"{wb.url}/services/{service}/api/health"
        for headers in ({}, {"Authorization": "token not-a-valid-token"}):
            r = requests.get(url, headers=headers, timeout=30)
            assert (r.status_code, r.json()) == (200, {"status": "ok"}), (service, r.text)
        full = requests.get(url, headers={"Authorization": f"token {admin}"}, timeout=30).json()
        assert full["status"] == "ok"
        if detail:
            assert detail in full, (service, full)


def test_quota_answers_odd_user_names_with_4xx_and_groups_with_their_term(wb):
    """Item 6: user names with spaces and other characters reach the quota API quoted; a term budget's usage is
    reported for the current term (the group's own term_starts), not the calendar month."""
    instructor = token(wb, "instructor")
    api = f"{wb.url}/services/quota/api"
    hdr = {"Authorization": f"token {instructor}"}
    for name in ("a b", "x%y", "é", "a:b", "..", "a\\b", "%ff"):
        r = requests.get(f"{api}/usage/users/{quote(name, safe='')}", headers=hdr, timeout=30)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
    researcher = token(wb, "researcher")
    r = requests.get(f"{api}/usage/groups/physics-lab", headers={"Authorization": f"token {researcher}"}, timeout=30)
    assert r.status_code == 200, r.text
    period = r.json()["period"]
    assert period["kind"] == "term" and period["start"].startswith(term_start().strftime("%Y-%m-%d")), period


def test_memberships_and_stored_options_follow_a_policy_change():
    """Items 5 and 4: ``leaver`` (physics-lab, course-ml101, and its instructor) starts a server with profile
    cpu-large; the workbench restarts with a policy where leaver is only a student of course-ml101. The next plain
    start runs the course's default profile (the stored cpu-large is no longer entitled; logged), and the server has
    left wb-g-physics-lab and wb-i-course-ml101: the group's shared folder is no longer readable."""
    state = state_dir()
    data = yaml.safe_load(DEMO.read_text())
    data["auth"]["demo_users"]["leaver"] = {"groups": ["physics-lab", "course-ml101"]}
    data["groups"]["course-ml101"]["instructors"].append("leaver")
    before, after = state.parent / "before.yaml", state.parent / "after.yaml"
    before.write_text(yaml.safe_dump(data))
    data["auth"]["demo_users"]["leaver"] = {"groups": ["course-ml101"]}
    data["groups"]["course-ml101"]["instructors"].remove("leaver")
    after.write_text(yaml.safe_dump(data))
    unix = system_username("leaver")

    w = Workbench(state, config=before).start()
    try:
        if not w.system_users:
            pytest.skip("Unix group memberships need root and a checkout other users can reach")
        tok = token(w, "leaver")
        w.start_server(tok, "leaver", profile="cpu-large")
        lab, teach = grp.getgrnam(f"{USER_PREFIX}g-physics-lab"), grp.getgrnam(f"{USER_PREFIX}i-course-ml101")
        assert {lab.gr_gid, teach.gr_gid} <= groups_of_process(server_process(w, "leaver").pid)
        assert as_user(unix, "ls", str(shared_folder(w))).returncode == 0
        w.stop_server(tok, "leaver")
    finally:
        assert w.stop() == 0, w.output()

    w = Workbench(state, config=after).start()
    try:
        tok = token(w, "leaver")
        w.start_server(tok, "leaver")  # no options: the stored cpu-large is no longer entitled
        proc = server_process(w, "leaver")
        assert proc.environ()["WORKBENCH_PROFILE"] == "cpu-small"
        assert "The stored start options of leaver ask for profile 'cpu-large'" in w.hub_log()
        assert (
            f"leaver ({unix}) left the Unix group(s) {USER_PREFIX}g-physics-lab, {USER_PREFIX}i-course-ml101"
            in w.hub_log()
        )
        gids = groups_of_process(proc.pid)
        assert lab.gr_gid not in gids and teach.gr_gid not in gids
        assert grp.getgrnam(f"{USER_PREFIX}g-course-ml101").gr_gid in gids
        ids = subprocess.run(["id", "-Gn", unix], capture_output=True, text=True, check=True).stdout.split()
        assert (
            f"{USER_PREFIX}g-physics-lab" not in ids
            and f"{USER_PREFIX}i-course-ml101" not in ids
            and f"{USER_PREFIX}g-course-ml101" in ids
        )
        probe = as_user(unix, "ls", str(shared_folder(w)))
        assert probe.returncode != 0 and "Permission denied" in probe.stderr
        w.stop_server(tok, "leaver")
    finally:
        assert w.stop() == 0, w.output()
        assert not w.leftovers(), w.leftovers()
