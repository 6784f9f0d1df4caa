"""Servers isolated by origin: the real embedded workbench as `workbench up` starts it by default (and with
``--no-subdomains``).

Real: the hub and configurable-http-proxy (host routing), the quota, sessions and roster services,
dask-gateway-server behind the dashboard guard, JupyterLab servers of researcher and student1 as their own
Unix accounts. Nothing is mocked. Python's resolver (glibc) knows no ``*.localhost`` names (browsers resolve
them to loopback by themselves), so the tests connect to 127.0.0.1 and name the host in the ``Host:`` header,
as the browser does.

Checks: a user's server answers on its own host only: ``/user/student1/`` on the hub's host, on another
user's host or on 127.0.0.1 is a redirect to the hub, never the server's answer; a browser that opens
``http://127.0.0.1:<port>`` (the address ``make up`` always printed) is sent to the hub's origin, same path and
query, and logs in there through the real login form, while the hub's API, its health check and the services stay
on 127.0.0.1 for clients; with ``--no-subdomains``, or on a network ``--bind`` without ``--subdomain-host`` (with
a one-line warning), every server is a path of 127.0.0.1 again; the services stay on the
hub's host and on 127.0.0.1 (what notebooks and the platform's own processes use); a notebook server still
gets its notifications and its Dask clusters through them, and the cockpit links a dashboard on the hub's
origin, where the guard's login lives.
"""

from __future__ import annotations

import re
from http.cookies import SimpleCookie
from urllib.parse import urljoin, urlsplit

import pytest
import requests

from .harness import PASSWORD, Workbench, browser_session, state_dir

pytestmark = pytest.mark.integration


class Browser:
    """A browser's view of the workbench without DNS: any ``http://<host>:<port>/…`` is asked of 127.0.0.1
    with that ``Host:``, cookies are kept by hand in one jar (all hosts here are loopback) and redirects are
    followed one by one. Python's cookie jar would drop the hub's session cookie (``Domain=localhost``)."""

    def __init__(self, wb: Workbench):
        self.wb = wb
        self.jar: dict[str, str] = {}

    def request(self, method: str, url: str, follow: bool = True, **kw) -> requests.Response:
        for _ in range(10):
            u = urlsplit(url)
            r = requests.request(
                method,
                f"http://127.0.0.1:{u.port}{u.path}" + (f"?{u.query}" if u.query else ""),
                headers={"Host": u.netloc, **kw.pop("headers", {})},
                cookies=self.jar,
                allow_redirects=False,
                timeout=60,
                **kw,
            )
            for header in r.raw.headers.getlist("Set-Cookie"):
                cookie = SimpleCookie()
                cookie.load(header)
                self.jar.update({k: m.value for k, m in cookie.items()})
            if not (follow and r.is_redirect):
                return r
            url, method, kw = urljoin(url, r.headers["Location"]), "GET", {}
        raise AssertionError(f"too many redirects, last {url}")

    def login(self, username: str, password: str = PASSWORD) -> str:
        """Log in through the login form on the hub's host; returns a new API token of ``username``."""
        hub = f"http://localhost:{self.wb.port}"
        r = self.request("GET", f"{hub}/hub/login")
        xsrf = re.search(r'name="_xsrf"\s+value="([^"]+)"', r.text)
        assert xsrf, r.text
        data = {"username": username, "password": password, "_xsrf": xsrf.group(1)}
        r = self.request("POST", f"{hub}/hub/login", follow=False, data=data)
        assert r.status_code == 302, (r.status_code, r.text[:500])
        r = self.request(
            "POST",
            f"{hub}/hub/api/users/{username}/tokens",
            json={"note": "origins test"},
            headers={"X-XSRFToken": self.jar["_xsrf"]},
        )
        assert r.status_code in (200, 201), r.text
        return r.json()["token"]


def login_token(wb: Workbench, username: str) -> str:
    return Browser(wb).login(username)


def host_get(wb: Workbench, host: str, path: str, token: str | None = None, **kw) -> requests.Response:
    """GET ``path`` through the proxy as a browser at ``http://<host>:<port>`` would (``Host:`` header)."""
    headers = {"Host": f"{host}:{wb.port}"}
    if token:
        headers["Authorization"] = f"token {token}"
    return requests.get(f"{wb.url}{path}", headers=headers, allow_redirects=False, timeout=60, **kw)


@pytest.fixture(scope="module")
def wb():
    w = Workbench(state_dir("wb-origins-"), subdomains=True).start()  # `workbench up`'s default
    yield w
    assert w.stop() == 0, w.output()[-3000:]
    assert not w.leftovers(), w.leftovers()


