"""The dashboard as a person uses it: a real headless Chromium (Debian's, driven by Playwright) against a real
worker with an embedded beat on PostgreSQL and `celery -A e2e_app dbsched web` (helpers/browser.py).

Every test fails on a console error, an uncaught page error, a dialog (a script that should not have run) or a
request that leaves the app (a CDN): the `browser` fixture checks them at the end. The screenshots in
docs/screenshots/ are taken by these tests (the README links them).
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest
from helpers.browser import Browser, WebServer, other_site, screenshot, start_web
from helpers.cluster import PG_FS, Cluster, on
from helpers.polling import wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Page

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
# Fails every time (retried after the backoff): failed runs with their error for the screenshots.
FLAKY = {"kind": "fail", "name": "web.flaky_sync", "every": HOUR, "message": "partner API timed out (run {run_id})"}
# Markup in a job name and in an error: the page must show it as text.
XSS_NAME = "web.<img src=x onerror=alert('name')>"
XSS_ERROR = "<script>alert('error')</script><b onmouseover=alert('hover')>bold</b> in run {run_id}"
HOSTILE = {"kind": "fail", "name": XSS_NAME, "every": HOUR, "message": XSS_ERROR}


# -- the page, by the hooks its templates list at their top (celery_dbsched/web/templates) ----------------------


def job_path(name: str) -> str:
    return "/job?name=" + quote(name, safe="")


def sign_in(page: Page, web: WebServer) -> None:
    """Give the sign-in form the token, as a person does when the page asks for it."""
    page.fill("#token", web.token or "")
    page.fill("#user", "browser-test")
    page.click("#login-submit")
    page.locator("#whoami").wait_for()


def signed_in(browser: Browser, web: WebServer) -> Page:
    """A new page of the dashboard, signed in (with a token configured, every page asks for it first)."""
    page = browser.open(web.url + "/login")
    sign_in(page, web)
    return page


def quote_attr(value: str) -> str:
    """A CSS attribute value in double quotes."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def bar_value(page: Page, run_id: int) -> float:
    """The fraction the live bar of an active run shows (0..1), as drawn now."""
    bar = page.locator(f'#active-body tr.run-row[data-run-id="{run_id}"] progress.progress-bar')
    if bar.count() == 0:
        return 0.0
    value: float = bar.evaluate("bar => bar.value / bar.max")
    return value


# -- the dashboard on a real worker with an embedded beat -------------------------------------------------------


# As the README's example app: workers load the tracking of plain tasks, which also writes their server rows.
TRACKING = {"imports": ["celery_dbsched.tracking"]}


def dashboard(cluster: Cluster, jobs: list[dict[str, Any]], token: str | None = TOKEN) -> WebServer:
    """A worker with an embedded beat running `jobs`, and the dashboard (with `token`) on their database."""
    worker = cluster.worker(jobs, embedded_beat=EMBEDDED_BEAT, settings=TRACKING)
    web = start_web(cluster, jobs, token=token)
    worker.wait_ready(timeout=120)
    return web


