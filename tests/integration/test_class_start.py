"""A class starts at once (issue 12: "no 5xx in a burst"): real logins and real JupyterLab starts queued by the
start slots (:mod:`workbench.spawn.concurrency`).

A real `workbench up` (hub, proxy, quota service, per-user Unix accounts, jupyterhub-singleuser servers; nothing
mocked) with ``hub_config/demo.yaml`` plus :data:`N` students of course-ml101, and the start limit forced to
:data:`SLOTS` through ``$WORKBENCH_START_SLOTS`` so that most of the class waits in line. Every student logs in
through the login form, then all press start (the spawn form's POST) at once and read their progress stream as
the spawn-pending page does. Checked: every server ends ready (its ``/api/status`` answers 200 through the proxy),
no request anywhere answered 5xx (the students' own and the hub's log), never more than :data:`SLOTS` starts at
once (the slots' peak in the hub's log), and a queued student was shown their place.
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import requests
import yaml

from .harness import DEMO, Workbench, state_dir

N = 8
SLOTS = 2
DEADLINE = 600.0  # seconds for the whole class to be ready (a loaded 2-core machine; not a measured figure)
STUDENTS = [f"burst{i:02d}" for i in range(1, N + 1)]


@pytest.fixture(scope="module")
def class_wb():
    sd = state_dir("wb-it-class-")
    policy = yaml.safe_load(DEMO.read_text())
    for name in STUDENTS:
        policy["auth"]["demo_users"][name] = {"groups": ["course-ml101"]}
    config = sd.parent / "class.yaml"
    config.write_text(yaml.safe_dump(policy, sort_keys=False))
    w = Workbench(sd, config=config, env={"WORKBENCH_START_SLOTS": str(SLOTS)}).start()
    try:
        yield w
    finally:
        code = w.stop()
    assert code == 0, w.output()[-3000:]
    assert not w.leftovers(), w.leftovers()


class Student:
    """One browser: the login form, the spawn form, the progress stream, then its server's status."""

    def __init__(self, wb: Workbench, name: str):
        self.wb, self.name = wb, name
        self.s = wb.login(name)
        assert self.s.login_status == 302, f"{name} could not log in: {self.s.login_status}"
        self.token = wb.new_token(self.s, name)
        self.statuses: list[tuple[str, int]] = []  # every answer this student got
        self.events: list[dict] = []
        self.ready = False
        self.problem = ""

    def note(self, what: str, r: requests.Response) -> requests.Response:
        self.statuses.append((what, r.status_code))
        return r

    def start(self, go: threading.Event) -> None:
        go.wait()
        try:
            xsrf = self.s.cookies.get("_xsrf", path="/hub/") or ""
            r = self.note(
                "POST /hub/spawn",
                self.s.post(
                    f"{self.wb.url}/hub/spawn/{self.name}",
                    data={"_xsrf": xsrf, "profile": "cpu-small"},
                    allow_redirects=False,
                    timeout=120,
                ),
            )
            if r.status_code != 302:
                self.problem = f"spawn form answered {r.status_code}: {r.text[:300]}"
                return
            self.read_progress(xsrf)
            self.wait_ready()
        except requests.RequestException as e:
            self.problem = repr(e)

    def read_progress(self, xsrf: str) -> None:
        url = f"{self.wb.url}/hub/api/users/{self.name}/server/progress"
        with self.s.get(url, headers={"X-XSRFToken": xsrf}, stream=True, timeout=(30, 300)) as r:
            self.note("GET progress", r)
            for line in r.iter_lines(decode_unicode=True):
                if line and line.startswith("data:"):
                    event = json.loads(line[5:])
                    self.events.append(event)
                    if event.get("ready") or event.get("failed"):
                        return

    def wait_ready(self) -> None:
        auth = {"Authorization": f"token {self.token}"}
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            r = self.note(
                "GET /user/.../api/status",
                requests.get(f"{self.wb.url}/user/{self.name}/api/status", headers=auth, timeout=60),
            )
            if r.status_code == 200:
                self.ready = True
                return
            model = self.note(
                "GET /hub/api/users/...",
                requests.get(f"{self.wb.url}/hub/api/users/{self.name}", headers=auth, timeout=60),
            ).json()
            if not (model.get("servers") or {}).get(""):
                self.problem = f"the server went away before it was ready; progress: {self.events[-3:]}"
                return
            time.sleep(0.5)
        self.problem = f"not ready after {DEADLINE:.0f} s"

    @property
    def places(self) -> list[int]:
        return [int(m.group(1)) for e in self.events if (m := re.search(r"(\d+) ahead of you", e.get("message", "")))]


def test_a_class_starting_at_once_all_get_servers_in_line_without_5xx(class_wb):
    students = [Student(class_wb, name) for name in STUDENTS]
    go = threading.Event()
    threads = [threading.Thread(target=st.start, args=(go,)) for st in students]
    for t in threads:
        t.start()
    go.set()  # all press start together
    for t in threads:
        t.join(DEADLINE + 120)
    assert not any(t.is_alive() for t in threads), "a student's start never finished"
    log = class_wb.hub_log()

    problems = {st.name: st.problem for st in students if st.problem or not st.ready}
    assert not problems, f"{problems}\n{log[-4000:]}"

    answered_5xx = [(st.name, what, code) for st in students for what, code in st.statuses if code >= 500]
    assert not answered_5xx
    hub_5xx = re.findall(r"\] (5\d\d) (GET|POST|PUT|PATCH|DELETE) (\S+)", log)
    assert not hub_5xx, hub_5xx

    # the line held: never more than SLOTS starting at once, and it was full (the queue was used)
    grants = re.findall(r"Start slot granted to (\S+) \((\d+) starting of (\d+), (\d+) waiting, peak (\d+)\)", log)
    granted = {g[0] for g in grants}
    assert all(name in granted for name in STUDENTS), granted
    assert {int(g[2]) for g in grants} == {SLOTS}
    assert max(int(g[4]) for g in grants) == SLOTS
    assert all(int(g[1]) <= SLOTS for g in grants)
    assert max(int(g[3]) for g in grants) >= N // 2  # most of the class waited

    # a queued student saw their place on the spawn page, and it moved up
    places = max((st.places for st in students), key=len)
    assert places and places[0] >= 1, [st.events[:3] for st in students]
    assert len(places) >= 2 and places == sorted(places, reverse=True), places
    assert any(e.get("message") == "start slot granted, starting your server" for e in students[-1].events)
