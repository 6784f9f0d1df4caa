"""A notebook job from JupyterLab's "Create Notebook Job" form, in a real browser, run by the Workbench jobs service.

Real: `workbench up` as root (hub, proxy, quota service, the jobs service with the embedded workbench's local
engine, which runs each job as the user's account), the researcher's JupyterLab with jupyter-scheduler's
front end and the Workbench backend (`workbench.jobs.scheduler`, configured by jupyter-config/), and
Debian's headless Chromium driven by selenium (login through the login form). Nothing is mocked.

The researcher opens a parameterised notebook, clicks the notebook toolbar's "Create a notebook job"
button, picks a profile of their group in the form's "Environment" list (the demo policy plus cpu-small for
physics-lab, so there is a choice), adds the parameter `n = 21`, creates the job and sees it "Completed" in
the form's job list; the executed notebook lands in `~/jobs/<name>/<run>` with the parameter's result.
A screenshot of the job list is saved as a test artefact (``$WORKBENCH_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest
import requests
import yaml

from workbench.sysusers import USER_PREFIX

from ..integration.harness import DEMO, PASSWORD, Workbench, state_dir
from ..integration.jobs_notebook import put_notebook
from ..integration.test_quota_enforcement import wait_for
from .test_lab_notifications_browser import chrome_or_skip

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs run as per-user accounts: needs root"),
]
ARTIFACTS = Path(os.environ.get("WORKBENCH_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")


@pytest.fixture(scope="module")
def browser():
    driver = chrome_or_skip()
    yield driver
    driver.quit()


@pytest.fixture
def page_on_failure(browser, request):
    """Saves the page's HTML as a test artefact when the test fails (what the form showed)."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:  # the call's failure is counted before the teardown
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "notebook-job-failure.html").write_text(browser.page_source)


@pytest.fixture(scope="module")
def wb(browser):  # after the browser: no workbench is started where the test skips
    sd = state_dir("wb-it-jobs-browser-")
    policy = yaml.safe_load(DEMO.read_text())
    policy["groups"]["physics-lab"]["profiles"].append("cpu-small")
    config = sd.parent / "platform.yaml"
    config.write_text(yaml.safe_dump(policy))
    w = Workbench(sd, config=config).start()
    yield w
    w.stop()