@on(PG_FS)
def test_each_page_loads_without_errors_and_is_photographed(cluster: Cluster, browser: Browser) -> None:
    web = dashboard(cluster, [LONG, ON_DEMAND, WITNESS, FLAKY])
    cluster.wait_runs(FLAKY["name"], 2, lambda run: run.status == "failed", timeout=60)
    cluster.wait_runs(WITNESS["name"], 3, lambda run: run.status == "completed", timeout=60)
    cluster.wait_run(LONG["name"], lambda run: run.status == "running" and run.completed > 0, timeout=60)
    page = signed_in(browser, web)

    page.goto(web.url + "/")
    for job in (LONG, ON_DEMAND, WITNESS, FLAKY):
        assert page.locator(f"tr.job-row[data-job={quote_attr(job['name'])}]").count() == 1, job["name"]
    assert page.locator("svg.sparkline polyline").count() >= 1  # the witness's durations
    screenshot(page, "jobs")

    page.goto(web.url + job_path(LONG["name"]))
    assert page.inner_text("#job-name") == LONG["name"]
    assert page.locator("#next-slots li").count() == 5
    page.locator("#active-body tr.run-row").first.wait_for()
    screenshot(page, "job")

    page.goto(web.url + "/runs")
    page.locator("#active-body tr.run-row").first.wait_for()
    assert page.locator("#run-history tr.run-row").count() >= 3
    screenshot(page, "runs")

    page.goto(web.url + "/fleet")
    beat = page.locator('tr.server-row[data-alive="true"][data-role="beat"]')
    assert beat.count() == 1  # the embedded beat, alive, with its claims and claim lag from its row
    assert page.locator('tr.server-row[data-alive="true"][data-role="worker"]').count() == 1
    assert beat.locator(".lag-p50").inner_text().endswith(" s")
    # The claim lag line grows from the samples the open page takes (/api/status every 5 s).
    page.wait_for_function(
        "() => (document.querySelector('svg.lag-line .lag-p50-line')"
        " ?.getAttribute('points') || '').split(' ').length >= 3",
        timeout=30_000,
    )
    screenshot(page, "fleet")


@on(PG_FS)
def test_a_progress_bar_moves_without_a_reload(cluster: Cluster, browser: Browser) -> None:
    web = dashboard(cluster, [LONG])
    run = cluster.wait_run(LONG["name"], lambda run: run.status == "running", timeout=60)
    page = signed_in(browser, web)
    page.goto(web.url + "/runs")
    page.evaluate("window.notReloaded = true")
    first = wait_for(lambda: bar_value(page, run.id), 30, message=f"run {run.id}'s bar to show progress")
    later = wait_for(
        lambda: (value := bar_value(page, run.id)) > first and value,
        30,
        message=f"run {run.id}'s bar to move past {first:.3f}",
    )
    assert page.evaluate("window.notReloaded") is True  # the same document: it moved without a reload
    assert 0 < first < later <= 1


@on(PG_FS)
def test_a_trigger_from_the_page_runs_the_job_on_the_worker(cluster: Cluster, browser: Browser) -> None:
    web = dashboard(cluster, [ON_DEMAND, WITNESS])
    cluster.wait_run(WITNESS["name"], lambda run: run.status == "completed", timeout=60)
    assert cluster.runs(ON_DEMAND["name"]) == []  # due in an hour: it would not run by itself
    page = signed_in(browser, web)
    page.goto(web.url + job_path(ON_DEMAND["name"]))
    page.click("#trigger")
    assert page.inner_text("#flash") == f"triggered {ON_DEMAND['name']}"

    run = cluster.wait_run(ON_DEMAND["name"], lambda run: run.status == "completed", timeout=60)
    assert cluster.event(run.id, "end")["job"] == ON_DEMAND["name"]  # the job's code ran on the worker
    assert run.worker is not None


@on(PG_FS)
def test_pause_from_the_page_shows_the_job_paused_and_the_beat_no_longer_claims_it(
    cluster: Cluster, browser: Browser
) -> None:
    web = dashboard(cluster, [PAUSABLE, WITNESS])
    cluster.wait_run(PAUSABLE["name"], lambda run: run.status == "completed", timeout=60)
    page = signed_in(browser, web)
    page.goto(web.url + job_path(PAUSABLE["name"]))
    page.click("#pause")
    assert page.inner_text("#flash") == f"paused {PAUSABLE['name']}"
    assert page.inner_text("#job-state") == "paused"
    assert page.locator("#resume").is_visible()

    paused_at = cluster.repo.database_now()
    assert cluster.repo.lookup_job(PAUSABLE["name"]).paused
    claimed_before = {run.id for run in cluster.runs(PAUSABLE["name"])}
    # The beat goes on claiming the witness (due every second) three times: the paused job not once.
    cluster.wait_runs(WITNESS["name"], 3, lambda run: run.create_time > paused_at, timeout=60)
    claimed_since = {run.id for run in cluster.runs(PAUSABLE["name"])} - claimed_before
    assert claimed_since == set(), cluster.describe_runs(PAUSABLE["name"])
    page.goto(web.url + "/jobs?state=paused")
    assert page.locator("tr.job-row").evaluate_all("rows => rows.map(r => r.dataset.job)") == [PAUSABLE["name"]]

    page.goto(web.url + job_path(PAUSABLE["name"]))
    page.click("#resume")
    assert page.inner_text("#flash") == f"resumed {PAUSABLE['name']}"
    resumed_at = cluster.repo.database_now()
    cluster.wait_run(PAUSABLE["name"], lambda run: run.create_time > resumed_at and run.status == "completed")


