"""The dashboard as a person uses it: a real headless Chromium (Debian's, driven by Playwright) against a real
worker with an embedded beat on PostgreSQL and `celery -A e2e_app dbsched web` (helpers/browser.py).

Every test fails on a console error, an uncaught page error, a dialog (a script that should not have run) or a
request that leaves the app (a CDN): the `browser` fixture checks them at the end. The screenshots in
docs/screenshots/ are taken by these tests (the README links them).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from helpers.browser import Browser, WebServer, other_site, screenshot, start_web
from helpers.cluster import PG_FS, Cluster, on
from helpers.polling import wait_for

pytestmark = [pytest.mark.browser, pytest.mark.processes, pytest.mark.slow]

TOKEN = "browser-test-token-0123456789"
EMBEDDED_BEAT = "celery_dbsched.Scheduler"
HOUR = 3600

# Jobs (tests/e2e_app.py kinds). `long` reports a step every 0.2 s for 60 s: a bar that moves.
LONG = {"kind": "long", "name": "web.long", "seconds": 60, "step": 0.2, "every": HOUR}
# Due in an hour: it runs only when triggered.
ON_DEMAND = {"kind": "quick", "name": "web.on_demand", "every": HOUR, "next_run_in": HOUR}
# Due every second: the one the test pauses, and the witness that the beat keeps claiming.
PAUSABLE = {"kind": "instant", "name": "web.pausable", "every": 1}
WITNESS = {"kind": "instant", "name": "web.witness", "every": 1}
# Markup in a job name and in an error: the page must show it as text.
XSS_NAME = "web.<img src=x onerror=alert('name')>"
XSS_ERROR = "<script>alert('error')</script><b onmouseover=alert('hover')>bold</b> in run {run_id}"
HOSTILE = {"kind": "fail", "name": XSS_NAME, "every": HOUR, "message": XSS_ERROR}


# -- the page, as E's templates name its parts (celery_dbsched/web/templates: ids and classes at their top) ----


def job_path(name: str) -> str:
    from urllib.parse import quote

    return "/jobs/" + quote(name, safe="")


def log_in(page: Any, web: WebServer) -> None:
    """Give the page the token, as a person does when it asks for it."""
    page.goto(web.url + "/login")
    page.fill("input[name=token]", web.token or "")
    page.click("button[type=submit]")
    page.wait_for_load_state()


def bar_value(page: Any, run_id: int) -> float:
    """The fraction a run's progress bar shows (0..1), read from what is drawn."""
    bar = page.locator(f"#run-{run_id} .progress")
    return float(bar.get_attribute("value") or 0) / float(bar.get_attribute("max") or 1)


# -- the dashboard on a real worker with an embedded beat -------------------------------------------------------


def dashboard(cluster: Cluster, jobs: list[dict[str, Any]], token: str | None = TOKEN) -> WebServer:
    worker = cluster.worker(jobs, embedded_beat=EMBEDDED_BEAT)
    web = start_web(cluster, jobs, token=token)
    worker.wait_ready(timeout=120)
    return web


@on(PG_FS)
def test_each_page_loads_without_errors_and_is_photographed(cluster: Cluster, browser: Browser) -> None:
    web = dashboard(cluster, [LONG, ON_DEMAND, WITNESS, HOSTILE])
    cluster.wait_run(LONG["name"], lambda run: run.status == "running" and run.completed > 0, timeout=60)
    cluster.wait_run(XSS_NAME, lambda run: run.status == "failed", timeout=60)
    page = browser.open(web.url + "/")
    for name in (LONG["name"], ON_DEMAND["name"], WITNESS["name"]):
        assert page.get_by_text(name, exact=True).count() >= 1, page.content()
    screenshot(page, "jobs")
    page.goto(web.url + job_path(LONG["name"]))
    page.get_by_text(LONG["name"]).first.wait_for()
    screenshot(page, "job")
    page.goto(web.url + "/runs")
    screenshot(page, "runs")
    page.goto(web.url + "/fleet")
    screenshot(page, "fleet")


@on(PG_FS)
def test_a_progress_bar_moves_without_a_reload(cluster: Cluster, browser: Browser) -> None:
    web = dashboard(cluster, [LONG])
    run = cluster.wait_run(LONG["name"], lambda run: run.status == "running", timeout=60)
    page = browser.open(web.url + "/runs")
    page.evaluate("window.__notReloaded = true")
    first = wait_for(lambda: bar_value(page, run.id), 30, message=f"run {run.id}'s bar to show progress")
    later = wait_for(
        lambda: (value := bar_value(page, run.id)) > first and value,
        30,
        message=f"run {run.id}'s bar to move past {first:.3f}",
    )
    assert page.evaluate("window.__notReloaded") is True  # the same document: it moved without a reload
    assert 0 < first < later <= 1


