"""Unit tests of a notebook job's gateway access (workbench.jobs.gateway, execute's cluster cleanup).

The cleanup tests talk to a small stand-in of the gateway's REST API (``http.server`` in a thread:
``GET /api/v1/clusters/``, ``DELETE /api/v1/clusters/<name>``); the real gateway is exercised by the
integration tests, not here.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from workbench.jobs import execute
from workbench.jobs.gateway import (
    TOKEN_MARGIN_S,
    api_url,
    job_gateway_env,
    stop_new_clusters,
    token_expires_in,
    token_request,
)
from workbench.names import GATEWAY_ACCESS_SCOPE


def test_token_request_asks_only_for_the_gateway_scope_and_expires_after_the_time_limit():
    body = token_request("j1", 3600)
    assert body["scopes"] == [GATEWAY_ACCESS_SCOPE]
    assert body["expires_in"] == 3600 + TOKEN_MARGIN_S
    assert "j1" in body["note"]


def test_token_without_time_limit_still_expires():
    assert 0 < token_expires_in(None) < 10 * 24 * 3600
    assert token_expires_in(0) == token_expires_in(None)


def test_job_gateway_env_adds_the_token_to_the_server_settings():
    env = job_gateway_env({"DASK_GATEWAY__ADDRESS": "http://h/services/dask-gateway"}, "tok")
    assert env == {"DASK_GATEWAY__ADDRESS": "http://h/services/dask-gateway", "JUPYTERHUB_API_TOKEN": "tok"}
    with pytest.raises(ValueError, match="needs its gateway token"):
        job_gateway_env({}, "")


def test_api_url():
    assert api_url("http://h/services/dask-gateway/") == "http://h/services/dask-gateway/api/v1"


def test_gateway_of_needs_address_and_token():
    assert execute.gateway_of({"DASK_GATEWAY__ADDRESS": "http://g"}) is None
    assert execute.gateway_of({"DASK_GATEWAY__ADDRESS": "http://g", "JUPYTERHUB_API_TOKEN": "t"}) == ("http://g", "t")


@pytest.fixture
def fake_gateway():
    """A stand-in gateway API holding clusters ``{"old"}``; yields (address, state)."""
    state = {"clusters": {"old"}, "deleted": [], "auth": []}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _reply(self, code, body=b""):
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            state["auth"].append(self.headers.get("Authorization"))
            if self.path == "/api/v1/clusters/":
                self._reply(200, json.dumps({n: {} for n in state["clusters"]}).encode())
            else:
                self._reply(404)

        def do_DELETE(self):
            name = self.path.rsplit("/", 1)[-1]
            state["clusters"].discard(name)
            state["deleted"].append(name)
            self._reply(204)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()


def test_only_the_clusters_created_during_the_run_are_stopped(fake_gateway):
    address, state = fake_gateway
    gateway = (address, "tok")
    before = execute.clusters_before(gateway)
    assert before == {"old"}
    state["clusters"] |= {"new1", "new2"}  # the notebook started two clusters
    execute.stop_run_clusters(gateway, before)
    assert sorted(state["deleted"]) == ["new1", "new2"]
    assert state["clusters"] == {"old"}
    assert set(state["auth"]) == {"jupyterhub tok"}


def test_unknown_before_list_stops_nothing(fake_gateway, capsys):
    address, state = fake_gateway
    state["clusters"].add("new")
    execute.stop_run_clusters((address, "tok"), None)
    assert state["deleted"] == []
    assert stop_new_clusters(address, "tok", {"old"}) == ["new"]


def test_unreachable_gateway_is_reported_not_raised(capsys):
    gateway = ("http://127.0.0.1:9", "tok")
    assert execute.clusters_before(gateway) is None
    execute.stop_run_clusters(gateway, set())
    assert "could not" in capsys.readouterr().out
