"""Fixtures for the real-browser tests: a real server subprocess, headless Chromium pages and
headless Firefox ESR pages.

The server is ``tests/server.py``'s real ``openconsult serve`` subprocess (free loopback
port, own data dir and config, ready at ``GET /healthz``). The browser fixtures need Debian's ``chromium`` and ``chromium-driver``; without them
the tests are skipped, or fail when ``CI=true`` so a broken CI image cannot pass silently.

Firefox (Debian ``firefox-esr``; geckodriver is not packaged) is driven over its own
Marionette protocol with ``marionette_driver``: headless, a fresh profile in a temp dir, a
free Marionette port, fake camera and microphone without a prompt. Scripts that read page
globals (``window.demo``) must pass ``sandbox=None``.
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

FIREFOX = os.environ.get("OPENCONSULT_FIREFOX", "/usr/bin/firefox-esr")

# The prefs the browser tests run Firefox with: fake devices, no permission prompt, page
# console on stdout (the gecko log a failing test prints), plain host candidates (no mDNS names).
FIREFOX_PREFS: dict[str, Any] = {
    "media.navigator.streams.fake": True,
    "media.navigator.permission.disabled": True,
    "media.peerconnection.ice.obfuscate_host_addresses": False,
    "devtools.console.stdout.content": True,
}


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


def require_firefox() -> None:
    """Skip when Firefox ESR or marionette_driver is missing; fail instead when CI=true."""
    problem = None
    if not (os.path.isfile(FIREFOX) and os.access(FIREFOX, os.X_OK)):
        problem = f"Firefox tests need {FIREFOX} (Debian package 'firefox-esr', or set OPENCONSULT_FIREFOX)"
    else:
        try:
            import marionette_driver  # noqa: F401
        except ImportError:
            problem = "Firefox tests need marionette_driver (the test extra: pip install -e '.[test]')"
    if problem is None:
        return
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(problem, pytrace=False)
    pytest.skip(problem)


FirefoxFactory = Callable[..., Any]


@pytest.fixture
def firefox(
    request: pytest.FixtureRequest, server_log_on_failure: ServerHandle
) -> Iterator[FirefoxFactory]:
    """A factory of headless Firefox ESR Marionette sessions, each with its own profile and port.
    ``firefox(loopback=True)``: the server in these tests offers only 127.0.0.1 candidates,
    which Firefox refuses to pair with unless ``media.peerconnection.ice.loopback`` is set;
    ``loopback=False`` is Firefox as shipped. All quit at teardown."""
    require_firefox()
    from marionette_driver.marionette import Marionette

    from tests.helpers import free_port

    clients: list[tuple[Any, str, str]] = []

    def new_firefox(loopback: bool = True) -> Any:
        workspace = tempfile.mkdtemp(prefix="openconsult-firefox-")
        log = os.path.join(workspace, "gecko.log")
        prefs = {**FIREFOX_PREFS, "media.peerconnection.ice.loopback": loopback}
        try:
            client = Marionette(bin=FIREFOX, port=free_port(), headless=True, prefs=prefs,
                                workspace=workspace, gecko_log=log, startup_timeout=120)
            clients.append((client, workspace, log))
            client.start_session()
        except Exception:
            if not clients or clients[-1][1] != workspace:
                shutil.rmtree(workspace, ignore_errors=True)
            raise
        client.timeout.script = 30
        client.timeout.page_load = 60
        return client

    yield new_firefox

    for index, (client, workspace, log) in enumerate(clients):
        if _failed(request):
            try:
                with open(log, errors="replace") as handle:
                    tail = handle.read()[-6000:]
                print(f"\n----- firefox {index} gecko log tail -----\n{tail}")
            except OSError as exc:
                print(f"\n(could not read firefox {index} log: {exc})")
        try:
            client.cleanup()  # ends the session, quits Firefox, removes its profile
        except Exception as exc:  # noqa: BLE001 - teardown must not hide the test's outcome
            print(f"\n(firefox {index} did not quit cleanly: {exc})")
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
