"""Course groups: instructors' powers are generated from the policy and filtered to their course."""

from __future__ import annotations

import pytest
import requests

from .harness import Workbench

pytestmark = pytest.mark.integration


@pytest.fixture
def wb(default_wb):
    """The shared default workbench (tests/integration/conftest.py)."""
    return default_wb


def token(w: Workbench, name: str) -> str:
    return w.new_token(w.login(name), name)


def test_instructor_sees_and_helps_only_their_students(wb):
    for name in ("student1", "student2", "researcher"):
        token(wb, name)  # make sure these users exist in the hub
    instructor = token(wb, "instructor")
    listed = sorted(u["name"] for u in wb.token_api(instructor, "GET", "/users").json())
    assert listed == ["instructor", "student1", "student2"]
    assert wb.token_api(instructor, "GET", "/users/researcher").status_code == 404
    assert wb.token_api(instructor, "GET", "/groups/physics-lab").status_code == 404
    members = wb.token_api(instructor, "GET", "/groups/course-ml101").json()["users"]
    assert sorted(members) == ["instructor", "student1", "student2"]

    # start a student's server for them, open it, and stop it
    wb.start_server(instructor, "student1", profile="cpu-small")
    # (the hub resolves !group= filters when it issues a token for one server, as in the browser's OAuth flow)
    r = wb.token_api(
        instructor, "POST", "/users/instructor/tokens", json={"scopes": ["access:servers!server=student1/"]}
    )
    assert r.status_code == 201, r.text  # a token made
    server_token = r.json()["token"]
    r = requests.get(
        f"{wb.url}/user/student1/api/status", headers={"Authorization": f"token {server_token}"}, timeout=30
    )
    assert r.status_code == 200
    wb.stop_server(instructor, "student1")

    # nothing outside the course: not a researcher's server, not hub admin pages
    researcher = token(wb, "researcher")
    wb.start_server(researcher, "researcher", profile="cpu-large")
    try:
        hdr = {"Authorization": f"token {instructor}"}
        # the researcher's own server (jupyterhub.singleuser) knows the token but it lacks
        # access:servers!server=researcher/: not authenticated there, and an API request is refused with 403
        assert requests.get(f"{wb.url}/user/researcher/api/status", headers=hdr, timeout=30).status_code == 403
        r = wb.token_api(
            instructor, "POST", "/users/instructor/tokens", json={"scopes": ["access:servers!server=researcher/"]}
        )
        # the hub's token handler turns the scope check's ValueError into 400 (jupyterhub apihandlers/users.py)
        assert r.status_code == 400, "no token for a server outside the course"
        assert "Not assigning requested scopes access:servers!server=researcher/" in r.json()["message"]
        # the instructor holds `servers` filtered to their course: a filtered scope answers 404 for users out of
        # its reach ("no access to resources or resources not found", jupyterhub.scopes.needs_scope)
        assert wb.token_api(instructor, "DELETE", "/users/researcher/server").status_code == 404
        # no `admin:users` at all, filtered or not: 403
        assert wb.token_api(instructor, "POST", "/users", json={"usernames": ["x"]}).status_code == 403
    finally:
        wb.stop_server(researcher, "researcher")


def test_students_get_nothing_on_each_other(wb):
    s1 = token(wb, "student1")
    token(wb, "student2")
    # jupyterhub.scopes.needs_scope: 403 when the token holds none of the required scopes, 404 when it holds
    # them filtered to other resources (a user one may not see is "not found", like one that does not exist)
    r = wb.token_api(s1, "GET", "/users")
    assert r.status_code == 403, r.text  # a student's `self` scopes have no list:users, not even filtered
    assert wb.token_api(s1, "GET", "/users/student2").status_code == 404  # read:users!user=student1
    assert wb.token_api(s1, "POST", "/users/student2/server").status_code == 404  # servers!user=student1
    r = wb.token_api(s1, "GET", "/groups/course-ml101")
    assert r.status_code == 403, r.text  # no read:groups of any kind (instructors have it, filtered)