@on(PG_FS)
def test_cancel_from_the_page_stops_the_run_on_the_worker_and_its_row_goes(cluster: Cluster, browser: Browser) -> None:
    web = dashboard(cluster, [LONG])
    run = cluster.wait_run(LONG["name"], lambda run: run.status == "running" and run.completed > 0)
    page = signed_in(browser, web)
    page.goto(web.url + "/runs")
    page.click(f'#active-body tr.run-row[data-run-id="{run.id}"] button.cancel')
    assert page.inner_text("#flash") == f"cancelled run {run.id} of {LONG['name']}"

    cancelled = cluster.event(run.id, "cancelled")  # the job's code saw it on the worker and stopped
    assert cancelled["reason"] == "run is interrupted (cancelled: by browser-test (dashboard))"  # who did it
    ended = cluster.repo.lookup_run(run.id)
    assert (ended.status, ended.interrupt_reason) == ("interrupted", "cancelled")
    assert page.locator(f'#active-body tr.run-row[data-run-id="{run.id}"]').count() == 0
    assert page.locator("#no-active").is_visible()


@on(PG_FS)
def test_an_action_without_the_token_is_refused(cluster: Cluster, browser: Browser) -> None:
    web = dashboard(cluster, [ON_DEMAND])
    page = browser.open(web.url + job_path(ON_DEMAND["name"]))
    # The page asks for the token first: no job, no action, before it.
    assert page.url == web.url + "/login?next=" + quote(job_path(ON_DEMAND["name"]), safe="")
    assert page.locator("#login-form").is_visible()
    assert page.locator("#trigger").count() == 0

    # What a script, or a form kept from an earlier session, would send from this browser without the token.
    response = page.request.post(web.url + "/api/jobs/trigger", form={"name": ON_DEMAND["name"]})
    assert response.status == 401, response.text()
    assert response.json() == {"error": "authentication required: sign in with the dashboard's token"}
    assert cluster.runs(ON_DEMAND["name"]) == []
    job = cluster.repo.lookup_job(ON_DEMAND["name"])
    assert job.next_scheduled_run > cluster.repo.database_now() + dt.timedelta(minutes=30)

    sign_in(page, web)  # with the token, back on the job's page, with its actions
    assert page.url == web.url + job_path(ON_DEMAND["name"])
    assert page.locator("#trigger").is_visible()


@on(PG_FS)
def test_a_forged_cross_site_post_is_refused(cluster: Cluster, browser: Browser) -> None:
    web = dashboard(cluster, [ON_DEMAND])
    page = signed_in(browser, web)  # a forged form from another site would carry the session's cookie
    action = web.url + "/api/jobs/trigger"
    forged = (
        f'<!doctype html><title>win a prize</title><form id="f" method="post" action="{action}">'
        f'<input name="name" value="{ON_DEMAND["name"]}"><input name="csrf" value="guessed"></form>'
        '<script>document.getElementById("f").submit()</script>'
    )
    with other_site({"/": forged}) as evil:
        browser.allow(evil)
        browser.expect_console_error("the server responded with a status of 403")  # the refusal, as logged
        with page.expect_response(lambda response: response.url == action) as refused:
            page.goto(evil + "/")
        assert refused.value.status == 403, refused.value.text()
        assert refused.value.json()["error"].startswith("cross-site request refused"), refused.value.text()
    assert cluster.runs(ON_DEMAND["name"]) == []
    job = cluster.repo.lookup_job(ON_DEMAND["name"])
    assert job.next_scheduled_run > cluster.repo.database_now() + dt.timedelta(minutes=30)