def click(browser, el, timeout: float = 30) -> None:
    """Click as a user would, waiting while a closing menu's backdrop or an animation is in the way.

    ``el``: an element, or a function that finds it (again, after React re-rendered it)."""
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        ElementNotInteractableException,
        StaleElementReferenceException,
    )

    deadline = time.monotonic() + timeout
    while True:
        try:
            target = el() if callable(el) else el
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", target)
            target.click()
            return
        except ElementNotInteractableException:
            if time.monotonic() > deadline:
                # MUI leaves the button "not interactable" to WebDriver while a closing list's transition runs on a
                # loaded machine; the page's own click handler is what the test is about: click it from the page
                browser.execute_script("arguments[0].click();", el() if callable(el) else el)
                return
            time.sleep(0.5)
        except (ElementClickInterceptedException, StaleElementReferenceException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def texts(browser, css: str) -> list[tuple]:
    """(element, text) of what ``css`` finds, leaving out elements React replaced while they were read."""
    from selenium.common.exceptions import StaleElementReferenceException

    found = []
    for el in browser.find_elements("css selector", css):
        try:
            found.append((el, el.text.strip(), el.is_enabled()))
        except StaleElementReferenceException:  # re-rendered meanwhile: the next round reads the new one
            continue
    return found


def field(browser, name: str):
    found = browser.find_elements("css selector", f'.jp-create-job-form input[name="{name}"], input[name="{name}"]')
    return found[0] if found else None


def test_a_notebook_job_from_the_jupyterlab_form_completes_with_its_result_in_the_home(wb, browser, page_on_failure):
    from selenium.webdriver.common.keys import Keys

    put_notebook("researcher")
    session = wb.login("researcher")
    token = wb.new_token(session, "researcher")
    wb.start_server(token, "researcher", profile="cpu-large")

    browser.set_page_load_timeout(120)
    browser.get(f"{wb.url}/hub/login")
    browser.find_element("id", "username_input").send_keys("researcher")
    browser.find_element("id", "password_input").send_keys(PASSWORD)
    browser.find_element("id", "login_submit").click()
    browser.get(f"{wb.url}/user/researcher/lab/tree/calc.ipynb")

    # the notebook toolbar's "Create a notebook job" button (jupyter-scheduler's toolbar item "create-job")
    def button():
        return (
            browser.find_elements("css selector", '.jp-NotebookPanel-toolbar [data-jp-item-name="create-job"] button')
            or browser.find_elements("css selector", '.jp-NotebookPanel-toolbar [data-jp-item-name="create-job"]')
        )[0]

    wait_for(
        lambda: browser.find_elements("css selector", '.jp-NotebookPanel-toolbar [data-jp-item-name="create-job"]'),
        180,
        "the notebook toolbar's Create a notebook job button",
    )
    # the notebook must be the current widget: the button reads its path from it
    wait_for(lambda: browser.find_elements("css selector", ".jp-NotebookPanel .jp-Cell"), 60, "the cells")
    click(browser, lambda: browser.find_elements("css selector", ".jp-NotebookPanel .jp-Cell")[-1])

    # JupyterLab restores the researcher's workspace (from earlier modules' sessions), which may put another main
    # area tab in front (a CI run: jupyter-scheduler's "Jobs" panel): bring the notebook's tab forward as a user would
    def notebook_is_current():
        tabs = [t for t, text, _ in texts(browser, "#jp-main-dock-panel .lm-TabBar-tab") if text == "calc.ipynb"]
        if not tabs:
            return False
        if "lm-mod-current" in (tabs[0].get_attribute("class") or ""):
            return True
        try:
            tabs[0].click()  # a real click: Lumino selects a tab by where the pointer went down
        except Exception:  # noqa: BLE001 - re-rendered or covered meanwhile: the next round tries again
            pass
        return False

    wait_for(
        notebook_is_current,
        120,  # JupyterLab on a loaded 2-core machine (a clean CI run saw it past 30 s)
        "calc.ipynb as the current tab",
    )
    click(browser, button)
    name = wait_for(lambda: field(browser, "jobName"), 60, "the Create Job form")
    assert wait_for(lambda: field(browser, "inputFile").get_attribute("value"), 30, "the input file") == "calc.ipynb"
    name.send_keys(Keys.CONTROL, "a")
    name.send_keys("calc-from-lab")

    # Environment: the profiles the researcher may run jobs with (GPU ones need Slurm: not on this engine)
    wait_for(
        lambda: browser.find_elements("css selector", '#jp-create-job-environment[aria-haspopup="listbox"]'),
        60,
        "the Environment list",
    )
    click(browser, lambda: browser.find_element("css selector", "#jp-create-job-environment"))
    options = wait_for(lambda: browser.find_elements("css selector", 'li[role="option"]'), 30, "the profiles")
    offered = {o.get_attribute("data-value") for o in options}
    assert offered == {"cpu-large", "cpu-small"}, offered
    click(browser, next(o for o in options if o.get_attribute("data-value") == "cpu-small"))
    wait_for(lambda: not browser.find_elements("css selector", 'li[role="option"]'), 30, "the list to close")

    # Parameters: n = 21 (the notebook's parameters cell says n = 1)
    wait_for(
        lambda: browser.find_elements("css selector", 'button[title="Add new parameter"]'), 30, "Add new parameter"
    )
    click(browser, lambda: browser.find_elements("css selector", 'button[title="Add new parameter"]')[0], timeout=30)
    wait_for(lambda: field(browser, "parameter-0-name"), 30, "the parameter's fields").send_keys("n")
    field(browser, "parameter-0-value").send_keys("21")

    field(browser, "parameter-0-name").click()  # leave the value field: the form checks a field when it is left
    name.click()

    def enabled_create():
        return [b for b, text, enabled in texts(browser, "button") if text == "Create" and enabled]

    try:
        create = wait_for(enabled_create, 30, "the Create button enabled")[0]
    except AssertionError:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "notebook-job-form.png"))
        errors = [e.text for e in browser.find_elements("css selector", ".Mui-error, .MuiFormHelperText-root")]
        raise AssertionError(f"the form has errors: {errors}") from None
    click(browser, create)

    # the form's job list: our job, until it is Completed (the list refreshes itself; reload it if not)
    def completed_row():
        rows = [(r, text) for r, text, _ in texts(browser, "tr, .MuiTableRow-root") if "calc-from-lab" in text]
        return [r for r, _ in rows] if rows and "Completed" in rows[0][1] else None

    deadline = time.monotonic() + 300
    row = None
    while time.monotonic() < deadline and row is None:
        row = completed_row()
        if row is None:
            reload = [b for b, text, _ in texts(browser, "button") if text == "Reload"]
            if reload:
                try:
                    click(browser, reload[0])
                except Exception:  # noqa: BLE001 - re-rendered meanwhile: the next round finds it again
                    pass
            time.sleep(3)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "notebook-job-list.png"))
    assert row, [text for _, text, _ in texts(browser, "tr")]

    # the service ran it as the researcher with the chosen profile and parameter
    jobs = requests.get(
        f"{wb.url}/services/jobs/api/jobs", headers={"Authorization": f"token {token}"}, timeout=60
    ).json()["jobs"]
    [job] = [j for j in jobs if j["name"] == "calc-from-lab"]
    assert (job["user"], job["profile"], job["parameters"], job["state"]) == (
        "researcher",
        "cpu-small",
        {"n": 21},
        "completed",
    ), job
    run = wb.home("researcher") / job["folder"]
    assert (run / "result.txt").read_text() == "42"
    executed = nbformat.read(run / "calc.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert f"result 42 {USER_PREFIX}researcher" in text, text