def test_a_users_server_answers_on_its_own_host_only(wb):
    assert wb.runtime["extra"]["subdomain_host"] == f"http://localhost:{wb.port}"
    assert f"Workbench is ready:  http://localhost:{wb.port}/" in wb.output()
    student = login_token(wb, "student1")
    researcher = login_token(wb, "researcher")
    server = wb.start_server(student, "student1")
    try:
        assert server["url"] == f"http://student1.localhost:{wb.port}/user/student1/"
        own = host_get(wb, "student1.localhost", "/user/student1/api/status", student)
        assert own.status_code == 200 and "started" in own.json(), own.text
        # the same path on the hub's host, on another user's host and on 127.0.0.1 never reaches the server
        for host in ("localhost", "researcher.localhost", "127.0.0.1"):
            r = host_get(wb, host, "/user/student1/api/status", student)
            assert r.status_code == 302, (host, r.status_code, r.text[:300])
            # the hub's answer for a server's path; 127.0.0.1 sends every page to the same path on the hub's origin
            path = "/user/student1/api/status" if host == "127.0.0.1" else "/hub/user/student1/api/status"
            assert r.headers["Location"] == f"http://localhost:{wb.port}{path}", host
            assert "jupyterhub-user-student1" not in r.headers.get("Set-Cookie", "")
        # on its own host the server still checks who asks
        assert host_get(wb, "student1.localhost", "/user/student1/api/status", researcher).status_code == 403
    finally:
        wb.stop_server(student, "student1")