@on(PG_FS)
def test_a_trigger_from_the_page_runs_the_job_on_the_worker(cluster: Cluster, browser: Browser) -> None:
    web = dashboard(cluster, [ON_DEMAND, WITNESS])
    cluster.wait_run(WITNESS["name"], lambda run: run.status == "completed", timeout=60)
    assert cluster.runs(ON_DEMAND["name"]) == []
    browser.allow(web.url)
    page = browser.new_page()
    log_in(page, web)
    page.goto(web.url + job_path(ON_DEMAND["name"]))
    page.click("button[data-action=trigger]")

    run = cluster.wait_run(ON_DEMAND["name"], lambda run: run.status == "completed", timeout=60)
    assert cluster.event(run.id, "end")["job"] == ON_DEMAND["name"]  # the job's code ran on the worker


@on(PG_FS)
def test_pause_from_the_page_shows_the_job_paused_and_the_beat_no_longer_claims_it(
    cluster: Cluster, browser: Browser
) -> None:
    web = dashboard(cluster, [PAUSABLE, WITNESS])
    cluster.wait_run(PAUSABLE["name"], lambda run: run.status == "completed", timeout=60)
    browser.allow(web.url)
    page = browser.new_page()
    log_in(page, web)
    page.goto(web.url + job_path(PAUSABLE["name"]))
    page.click("button[data-action=pause]")
    page.get_by_text("paused").first.wait_for()

    assert cluster.repo.lookup_job(PAUSABLE["name"]).paused
    paused_at = dt.datetime.now(dt.timezone.utc)
    claimed_before = {run.id for run in cluster.runs(PAUSABLE["name"])}
    # The beat goes on claiming the witness (due every second) three times: the paused job not once.
    cluster.wait_runs(WITNESS["name"], 3, lambda run: run.create_time > paused_at, timeout=60)
    claimed_after = {run.id for run in cluster.runs(PAUSABLE["name"])} - claimed_before
    assert claimed_after == set(), cluster.describe_runs(PAUSABLE["name"])
    page.goto(web.url + "/")
    assert "paused" in page.locator(f"[data-job={PAUSABLE['name']!r}]").inner_text()


@on(PG_FS)
def test_an_action_without_the_token_is_refused(cluster: Cluster, browser: Browser) -> None:
    web = dashboard(cluster, [ON_DEMAND])
    page = browser.open(web.url + job_path(ON_DEMAND["name"]))
    response = page.request.post(web.url + "/api/jobs/" + job_path(ON_DEMAND["name"])[len("/jobs/") :] + "/trigger")
    assert response.status in (401, 403), response.text()
    assert cluster.runs(ON_DEMAND["name"]) == []
    job = cluster.repo.lookup_job(ON_DEMAND["name"])
    assert job.next_scheduled_run > dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=30)


@on(PG_FS)
def test_a_forged_cross_site_post_is_refused(cluster: Cluster, browser: Browser) -> None:
    web = dashboard(cluster, [ON_DEMAND])
    browser.allow(web.url)
    page = browser.new_page()
    log_in(page, web)  # the person is logged in: the forged form would carry their cookie
    action = web.url + job_path(ON_DEMAND["name"]) + "/trigger"
    forged = (
        f'<!doctype html><title>win a prize</title><form id="f" method="post" action="{action}">'
        '<input name="csrf" value="guessed"></form><script>document.getElementById("f").submit()</script>'
    )
    with other_site({"/": forged}) as evil:
        browser.allow(evil)
        browser.expect_console_error("403")
        with page.expect_response(lambda response: response.url == action) as refused:
            page.goto(evil + "/")
        assert refused.value.status == 403, refused.value.text()
    assert cluster.runs(ON_DEMAND["name"]) == []
    job = cluster.repo.lookup_job(ON_DEMAND["name"])
    assert job.next_scheduled_run > dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=30)


@on(PG_FS)
def test_markup_in_a_job_name_and_an_error_is_shown_as_text(cluster: Cluster, browser: Browser) -> None:
    web = dashboard(cluster, [HOSTILE])
    run = cluster.wait_run(XSS_NAME, lambda run: run.status == "failed", timeout=60)
    error = XSS_ERROR.replace("{run_id}", str(run.id))
    for path in ("/", job_path(XSS_NAME), "/runs"):
        page = browser.open(web.url + path)
        page.get_by_text(XSS_NAME).first.wait_for()
        assert page.locator("img[src=x]").count() == 0
        assert page.locator("b[onmouseover]").count() == 0
        if path != "/":
            assert error in page.inner_text("body") or re.sub(r"\s+", " ", error) in page.inner_text("body")
    # No `alert` fired: the `browser` fixture fails the test on any dialog.


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
