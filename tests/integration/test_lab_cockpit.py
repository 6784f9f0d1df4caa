"""The cockpit's server side (`workbench.lab.cockpit`) in a real single-user server, with the quota service absent.

A real embedded workbench started with ``--no-quota`` (hub, proxy, sessions service, dask-gateway-server
behind the dashboard guard; no quota service), the researcher's real JupyterLab server. The cockpit
endpoint is asked through the proxy with the researcher's hub token, as the browser's session would.
The panel with every service up is tested in a real browser: tests/browser/test_cockpit_browser.py.
"""

from __future__ import annotations

import pytest
import requests

from .harness import Workbench
from .test_embedded import state_dir
from .test_quota_enforcement import Users

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wb():
    w = Workbench(state_dir(), extra_args=("--no-quota",)).start()
    yield w
    assert w.stop() == 0, w.output()
    assert not w.leftovers(), w.leftovers()


def test_without_the_quota_service_the_cockpit_says_so_and_the_rest_works(wb):
    users = Users(wb)
    token = users.token("researcher")
    auth = {"Authorization": f"token {token}"}
    base = f"{wb.url}/user/researcher/workbench/cockpit"
    wb.start_server(token, "researcher", profile="cpu-large")
    try:
        anonymous = requests.get(base, allow_redirects=False, timeout=30)
        assert anonymous.status_code in (302, 401, 403), anonymous.status_code

        doc = requests.get(base, headers=auth, timeout=60).json()
        assert doc["budgets"] == {"available": False, "groups": []}
        quota = [p for p in doc["problems"] if p["source"] == "quota"]
        assert quota and quota[0]["message"].startswith("absent: this workbench does not run it"), doc["problems"]
        assert doc["server"]["profile"] == "cpu-large" and doc["server"]["engine"] == "embedded"
        assert doc["server"]["cpu"] == 4 and doc["server"]["memory"] == 16 * 10**9
        assert doc["gpus"]["message"] == "No GPU in this session: this profile has none."
        # the gateway still answers: the options this user may set, with the group's limits
        assert doc["dask"]["available"] is True and doc["dask"]["clusters"] == []
        fields = {o["field"]: o for o in doc["dask"]["options"]}
        assert (fields["worker_cores"]["min"], fields["worker_cores"]["max"]) == (1, 1)
        assert fields["worker_memory"]["max"] == 1.86  # worker_max_memory 2G, in GiB rounded down

        # what the gateway refuses comes back with its status and its words
        refused = requests.post(f"{base}/clusters", json={"options": {"worker_cores": 5}}, headers=auth, timeout=60)
        assert refused.status_code == 422 and "worker_cores" in refused.json()["message"], refused.text
        # what the cockpit refuses itself names the field and the fix
        bad = requests.post(f"{base}/clusters/abc/scale", json={"count": "two"}, headers=auth, timeout=60)
        assert bad.status_code == 400 and "'count' must be a whole number of workers" in bad.text, bad.text
        odd = requests.delete(f"{base}/clusters/-x", headers=auth, timeout=60)
        assert odd.status_code == 400 and "is not a cluster name" in odd.text, odd.text
        missing = requests.post(f"{base}/clusters/nosuchcluster/scale", json={"count": 1}, headers=auth, timeout=60)
        assert missing.status_code == 404 and "nosuchcluster" in missing.json()["message"], missing.text
    finally:
        wb.stop_server(token, "researcher")