def test_services_stay_on_the_hubs_host_and_notebooks_still_reach_them(wb):
    browser = Browser(wb)
    researcher = browser.login("researcher")
    for host in ("localhost", "127.0.0.1"):
        r = host_get(wb, host, "/services/quota/api/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}, (host, r.status_code, r.text[:300])
        r = host_get(wb, host, "/services/dask-gateway/api/health")
        assert r.status_code == 200, (host, r.status_code, r.text[:300])
    # not on a user's host
    assert host_get(wb, "researcher.localhost", "/services/quota/api/health").status_code == 302

    wb.start_server(researcher, "researcher")
    try:
        env = wb.server_process("researcher").environ()
        assert env["JUPYTERHUB_PUBLIC_URL"] == f"http://researcher.localhost:{wb.port}/user/researcher/"
        assert env["DASK_GATEWAY__ADDRESS"] == f"http://localhost:{wb.port}/services/dask-gateway"
        # dask-gateway's dashboard_link (dask-labextension shows it) is built on the public address
        assert env["DASK_GATEWAY__PUBLIC_ADDRESS"] == env["DASK_GATEWAY__ADDRESS"]
        assert env["WORKBENCH_SERVICES_URL"] == f"{wb.loopback_url}/services/"
        # the server asks the quota and sessions services itself (its own token): no problem reported
        r = host_get(wb, "researcher.localhost", "/user/researcher/workbench/notifications", researcher)
        assert r.status_code == 200, r.text
        assert r.json()["problems"] == [], r.json()
        # a cluster made through the notebook's gateway address is linked on the hub's origin
        import gc

        from dask_gateway import Gateway, JupyterHubAuth

        gc.collect()  # see Workbench.gateway
        address, proxy = env["DASK_GATEWAY__ADDRESS"], env["DASK_GATEWAY__PROXY_ADDRESS"]
        with Gateway(address=address, proxy_address=proxy, auth=JupyterHubAuth(api_token=researcher)) as gw:
            cluster = gw.new_cluster()
            try:
                r = host_get(wb, "researcher.localhost", "/user/researcher/workbench/cockpit", researcher)
                assert r.status_code == 200, r.text
                views = {c["name"]: c for c in r.json()["dask"]["clusters"]}
                assert views[cluster.name]["dashboard_url"] == (
                    f"http://localhost:{wb.port}/services/dask-gateway/clusters/{cluster.name}/status"
                ), views
                # the researcher's browser opens it: the guard's login through the hub's OAuth, then the dashboard
                r = browser.request("GET", views[cluster.name]["dashboard_url"])
                assert r.status_code == 200 and "bokeh" in r.text.lower(), (r.status_code, r.url, r.text[:500])
            finally:
                cluster.shutdown()
    finally:
        wb.stop_server(researcher, "researcher")


def test_a_browser_at_127_0_0_1_is_sent_to_the_hubs_origin_and_logs_in_there(wb):
    """`make up` printed http://127.0.0.1:<port> for years: pages there go to http://localhost:<port>, same path and
    query (the hub's cookies are not valid on 127.0.0.1); the hub's API, health check and services stay."""
    loop, hub = wb.loopback_url, f"http://localhost:{wb.port}"
    assert wb.url == hub and wb.server_url("student1") == f"http://student1.localhost:{wb.port}/user/student1/"
    for path in ("/", "/hub/", "/hub/login?next=%2Fhub%2Fhome", "/hub/spawn/student1", "/user/student1/lab?reset"):
        r = requests.get(f"{loop}{path}", allow_redirects=False, timeout=60)
        assert r.status_code == 302 and r.headers["Location"] == f"{hub}{path}", (path, r.status_code, r.headers)
        assert "Set-Cookie" not in r.headers, path
    assert requests.get(f"{loop}/hub/health", timeout=60).status_code == 200
    assert requests.get(f"{loop}/hub/api/", timeout=60).json()["version"]  # the API answers, no redirect
    assert requests.get(f"{loop}/services/quota/api/health", timeout=60).json() == {"status": "ok"}

    # a browser's way in: the README's URL, then the real login form (cookies kept as a browser keeps them)
    s = browser_session()
    r = s.get(f"{loop}/", timeout=60)
    assert r.url.startswith(f"{hub}/hub/login") and r.status_code == 200, (r.url, r.status_code)
    xsrf = re.search(r'name="_xsrf"\s+value="([^"]+)"', r.text)
    assert xsrf, r.text[:500]
    # a form posted to 127.0.0.1 keeps its method and body to the hub's origin (307), where the cookies are
    r = s.post(
        f"{loop}/hub/login?next=%2Fhub%2Fhome",
        data={"username": "student1", "password": PASSWORD, "_xsrf": xsrf.group(1)},
        allow_redirects=False,
        timeout=60,
    )
    assert r.status_code == 307 and r.headers["Location"] == f"{hub}/hub/login?next=%2Fhub%2Fhome", r.headers
    r = s.post(
        f"{hub}/hub/login?next=%2Fhub%2Fhome",
        data={"username": "student1", "password": PASSWORD, "_xsrf": xsrf.group(1)},
        allow_redirects=False,
        timeout=60,
    )
    assert r.status_code == 302 and r.headers["Location"] == "/hub/home", (r.status_code, r.text[:300])
    home = s.get(f"{hub}/hub/home", timeout=60)
    assert home.url == f"{hub}/hub/home" and "student1" in home.text, home.url
    who = s.get(f"{hub}/hub/api/user", headers={"X-XSRFToken": s.cookies.get("_xsrf", path="/hub/")}, timeout=60)
    assert who.status_code == 200 and who.json()["name"] == "student1", who.text
    assert wb.new_token(s, "student1")  # a cookie-authenticated POST (the hub's XSRF check, bound to the session)
    # the hub's login cookie never went to 127.0.0.1, and pages there still send the logged-in browser on
    assert not [c for c in s.cookies if c.name.startswith("jupyterhub-hub-login") and "127.0.0.1" in c.domain]
    r = s.get(f"{loop}/hub/home", timeout=60)
    assert r.url == f"{hub}/hub/home" and r.status_code == 200, r.url


def test_no_subdomains_serves_every_server_as_a_path_of_127_0_0_1():
    w = Workbench(state_dir("wb-origins-off-"), subdomains=False).start()  # the harness passes --no-subdomains
    try:
        assert "--no-subdomains" in w.command()
        assert "subdomain_host" not in w.runtime.get("extra", {})
        assert f"Workbench is ready:  http://127.0.0.1:{w.port}/" in w.output()
        assert "redirects to" not in w.output()
        assert w.url == w.loopback_url and w.server_url("student1") == f"{w.url}/user/student1/"
        # pages answer on 127.0.0.1 itself (no redirect), and the login works there
        r = requests.get(f"{w.url}/hub/login", allow_redirects=False, timeout=60)
        assert r.status_code == 200, (r.status_code, r.headers)
        s = w.login("student1")
        assert s.login_status == 302
        token = w.new_token(s, "student1")
        server = w.start_server(token, "student1")
        try:
            assert server["url"] == "/user/student1/"
            r = requests.get(
                f"{w.server_url('student1')}api/status", headers={"Authorization": f"token {token}"}, timeout=60
            )
            assert r.status_code == 200 and "started" in r.json(), r.text
        finally:
            w.stop_server(token, "student1")
    finally:
        code = w.stop()
    assert code == 0, w.output()[-3000:]
    assert not w.leftovers(), w.leftovers()


def test_on_a_network_bind_the_default_falls_back_to_one_origin_with_a_one_line_warning():
    """`workbench up --bind 0.0.0.0` without --subdomain-host: *.localhost would reach only this machine's browser,
    so servers are paths of one origin again, and the output says so in one line naming the fix."""
    w = Workbench(
        state_dir("wb-origins-net-"),
        subdomains=True,  # no --no-subdomains: the default decides
        extra_args=("--bind", "0.0.0.0", "--allow-demo-auth-on-network"),
    )
    w.url = w.loopback_url  # the fallback: the hub's origin is the address again
    w.start()
    try:
        warnings = [x for x in w.output().splitlines() if "without --subdomain-host" in x]
        assert len(warnings) == 1 and "WARNING: --bind 0.0.0.0 without --subdomain-host" in warnings[0], warnings
        assert "--subdomain-host https://<name>" in warnings[0] and "--no-subdomains" in warnings[0]
        assert "subdomain_host" not in w.runtime.get("extra", {})
        assert f"Workbench is ready:  http://127.0.0.1:{w.port}/" in w.output()
        r = requests.get(f"{w.loopback_url}/hub/login", allow_redirects=False, timeout=60)
        assert r.status_code == 200, (r.status_code, r.headers)  # no redirect to a name others cannot resolve
    finally:
        code = w.stop()
    assert code == 0, w.output()[-3000:]
    assert not w.leftovers(), w.leftovers()
