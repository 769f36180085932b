"""Fixtures for the real-Chromium tests: a real server subprocess and headless Chromium pages.

The server is ``tests/server.py``'s real ``openconsult serve`` subprocess (free loopback
port, own data dir and config, ready at ``GET /healthz``). The browser fixtures need Debian's ``chromium`` and ``chromium-driver``; without them
the tests are skipped, or fail when ``CI=true`` so a broken CI image cannot pass silently.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.server import ServerProcess as ServerHandle
from tests.server import start_server

CHROMIUM = os.environ.get("OPENCONSULT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("OPENCONSULT_CHROMEDRIVER", "/usr/bin/chromedriver")

# The exact switches the browser tests run Chromium with (plus a fresh --user-data-dir).
CHROMIUM_ARGUMENTS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
)

def require_chromium() -> None:
    """Skip when Chromium or chromedriver is missing; fail instead when CI=true."""
    missing = [
        path
        for path in (CHROMIUM, CHROMEDRIVER)
        if not (os.path.isfile(path) and os.access(path, os.X_OK))
    ]
    if not missing:
        return
    message = (
        f"browser tests need {' and '.join(missing)} "
        "(Debian packages 'chromium' and 'chromium-driver', or set OPENCONSULT_CHROMIUM / OPENCONSULT_CHROMEDRIVER)"
    )
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[None]:
    # Keep each phase's report on the item so fixtures can print diagnostics on failure.
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "rep_call", None)
    return bool(report is not None and report.failed)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """One real server per test module (tests use distinct random rooms)."""
    require_chromium()  # no point starting a server for tests that will skip
    handle = start_server(tmp_path_factory.mktemp("server"))
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def server_log_on_failure(
    request: pytest.FixtureRequest, server: ServerHandle
) -> Iterator[ServerHandle]:
    yield server
    if _failed(request):
        print(
            f"\n----- server log tail ({server.log_path}) -----\n{server.log_tail(120)}"
        )


BrowserFactory = Callable[[], Any]


@pytest.fixture
def browser(
    request: pytest.FixtureRequest, server_log_on_failure: ServerHandle
) -> Iterator[BrowserFactory]:
    """A factory of headless Chromium WebDriver sessions, each with a fresh profile; all quit at teardown."""
    require_chromium()
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    drivers: list[tuple[Any, str]] = []

    def new_browser() -> Any:
        profile = tempfile.mkdtemp(prefix="openconsult-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in CHROMIUM_ARGUMENTS:
            options.add_argument(argument)
        options.add_argument(f"--user-data-dir={profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        try:
            driver = webdriver.Chrome(
                service=Service(executable_path=CHROMEDRIVER), options=options
            )
        except Exception:
            shutil.rmtree(profile, ignore_errors=True)
            raise
        drivers.append((driver, profile))
        driver.set_window_size(1280, 900)
        driver.set_script_timeout(30)
        return driver

    yield new_browser

    for index, (driver, profile) in enumerate(drivers):
        if _failed(request):
            try:
                entries = driver.get_log("browser")
                console = "\n".join(f"{e['level']} {e['message']}" for e in entries)
                print(
                    f"\n----- browser {index} console ({driver.current_url}) -----\n{console}"
                )
            except WebDriverException as exc:
                # Diagnostics must not hide the real failure.
                print(f"\n(could not read browser {index} console: {exc})")
        try:
            driver.quit()
        finally:
            shutil.rmtree(profile, ignore_errors=True)
