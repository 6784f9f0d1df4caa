"""The Workbench cockpit (JupyterLab side panel) in a real browser, against one real embedded workbench.

Real: the hub and its proxy, the quota and sessions services, dask-gateway-server (local backend) behind
the dashboard guard, the researcher's and a student's JupyterLab servers with the `workbench.lab` server
extension and the prebuilt JupyterLab extension, and Debian's Chromium driven by selenium (login through
the login form). Pretend, named as such: the GPU (`workbench up --fake-gpus h100:1`) and its figures,
read from a JSON file (`WORKBENCH_GPU_UTILISATION_FILE`, the file-driven reader of
`workbench.gpu_utilisation`); the group's earlier usage is written to the quota ledger with the
gateway's service token, as the gateway would send it.

Checks: the panel shows the researcher's budgets with the numbers the quota API returns, the GPU budget
past `warn_at` in the critical state, the GPU's figures, the session limit; a Dask cluster created from
the panel's form appears, scales to 2 workers and stops; the student's cockpit (same endpoint, the
student's token) lists only the student's own clusters and cannot stop the researcher's. A screenshot of
the panel is saved as a test artefact (``$WORKBENCH_TEST_ARTIFACTS``, default ``tests/browser/artifacts``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import pytest
import requests
import yaml

from ..integration.harness import DEMO, PASSWORD, Workbench
from ..integration.test_embedded import state_dir
from ..integration.test_quota_enforcement import Users, wait_for
from .test_lab_notifications_browser import chrome_or_skip

pytestmark = pytest.mark.integration
GROUP = "physics-lab"
ARTIFACTS = Path(os.environ.get("WORKBENCH_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
GPU_FIGURES = {"utilisation": 37, "memory_used": 12 * 2**30, "memory_total": 80 * 2**30}


def cockpit_policy(gpu_file: Path) -> dict:
    """The demo policy with a small physics-lab budget (per-user share too) and a session limit."""
    data = yaml.safe_load(DEMO.read_text())
    data["branding"] = {"name": "Example Computing Centre"}
    lab = data["groups"][GROUP]
    lab["budget"] = {"gpu_hours": 10, "cpu_hours": 20, "period": "month", "per_user": {"cpu_hours": 15}}
    lab["session"] = {"max_age": "8h"}
    data["profiles"]["h100-x1"].setdefault("env", {})["WORKBENCH_GPU_UTILISATION_FILE"] = str(gpu_file)
    return data


@pytest.fixture(scope="module")
def browser():
    driver = chrome_or_skip()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def wb(browser):  # after the browser: no workbench is started where the test skips
    sd = state_dir()
    figures = Path(tempfile.mkdtemp(prefix="wb-gpus-", dir="/tmp"))
    figures.chmod(0o755)
    gpu_file = figures / "gpus.json"
    config = sd.parent / "platform.yaml"
    config.write_text(yaml.safe_dump(cockpit_policy(gpu_file)))
    w = Workbench(sd, config=config, extra_args=("--fake-gpus", "h100:1")).start()
    gpu_file.write_text(json.dumps({d: GPU_FIGURES for d in w.runtime["gpus"]["h100"]}))
    gpu_file.chmod(0o644)
    yield w
    assert w.stop() == 0, w.output()
    assert not w.leftovers(), w.leftovers()


def cockpit(wb: Workbench, users: Users, user: str) -> requests.Response:
    return requests.get(
        f"{wb.url}/user/{user}/workbench/cockpit", headers={"Authorization": f"token {users.token(user)}"}, timeout=60
    )


def budget_box(browser, resource: str, scope: str):
    found = browser.find_elements(
        "css selector", f'.wb-budget[data-group="{GROUP}"][data-resource="{resource}"][data-scope="{scope}"]'
    )
    return found[0] if found else None


def widen_the_side_bar(browser, pixels: int) -> None:
    """Drag the handle between the left side bar and the main area, as a user would (for the screenshot)."""
    from selenium.common.exceptions import MoveTargetOutOfBoundsException
    from selenium.webdriver.common.action_chains import ActionChains

    handles = browser.find_elements("css selector", "#jp-main-split-panel > .lm-SplitPanel-handle")
    if not handles:
        return
    # as far as the window allows (Chromium refuses a drag whose end is outside the viewport)
    room = browser.execute_script("return window.innerWidth") - handles[0].location["x"] - 20
    try:
        ActionChains(browser).drag_and_drop_by_offset(handles[0], max(0, min(pixels, room)), 0).perform()
    except MoveTargetOutOfBoundsException:  # only the screenshot is narrower
        pass


def used_of(text: str) -> tuple[float, float]:
    m = re.search(r"([0-9.]+) / ([0-9.]+) h", text)
    assert m, text
    return float(m.group(1)), float(m.group(2))


def test_the_cockpit_shows_budgets_gpus_and_runs_dask_clusters(wb, browser):
    users = Users(wb)
    users.spend(GROUP, "researcher", cpu=600)  # 10 CPU-hours: half the group's 20, 2/3 of the researcher's 15
    users.spend(GROUP, "researcher", gpu_count=576, gpu_type="h100")  # 9.6 of 10 GPU-hours: past 0.95, critical
    researcher = users.token("researcher")
    wb.start_server(researcher, "researcher", profile="h100-x1")
    student = users.token("student1")
    try:
        browser.set_page_load_timeout(120)
        browser.get(f"{wb.url}/hub/login")
        browser.find_element("id", "username_input").send_keys("researcher")
        browser.find_element("id", "password_input").send_keys(PASSWORD)
        browser.find_element("id", "login_submit").click()
        browser.get(f"{wb.url}/user/researcher/lab")
        tab = wait_for(
            lambda: browser.find_elements("css selector", '.lm-TabBar-tab[data-id="workbench-cockpit"]'),
            150,
            "the Workbench tab in the left side bar",
        )
        tab[0].click()
        gpu_box = wait_for(lambda: budget_box(browser, "gpu", "group"), 60, "the GPU budget in the panel")

        # the numbers the quota API returns (the running server adds a little every second: compare closely)
        usage = users.usage("researcher", "/usage/users/researcher")
        api = {(b["resource"], b["scope"]): b for b in usage["budgets"] if b["group"] == GROUP}
        assert set(api) == {("gpu", "group"), ("cpu", "group"), ("cpu", "user")}, usage["budgets"]
        for (resource, scope), b in api.items():
            box = budget_box(browser, resource, scope)
            assert box is not None, (resource, scope)
            used, limit = used_of(box.find_element("css selector", ".wb-budget-text").text)
            assert limit == b["limit_hours"], (box.text, b)
            assert abs(used - b["used_hours"]) < 0.2, (box.text, b)
            assert b["resets_at"][:10] in box.text, (box.text, b)
        assert gpu_box.get_attribute("data-level") == "critical", gpu_box.get_attribute("outerHTML")
        assert "wb-level-critical" in gpu_box.get_attribute("class")
        assert budget_box(browser, "cpu", "group").get_attribute("data-level") == "ok"

        # the quota service's notice of the same budget (and the sessions service's, when due) above it
        notices = browser.find_elements("css selector", '.wb-notice[data-level="critical"]')
        assert any("GPU budget of group physics-lab" in n.text for n in notices), [n.text for n in notices]

        # the server's facts and its (pretend) GPU
        panel = browser.find_element("id", "workbench-cockpit")
        assert "One H100 (h100-x1)" in panel.text and "embedded" in panel.text, panel.text
        assert "ends in 7h" in panel.text, panel.text  # the 8h session limit of the group
        device = wait_for(lambda: browser.find_elements("css selector", ".wb-gpu"), 30, "the GPU line")[0]
        assert "utilisation 37%" in device.text and "12.0 GiB / 80.0 GiB" in device.text, device.text

        # jupyter-resource-usage reports the profile's real limits (MEM_LIMIT, CPU_LIMIT from the spawner)
        metrics = requests.get(
            f"{wb.url}/user/researcher/api/metrics/v1", headers={"Authorization": f"token {researcher}"}, timeout=60
        )
        assert metrics.status_code == 200, metrics.text
        assert metrics.json()["limits"]["memory"]["rss"] == 64 * 10**9, metrics.json()
        assert metrics.json()["limits"].get("cpu", {}).get("cpu") == 8, metrics.json()

        # the spawn page of another user entitled to the H100 the researcher holds: disabled, with the reason
        page = wb.login("startup").get(f"{wb.url}/hub/spawn", timeout=60)
        assert page.status_code == 200, page.text
        assert "Example Computing Centre" in page.text
        h100 = re.search(r'<label class="wb-profile[^"]*" data-profile="h100-x1".*?</label>', page.text, re.S)
        assert h100 and " disabled>" in h100.group(0), page.text
        assert "no free GPU of type NVIDIA H100 80GB now (0 free, 1 needed)" in h100.group(0), h100.group(0)
        assert "1 GPU-hours per hour (100 left in startup-acme" in h100.group(0), h100.group(0)
        assert "Session limit: 8h" in h100.group(0), h100.group(0)
        small = re.search(r'data-profile="cpu-small".*?</label>', page.text, re.S)
        assert small and " disabled" not in small.group(0) and "checked" in small.group(0), small

        # a cluster from the form: the limits of the group are shown beside the fields
        form = panel.find_element("css selector", ".wb-new-cluster")
        assert "limit 1–1" in form.text, form.text  # worker_max_cores: 1
        form.find_element("css selector", ".wb-create").click()
        row = wait_for(lambda: browser.find_elements("css selector", ".wb-cluster"), 120, "the new cluster")[0]
        name = row.get_attribute("data-name")
        [ours] = users.gateway("researcher", "GET", "/clusters/").json()
        assert ours == name
        # dask-labextension's own panel lists the same cluster, from the gateway (dask-labextension-gateway)
        dask_panel = requests.get(
            f"{wb.url}/user/researcher/dask/clusters", headers={"Authorization": f"token {researcher}"}, timeout=60
        )
        assert dask_panel.status_code == 200, dask_panel.text
        assert any(name in c["name"] for c in dask_panel.json()), dask_panel.json()

        # the student: only their own clusters, and no way to stop the researcher's
        wb.start_server(student, "student1", profile="cpu-small")
        mine = users.gateway("student1", "POST", "/clusters/", json={"cluster_options": {}})
        assert mine.status_code == 201, mine.text
        theirs = cockpit(wb, users, "student1")
        assert theirs.status_code == 200, theirs.text
        listed = [c["name"] for c in theirs.json()["dask"]["clusters"]]
        assert listed == [mine.json()["name"]], theirs.json()["dask"]
        stop = requests.delete(
            f"{wb.url}/user/student1/workbench/cockpit/clusters/{name}",
            headers={"Authorization": f"token {student}"},
            timeout=60,
        )
        assert stop.status_code == 403 and "lacks permissions to stop cluster" in stop.text, stop.text
        assert users.gateway("researcher", "GET", f"/clusters/{name}").json()["status"] in ("PENDING", "RUNNING")
        other = requests.get(
            f"{wb.url}/user/researcher/workbench/cockpit",
            headers={"Authorization": f"token {student}"},
            allow_redirects=False,
            timeout=60,
        )
        # the researcher's server knows the student's token but it lacks access:servers!server=researcher/: the
        # cockpit (a jupyter_server APIHandler) refuses an unauthenticated API request with 403
        assert other.status_code == 403, other.status_code

        # scale to 2 from the panel, then stop
        def row_of():
            found = browser.find_elements("css selector", f'.wb-cluster[data-name="{name}"]')
            return found[0] if found else None

        wait_for(lambda: (row_of() or {}) and row_of().get_attribute("data-workers") == "0", 120, "a running cluster")
        count = row_of().find_element("css selector", ".wb-scale-count")
        count.clear()
        count.send_keys("2")
        row_of().find_element("css selector", ".wb-scale").click()
        wait_for(lambda: (row_of() or {}) and row_of().get_attribute("data-workers") == "2", 180, "2 workers")
        assert "2 workers" in row_of().text and "2 cores" in row_of().text, row_of().text
        # the dashboard link goes through the guard: the owner's token passes, the student's does not
        link = row_of().find_element("css selector", ".wb-dashboard").get_attribute("href")
        assert link == f"{wb.url}/services/dask-gateway/clusters/{name}/status", link
        own = requests.get(link, headers={"Authorization": f"token {researcher}"}, timeout=60)
        assert own.status_code == 200, own.status_code
        peek = requests.get(link, headers={"Authorization": f"token {student}"}, allow_redirects=False, timeout=60)
        # the student may use the gateway (they have a cluster of their own above); the gateway answers 403 for
        # the researcher's cluster, and the guard passes that on as 403 (workbench.gateway.dashguard)
        assert peek.status_code == 403, peek.status_code
        assert "belongs to another user's cluster" in peek.text, peek.text
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        widen_the_side_bar(browser, 200)
        panel.screenshot(str(ARTIFACTS / "cockpit-panel.png"))
        browser.save_screenshot(str(ARTIFACTS / "cockpit-lab.png"))
        row_of().find_element("css selector", ".wb-stop").click()
        wait_for(lambda: row_of() is None, 120, "the stopped cluster to leave the panel")
        assert users.gateway("researcher", "GET", "/clusters/").json() == {}
    except AssertionError as e:  # what the panel said, for the report
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "cockpit-failure.png"))
        panels = browser.find_elements("id", "workbench-cockpit")
        raise AssertionError(f"{e}\n--- the panel said:\n{panels[0].text if panels else '(no panel)'}") from e
    finally:
        for user, token in (("student1", student), ("researcher", researcher)):
            if (users.server(user) or {}).get("ready") or users.server(user):
                wb.stop_server(token, user)
