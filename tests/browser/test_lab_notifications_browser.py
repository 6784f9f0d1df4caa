"""The notification toasts in a real browser: log in through the login form, open JupyterLab, see the budgets.

A real embedded workbench (hub, proxy, quota and sessions services, the user's JupyterLab server with
the `workbench.lab` server extension and the prebuilt `workbench-notifications` JupyterLab extension)
and a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven by selenium; nothing is
downloaded). The group's earlier usage is written to the quota ledger as the gateway would send it.
Skips, saying why, where there is no browser to drive.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from ..integration.harness import PASSWORD
from ..integration.test_quota_enforcement import Users, wait_for

pytestmark = pytest.mark.integration
USER, GROUP = "toasted", "lab-toasted"


def chrome_or_skip():
    """A headless Chromium through its driver, or a skip that says what is missing."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        pytest.skip(f"selenium is not installed ({e}); `make test` installs it (the [test] extra)")
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver") if os.path.exists(p)), None
    )
    if not binary or not driver:
        pytest.skip(
            "no chromium and chromedriver here: `make test` installs Debian's chromium and chromium-driver "
            "(scripts/system-deps.sh --browser)"
        )
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--no-first-run",
    ):
        opts.add_argument(arg)
    try:  # both paths given: selenium fetches no browser or driver
        return webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    except WebDriverException as e:
        pytest.skip(f"chromium ({binary}) does not start here: {e.msg}")


@pytest.fixture(scope="module")
def browser():
    driver = chrome_or_skip()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def wb(browser, request):
    """The shared workbench (demo policy, pretend GPUs) with a budget group for USER (tests/conftest.py), asked for after the browser so
    that none is started where the test skips."""
    return request.getfixturevalue("demo_gpus_wb")


def toasts(driver) -> list[tuple[str, str]]:
    """(classes, text) of the toasts JupyterLab shows now."""
    from selenium.common.exceptions import StaleElementReferenceException

    out = []
    for el in driver.find_elements("css selector", ".Toastify__toast"):
        try:
            out.append((el.get_attribute("class") or "", el.text))
        except StaleElementReferenceException:  # a toast that closed while being read
            pass
    return out


def test_the_user_sees_budget_toasts_in_jupyterlab(wb, browser):
    users = Users(wb)
    users.spend(GROUP, USER, cpu=510)  # 8.5 of 10 CPU-hours: a warning
    users.spend(GROUP, USER, gpu_count=120, gpu_type="h100")  # 2 of 1 GPU-hours: spent, critical
    token = users.token(USER)
    wb.start_server(token, USER, profile="cpu-small")
    try:
        browser.set_page_load_timeout(120)
        browser.get(f"{wb.url}/hub/login")
        browser.find_element("id", "username_input").send_keys(USER)
        browser.find_element("id", "password_input").send_keys(PASSWORD)
        browser.find_element("id", "login_submit").click()
        browser.get(f"{wb.url}/user/{USER}/lab")
        deadline, seen = time.monotonic() + 150, {}
        while time.monotonic() < deadline:
            for classes, text in toasts(browser):
                if "CPU budget" in text:
                    seen["cpu"] = (classes, text)
                if "GPU budget" in text:
                    seen["gpu"] = (classes, text)
            if len(seen) == 2:
                break
            time.sleep(0.3)
        assert browser.current_url.startswith(f"{wb.url}/user/{USER}/lab"), browser.current_url
        assert set(seen) == {"cpu", "gpu"}, (seen, toasts(browser), browser.title)
        assert "Toastify__toast--warning" in seen["cpu"][0] and "85%" in seen["cpu"][1], seen
        assert "Toastify__toast--error" in seen["gpu"][0] and "exhausted" in seen["gpu"][1], seen
        # shown once: a reload finds the error (autoClose false) only in what it remembers, not a new toast
        remembered = browser.execute_script(
            "return Object.keys(localStorage).filter(k => k.startsWith('workbench-notifications:seen:'))"
        )
        assert remembered, "the ids shown are not remembered"
        # a marker among the remembered ids: the extension's first poll after the reload drops it (it keeps only
        # ids its answer still reports), so its disappearance says that poll has run and shown what it would show
        [key] = remembered
        browser.execute_script(
            "const k = arguments[0]; const ids = JSON.parse(localStorage.getItem(k));"
            "ids.push('test-marker:gone-after-the-next-poll'); localStorage.setItem(k, JSON.stringify(ids));",
            key,
        )
        browser.refresh()
        wait_for(lambda: browser.find_elements("css selector", ".jp-LabShell"), 120, "JupyterLab after the reload")
        wait_for(
            lambda: (
                "test-marker:" not in (browser.execute_script("return localStorage.getItem(arguments[0])", key) or "")
            ),
            150,
            "the extension's first poll after the reload",
        )
        # the toasts of that poll are rendered by React: let two frames pass before looking
        browser.execute_async_script(
            "const done = arguments[0]; requestAnimationFrame(() => requestAnimationFrame(() => done(true)));"
        )
        assert not [t for _, t in toasts(browser) if "budget" in t], toasts(browser)
    finally:
        wb.stop_server(token, USER)
