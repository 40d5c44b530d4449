"""The dashboard as a person uses it: a real headless Chromium (Debian's, driven by Playwright) against a real
worker with an embedded beat on PostgreSQL and `celery -A e2e_app dbsched web` (helpers/browser.py)."""

from __future__ import annotations

import pytest
from helpers.browser import Browser, other_site

pytestmark = pytest.mark.browser


def test_the_browser_reports_console_errors_and_requests_outside_the_app(browser: Browser) -> None:
    page_html = (
        "<!doctype html><title>t</title><script>console.error('broken widget')</script>"
        '<script src="https://cdn.example.com/lib.js"></script><p id="done">loaded</p>'
    )
    with other_site({"/": page_html}) as url:
        page = browser.open(url + "/")
        assert page.inner_text("#done") == "loaded"

    problems = browser.problems()
    assert any("console error: broken widget" in line for line in problems), problems
    assert "request outside the app (a CDN?) aborted: https://cdn.example.com/lib.js" in problems, problems
    browser.console_errors.clear()
    browser.blocked.clear()
