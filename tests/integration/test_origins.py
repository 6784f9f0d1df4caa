"""Servers isolated by origin: the real embedded workbench with `workbench up --subdomains`.

Real: the hub and configurable-http-proxy (host routing), the quota, sessions and roster services,
dask-gateway-server behind the dashboard guard, JupyterLab servers of researcher and student1 as their own
Unix accounts. Nothing is mocked. Python's resolver (glibc) knows no ``*.localhost`` names (browsers resolve
them to loopback by themselves), so the tests connect to 127.0.0.1 and name the host in the ``Host:`` header,
as the browser does.

Checks: a user's server answers on its own host only: ``/user/student1/`` on the hub's host, on another
user's host or on 127.0.0.1 is a redirect to the hub, never the server's answer; the services stay on the
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

from .harness import PASSWORD, Workbench, state_dir

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
    w = Workbench(state_dir("wb-origins-"), extra_args=("--subdomains",)).start()
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
            assert r.headers["Location"] == f"http://localhost:{wb.port}/hub/user/student1/api/status", host
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
        assert env["WORKBENCH_SERVICES_URL"] == f"{wb.url}/services/"
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
