"""Fixtures for the real-Chromium tests: a real server subprocess and headless Chromium pages.

``start_server()`` is written to be copied or imported by other test folders: it starts
``python -m signalling.cli serve`` on a free loopback port with its own data dir and config
file, waits for ``GET /healthz`` and returns a handle whose ``stop()`` sends SIGTERM, then
kills. The browser fixtures need Debian's ``chromium`` and ``chromium-driver``; without them
the tests are skipped, or fail when ``CI=true`` so a broken CI image cannot pass silently.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from tests.helpers import free_port, wait_until_sync

REPO_ROOT = Path(__file__).resolve().parents[2]
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

SERVER_START_TIMEOUT = 60.0

BASE_CONFIG = """\
[media]
ice_addresses = ["127.0.0.1"]
"""


@dataclass
class ServerHandle:
    """A running ``signalling.cli serve`` subprocess."""

    url: str
    port: int
    proc: subprocess.Popen[bytes]
    data_dir: Path
    config_path: Path
    log_path: Path
    _log_file: IO[bytes] = field(repr=False)

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "/ws"

    def log_text(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        self._log_file.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL. Idempotent; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        if not self._log_file.closed:
            self._log_file.close()
        return self.proc.returncode


def _healthy(handle: ServerHandle) -> bool:
    if handle.proc.poll() is not None:
        raise AssertionError(
            f"server exited with code {handle.proc.returncode} before /healthz answered; log:\n{handle.log_tail()}"
        )
    try:
        with urllib.request.urlopen(handle.url + "/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def start_server(
    tmp_path: Path, extra_config: str = "", timeout: float = SERVER_START_TIMEOUT
) -> ServerHandle:
    """Start a real server on a free loopback port and wait until ``GET /healthz`` is 200.

    ``extra_config`` is appended to the TOML config file after the base ``[media]`` table
    (which sets ``ice_addresses = ["127.0.0.1"]``), so it must not repeat ``[media]``.
    The caller must call ``stop()``; server output goes to ``<tmp_path>/server.log``.
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    config_path = tmp_path / "openconsult.toml"
    config_path.write_text(BASE_CONFIG + ("\n" + extra_config if extra_config else ""))
    log_path = tmp_path / "server.log"
    log_file = log_path.open("wb")
    port = free_port()
    command = [
        sys.executable, "-m", "signalling.cli", "serve",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--data-dir", str(data_dir),
        "--config", str(config_path),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
    )
    handle = ServerHandle(
        url=f"http://127.0.0.1:{port}",
        port=port,
        proc=proc,
        data_dir=data_dir,
        config_path=config_path,
        log_path=log_path,
        _log_file=log_file,
    )
    try:
        wait_until_sync(
            lambda: _healthy(handle),
            timeout=timeout,
            interval=0.2,
            message=f"{handle.url}/healthz",
        )
    except BaseException:
        handle.stop()
        raise
    return handle


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