@on(PG_FS)
def test_markup_in_a_job_name_and_an_error_is_shown_as_text(cluster: Cluster, browser: Browser) -> None:
    web = dashboard(cluster, [HOSTILE])
    run = cluster.wait_run(XSS_NAME, lambda run: run.status == "failed", timeout=60)
    error_line = "RuntimeError: " + XSS_ERROR.replace("{run_id}", str(run.id))
    page = signed_in(browser, web)
    for path in ("/jobs", job_path(XSS_NAME), "/runs"):
        page.goto(web.url + path)
        assert XSS_NAME in page.inner_text("main"), path
        assert page.locator("main img, main b, main script").count() == 0, path  # no element from the data
        if path != "/jobs":
            error = page.locator(f'tr.run-row[data-run-id="{run.id}"] td.run-error')
            assert error_line in (error.text_content() or ""), path  # folded, yet there
            page.click(f'tr.run-row[data-run-id="{run.id}"] details.traceback summary')  # unfold it
            assert error_line in error.inner_text(), path
    page.goto(web.url + job_path(XSS_NAME))
    assert page.inner_text("#job-name") == XSS_NAME
    # And no alert() fired on any page: the `browser` fixture fails the test on a dialog.


@on(PG_FS)
def test_a_schedule_added_with_the_form_is_listed_and_sent_without_a_restart(
    cluster: Cluster, browser: Browser
) -> None:
    """Issue 13: a run-time schedule of a plain Celery task (Celery's own backend_cleanup, which every worker
    has), typed into the dashboard's form; the running embedded beat sends it (its first slot is now)."""
    web = dashboard(cluster, [WITNESS])
    page = signed_in(browser, web)
    page.goto(web.url + "/jobs")
    page.click("#new-schedule")
    page.fill("#schedule-name", "web.runtime")
    page.fill("#schedule-task", "celery.backend_cleanup")
    page.fill("#schedule-every", "1h")
    page.fill("#schedule-description", "added in the browser")
    screenshot(page, "new-schedule")
    page.click("#schedule-submit")
    assert page.inner_text("#flash").startswith("added web.runtime: celery.backend_cleanup every 1 h; next run ")
    assert page.inner_text("#job-name") == "web.runtime"
    assert page.get_attribute("#job-origin", "data-origin") == "runtime"

    page.goto(web.url + "/jobs")
    row = page.locator('tr.job-row[data-job="web.runtime"]')
    assert row.count() == 1
    assert row.locator("td.job-origin").inner_text() == "runtime"
    assert "added in the browser" in row.locator("td.job-name").inner_text()
    run = cluster.wait_run("web.runtime", lambda run: True, timeout=60)  # claimed and sent by the running beat
    assert run.job_name == "web.runtime" and cluster.repo.lookup_job("web.runtime").origin == "runtime"


def test_the_browser_reports_console_errors_dialogs_and_requests_outside_the_app(browser: Browser) -> None:
    page_html = (
        "<!doctype html><title>t</title><script>console.error('broken widget'); alert('injected')</script>"
        '<script src="https://cdn.example.com/lib.js"></script><p id="done">loaded</p>'
    )
    with other_site({"/": page_html}) as url:
        page = browser.open(url + "/")
        assert page.inner_text("#done") == "loaded"

    problems = browser.problems()
    assert any("console error: broken widget" in line for line in problems), problems
    assert "request outside the app (a CDN?) aborted: https://cdn.example.com/lib.js" in problems, problems
    assert "dialog opened (a script ran): alert: injected" in problems, problems
    browser.console_errors.clear()
    browser.blocked.clear()
    browser.dialogs.clear()
