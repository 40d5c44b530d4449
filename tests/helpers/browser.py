"""The dashboard in a real headless browser: Debian's chromium driven by Playwright for Python.

    from helpers.browser import Browser, start_web

    def test_something(cluster: Cluster, browser: Browser) -> None:   # fixtures in tests/conftest.py
        worker = cluster.worker(JOBS, embedded_beat="celery_dbsched.Scheduler")
        web = start_web(cluster, JOBS, token=TOKEN)                   # `celery -A e2e_app dbsched web`
        page = browser.open(web.url + "/")
        ...

Playwright cannot download its own browsers here: it launches `/usr/bin/chromium` (DBSCHED_TEST_CHROMIUM to
use another), headless. Without playwright or chromium the browser tests are skipped with the reason printed;
with DBSCHED_REQUIRE_SERVICES=1 (CI) they fail instead (helpers/services.py `unavailable`).

A `Browser` collects what a person would see go wrong: console errors, uncaught page errors and dialogs
(`alert()` from an injected script); the `browser` fixture fails the test on any of them. Its network is cut to
the app's origin (and the origins a test allows): every other request is aborted and listed, which proves the
page needs no CDN.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from helpers.polling import wait_for
from helpers.processes import REPO_DIR, CeleryProcess
from helpers.proxy import closed_port
from helpers.services import unavailable

if TYPE_CHECKING:
    from playwright.sync_api import Browser as PlaywrightBrowser
    from playwright.sync_api import BrowserContext, ConsoleMessage, Dialog, Page, Playwright, Route

    from helpers.cluster import Cluster

CHROMIUM = os.environ.get("DBSCHED_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS_DIR = REPO_DIR / "docs" / "screenshots"
# The page's viewport, and so the screenshots' size.
VIEWPORT = {"width": 1280, "height": 800}


def browser_missing() -> str | None:
    """None when the browser tests can run, else why not (and how to fix it)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (python -m pip install -e '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return (
            f"no chromium at {CHROMIUM} (apt-get install chromium chromium-driver, or set DBSCHED_TEST_CHROMIUM "
            "to a Chromium binary)"
        )
    return None


def require_browser() -> None:
    reason = browser_missing()
    if reason is not None:
        unavailable(f"{reason}; the browser tests need it")


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


# -- the web server ---------------------------------------------------------------------------------------------


@dataclass
class WebServer:
    """`celery -A e2e_app dbsched web` as a subprocess, answering at `url`."""

    process: CeleryProcess
    url: str  # http://127.0.0.1:<port>, no trailing slash
    token: str | None

    def request(
        self, path: str, *, method: str = "GET", data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, str]:
        """An HTTP request outside the browser: (status, body); 4xx and 5xx are returned, not raised."""
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, if only to refuse
    except OSError:
        return False


def start_web(
    cluster: Cluster,
    jobs: Sequence[dict[str, Any]] = (),
    *,
    token: str | None = None,
    settings: dict[str, Any] | None = None,
    name: str = "web",
    timeout: float = 90.0,
) -> WebServer:
    """Start the dashboard on the cluster's database on a free loopback port (the jobs' code imported as the
    workers import it) and wait until it answers; `token` is the actions' token (DBSCHED_WEB_TOKEN), None for a
    read-only page."""
    port = closed_port()  # free now; the server binds it a moment later
    env = cluster.env(name, jobs, settings)
    env["DBSCHED_WEB_TOKEN"] = token or ""
    process = cluster.processes.start_celery(
        ["-A", "e2e_app", "dbsched", "web", "--host", "127.0.0.1", "--port", str(port)], env, name
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not process.alive():
            raise AssertionError(f"{process.describe()} before answering:\n{process.log_tail()}")
        return _answers(url + "/")

    wait_for(up, timeout, interval=0.2, message=lambda: f"the dashboard to answer at {url}")
    return WebServer(process, url, token)


@contextlib.contextmanager
def other_site(pages: dict[str, str]) -> Iterator[str]:
    """Serve `pages` (path -> HTML) from another loopback port: a second origin, as a forging site is. Yields
    its URL (no trailing slash)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.end_headers()
            self.wfile.write((body or "not found").encode())

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="other-site", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# -- the browser ------------------------------------------------------------------------------------------------


@dataclass
class Browser:
    """One headless Chromium with what went wrong on its pages; network cut to `allowed` origins."""

    playwright: Playwright
    browser: PlaywrightBrowser
    allowed: set[str] = field(default_factory=set)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    expected_errors: list[str] = field(default_factory=list)
    contexts: list[BrowserContext] = field(default_factory=list)

    def allow(self, url: str) -> None:
        """Let pages reach `url`'s origin (the app's, or the forged second site of a CSRF test)."""
        self.allowed.add(origin(url))

    def expect_console_error(self, text: str) -> None:
        """A console error containing `text` is what the test provokes (a refused request), not a failure."""
        self.expected_errors.append(text)

    def new_page(self) -> Page:
        context = self.browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
        self.contexts.append(context)
        context.route("**/*", self._route)
        page = context.new_page()
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.page_errors.append(f"{page.url}: {error}"))
        page.on("dialog", self._dialog)
        return page

    def open(self, url: str) -> Page:
        """A new page at `url`, its origin allowed, loaded."""
        self.allow(url)
        page = self.new_page()
        page.goto(url)
        return page

    def _route(self, route: Route) -> None:
        url = route.request.url
        if origin(url) in self.allowed or url.startswith(("data:", "blob:", "about:")):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def _console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        text = f"{message.text} ({message.location.get('url', '')})"
        if not any(expected in text for expected in self.expected_errors):
            self.console_errors.append(text)

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def problems(self) -> list[str]:
        """What a person would have seen go wrong, one line each."""
        return (
            [f"console error: {text}" for text in self.console_errors]
            + [f"uncaught page error: {text}" for text in self.page_errors]
            + [f"dialog opened (a script ran): {text}" for text in self.dialogs]
            + [f"request outside the app (a CDN?) aborted: {url}" for url in self.blocked]
        )

    def check(self) -> None:
        problems = self.problems()
        assert not problems, "the page went wrong:\n" + "\n".join(problems)

    def close(self) -> None:
        for context in self.contexts:
            with contextlib.suppress(Exception):
                context.close()
        self.browser.close()


@contextlib.contextmanager
def launched() -> Iterator[Browser]:
    """A headless Chromium (skipped, or failed in CI, when there is none)."""
    require_browser()
    from playwright.sync_api import sync_playwright

    # As root (CI, containers) Chromium refuses to start without --no-sandbox.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        browser = Browser(playwright, chromium)
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page: Page, name: str) -> Path:
    """Save the whole page as docs/screenshots/<name>.png (linked from the README) and return the path."""
    SCREENSHOTS_DIR.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS_DIR / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
