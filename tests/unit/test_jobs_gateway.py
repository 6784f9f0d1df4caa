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
    TOKEN_FILE,
    TOKEN_MARGIN_S,
    api_url,
    job_dask_env,
    job_gateway_env,
    run_clusters,
    stop_run_clusters,
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
    """A stand-in gateway API holding the cluster ``old`` (untagged); yields (address, state), where
    ``state["clusters"]`` maps a cluster's name to its options."""
    state = {"clusters": {"old": {}}, "deleted": [], "auth": []}

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
                self._reply(
                    200, json.dumps({n: {"name": n, "options": o} for n, o in state["clusters"].items()}).encode()
                )
            else:
                self._reply(404)

        def do_DELETE(self):
            name = self.path.rsplit("/", 1)[-1]
            state["clusters"].pop(name, None)
            state["deleted"].append(name)
            self._reply(204)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()


def test_only_the_clusters_tagged_with_the_run_are_stopped(fake_gateway):
    """A cluster the user started meanwhile from their own server (untagged) or for another job survives."""
    address, state = fake_gateway
    state["clusters"].update(
        {
            "mine": {"workbench_job": "job-j1"},
            "own-server": {"workbench_job": ""},
            "other-job": {"workbench_job": "job-j2"},
        }
    )
    execute.stop_run_clusters((address, "tok"), "j1")
    assert state["deleted"] == ["mine"]
    assert set(state["clusters"]) == {"old", "own-server", "other-job"}
    assert set(state["auth"]) == {"jupyterhub tok"}


def test_without_job_id_nothing_is_stopped(fake_gateway):
    address, state = fake_gateway
    state["clusters"]["x"] = {"workbench_job": ""}
    execute.stop_run_clusters((address, "tok"), "")
    assert stop_run_clusters(address, "tok", "") == []
    assert state["deleted"] == []


def test_run_clusters_reads_the_tag_option():
    models = {"a": {"options": {"workbench_job": "job-j"}}, "b": {"options": {}}, "c": {}}
    assert run_clusters(models, "j") == ["a"]


def test_job_dask_env_sets_the_tag_through_dask_config():
    import dask.config

    for job_id in ("0a1b2c3d4e5f", "123456789012", "1234e5678901"):  # ids dask would read as numbers bare
        env = job_dask_env({"DASK_GATEWAY__ADDRESS": "http://g"}, job_id)
        collected = dask.config.collect_env(env)
        assert collected["gateway"]["cluster"]["options"]["workbench_job"] == f"job-{job_id}"


def test_load_token_moves_the_file_into_the_environment(tmp_path):
    (tmp_path / TOKEN_FILE).write_text("secret\n")
    env = {}
    assert execute.load_token(str(tmp_path), env)
    assert env == {"JUPYTERHUB_API_TOKEN": "secret"}
    assert not (tmp_path / TOKEN_FILE).exists()
    assert not execute.load_token(str(tmp_path), env)


def test_load_token_does_not_follow_a_symbolic_link(tmp_path):
    (tmp_path / "elsewhere").write_text("x")
    (tmp_path / TOKEN_FILE).symlink_to(tmp_path / "elsewhere")
    env = {}
    assert not execute.load_token(str(tmp_path), env)
    assert env == {}


def test_unreachable_gateway_is_reported_not_raised(capsys):
    execute.stop_run_clusters(("http://127.0.0.1:9", "tok"), "j1")
    assert "could not" in capsys.readouterr().out
