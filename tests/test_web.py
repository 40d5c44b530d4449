"""Issue 12 §3: the dashboard (`celery_dbsched.web`), through Starlette's TestClient on SQLite and PostgreSQL:
every page answers and shows the data, the JSON API's shapes, paging, the token (401/403), CSRF refusals,
escaping. The real browser tests are elsewhere (Playwright); `dbsched web` as a process is in test_cli.py."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import html
import logging
import re
import socket
import sys
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from urllib.parse import quote

import pytest
from celery import Celery
from helpers.apps import make_app, seconds
from helpers.processes import REPO_DIR
from helpers.repository import claim_one
from helpers.services import Database
from sqlalchemy import text
from starlette.responses import PlainTextResponse
from starlette.testclient import TestClient

from celery_dbsched import repository as repository_module
from celery_dbsched import statements as sql
from celery_dbsched.binding import bind_repository
from celery_dbsched.cli import WEB_TOKEN_ENV, web_token
from celery_dbsched.clock import TestClock
from celery_dbsched.policy import JobPolicy
from celery_dbsched.records import ClaimStats, RunRecord, definition_of
from celery_dbsched.repository import JobRepository
from celery_dbsched.schedules import CrontabSchedule, IntervalSchedule
from celery_dbsched.settings import Settings
from celery_dbsched.states import ACTIVE, Origin, RunState
from celery_dbsched.web import check_bind, create_app
from celery_dbsched.web.auth import NO_TOKEN

sys.path.insert(0, str(REPO_DIR))

from bench import dashboard

TOKEN = "test-token-0123456789"
XSS = "<script>alert('x')</script>"
T0 = dt.datetime(2026, 12, 5, 8, 0, tzinfo=dt.timezone.utc)

Client = Callable[..., TestClient]


@pytest.fixture
def client(repository: JobRepository) -> Client:
    def make(token: str | None = None, **headers: str) -> TestClient:
        return TestClient(create_app(repository, token=token), headers=headers, follow_redirects=False)

    return make


def _run(
    repository: JobRepository, clock: TestClock, name: str, at: dt.datetime, outcome: str, took: float = 2.0
) -> RunRecord:
    """One run of `name` claimed at `at`, started, and ended `took` seconds later: completed, failed, or left
    running (`running`, with progress 3/10)."""
    clock.freeze(at)
    run = claim_one(repository, name)
    repository.start_run(run.id, "worker@host")
    if outcome == "running":
        return repository.update_progress(run.id, 3, 10)
    clock.freeze(at + seconds(took))
    if outcome == "failed":
        return repository.fail_run(run.id, f"Traceback (most recent call last):\n  ...\nValueError: {XSS} broke")
    return repository.complete_run(run.id)


@pytest.fixture
def populated(repository: JobRepository, clock: TestClock) -> JobRepository:
    """Jobs: `steady` (3 completed runs), `flaky` (completed, then failed), `busy` (running, 3/10), `cron` (a
    crontab, never run), and one named with a script tag (due and not claimed: late); a worker's server row.
    Each job is created before its own runs and paused while the others are claimed (a claim takes all that
    is due)."""
    clock.freeze(T0)
    repository.upsert_job("steady", "the steady job", every=seconds(60))
    for i, took in enumerate((1.0, 3.0, 2.0)):
        _run(repository, clock, "steady", T0 + seconds(120 * i), "completed", took)
    repository.set_paused("steady", True)
    clock.freeze(T0 + seconds(300))
    repository.upsert_job("flaky", "the flaky job", every=seconds(60))
    _run(repository, clock, "flaky", T0 + seconds(400), "completed")
    _run(repository, clock, "flaky", T0 + seconds(600), "failed")
    repository.set_paused("flaky", True)
    repository.upsert_job("busy", "the busy job", every=seconds(60))
    _run(repository, clock, "busy", T0 + seconds(700), "running")
    repository.set_paused("steady", False)
    repository.set_paused("flaky", False)
    repository.upsert_job(XSS, "a hostile name", every=seconds(60))
    repository.upsert_job("cron", "nightly", schedule=CrontabSchedule(minute="0", hour="2"))
    repository.heartbeat("worker@host", "worker", "host", 4242, interval=60.0)  # alive: 100 s < 3 x 60 s
    clock.freeze(T0 + seconds(800))
    return repository


def _csrf(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, page
    return match.group(1)


def _page_csrf(page: str) -> str:
    """The session's CSRF token that every page carries for scripts (body data-csrf)."""
    match = re.search(r'data-csrf="([^"]+)"', page)
    assert match, page
    return match.group(1)


def _signed_in(make: Client, user: str = "ann") -> TestClient:
    web = make(TOKEN)
    response = web.post("/login", data={"token": TOKEN, "user": user, "next": "/jobs"})
    assert response.status_code == 303, response.text
    return web


# --- pages ---------------------------------------------------------------------------------------------------


def test_every_page_answers_and_shows_the_data(populated: JobRepository, client: Client) -> None:
    web = client()
    jobs = web.get("/jobs")
    assert jobs.status_code == 200
    for name in ("steady", "flaky", "busy", "cron"):
        assert f'data-job="{name}"' in jobs.text
    assert "every 1 min" in jobs.text and "cron 0 2 * * * UTC" in jobs.text
    assert re.search(r'<tr class="job-row" data-job="busy" data-state="running">', jobs.text)
    steady = jobs.text[jobs.text.index('data-job="steady"') :]
    assert "100%" in steady.split("</tr>")[0] and "<polyline points=" in steady.split("</tr>")[0]
    flaky = jobs.text[jobs.text.index('data-job="flaky"') :].split("</tr>")[0]
    assert "50%" in flaky and "failed" in flaky

    detail = web.get("/job?name=busy")
    assert detail.status_code == 200
    assert len(re.findall(r"<li>", detail.text.split('id="next-slots"')[1].split("</ol>")[0])) == 5
    active = detail.text.split('id="active-runs"')[1].split("</table>")[0]
    assert 'value="3" max="10"' in active and "3/10" in active
    failed = web.get("/job?name=flaky").text.split('id="history"')[1]
    assert '<details class="traceback"><summary>ValueError:' in failed

    runs = web.get("/runs")
    assert runs.status_code == 200
    assert 'data-status="running"' in runs.text.split('id="active-runs"')[1].split("</table>")[0]
    # The running run is listed once, live among the active ones; the history holds the five that ended.
    assert runs.text.count('class="run-row') == 5 + 1
    assert 'data-status="running"' not in runs.text.split('id="run-history"')[1]
    busy = web.get("/job?name=busy").text  # likewise on the job's page: live above, not again in its history
    assert 'data-status="running"' in busy.split('id="active-runs"')[1].split("</table>")[0]
    assert busy.count('class="run-row') == 1 and "No ended runs yet." in busy  # its only run: running

    fleet = web.get("/fleet")
    assert fleet.status_code == 200
    assert 'data-server-id="worker@host" data-alive="true"' in fleet.text
    assert web.get("/").headers["location"] == "/jobs"


def _row(page: str, server_id: str) -> str:
    return page.split(f'data-server-id="{server_id}"')[1].split("</tr>")[0]


def test_the_fleet_shows_each_beats_claim_lag_and_who_is_silent(
    repository: JobRepository, clock: TestClock, client: Client
) -> None:
    """The fleet page and /api/status read observe's fleet: silent after three missed heartbeats of the row's
    own interval; a beat's claims and claim lag (p50 / max over the last minute), with the line the page draws
    of it; a worker's runs in flight."""
    clock.freeze(T0)
    repository.heartbeat("old-beat@host", "beat", "host", 1, interval=5.0)
    clock.freeze(T0 + seconds(16))  # its three heartbeats of 5 s missed
    repository.heartbeat("beat@host", "beat", "host", 2, interval=5.0, claims=ClaimStats(12, 0.25, 1.5))
    repository.heartbeat("worker@host", "worker", "host", 3, interval=2.0)
    web = client()

    page = web.get("/fleet").text

    beat = _row(page, "beat@host")
    assert 'data-alive="true" data-role="beat"' in beat
    assert '<span class="lag-p50">0.250 s</span> / <span class="lag-max">1.500 s</span>' in beat
    assert "12 claims/min" in beat and '<svg class="lag-line"' in beat and 'data-p50="0.25" data-max="1.5"' in beat
    old = _row(page, "old-beat@host")
    assert 'data-alive="false"' in old and "silent since 2026-12-05 08:00:00" in old
    worker = _row(page, "worker@host")
    assert 'data-alive="true" data-role="worker"' in worker and "0 in flight" in worker
    assert "<svg" not in worker
    status = web.get("/api/status").json()
    alive = {server["id"]: server["alive"] for server in status["beats"] + status["workers"]}
    assert alive == {"beat@host": True, "old-beat@host": False, "worker@host": True}
    [lagging] = [server for server in status["beats"] if server["id"] == "beat@host"]
    assert (lagging["claims_last_minute"], lagging["claim_lag_p50"], lagging["claim_lag_max"]) == (12, 0.25, 1.5)


def test_pages_load_nothing_from_elsewhere(populated: JobRepository, client: Client) -> None:
    web = client()
    page = web.get("/jobs")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert not re.search(r'(src|href)="(https?:)?//', page.text)
    assert "<script>" not in page.text  # no inline script: the CSP forbids it
    for asset in ("/static/dbsched.js", "/static/dbsched.css"):
        assert web.get(asset).status_code == 200


def test_a_script_in_a_name_or_an_error_is_shown_as_text(populated: JobRepository, client: Client) -> None:
    repository = populated
    web = client()
    escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"
    for path in ("/jobs", f"/job?name={quote(XSS)}", "/runs", "/job?name=flaky", "/runs?status=failed"):
        page = web.get(path)
        assert page.status_code == 200, path
        assert XSS not in page.text, path
    assert escaped in web.get("/jobs").text
    assert escaped in web.get("/job?name=flaky").text
    assert web.get("/api/jobs?q=script").json()["jobs"][0]["name"] == XSS
    assert repository.lookup_job(XSS).name == XSS


def test_bad_parameters_answer_400_with_the_reason(populated: JobRepository, client: Client) -> None:
    web = client()
    page = web.get("/jobs?state=sleepy")
    assert page.status_code == 400
    assert "state: expected one of enabled, paused, running, failing, late, got &#39;sleepy&#39;" in page.text
    assert web.get("/api/runs?since=yesterday").json()["error"].startswith("since: expected a duration")
    assert web.get("/api/jobs?after=garbage").status_code == 400
    assert web.get("/api/job?name=nope").json() == {"error": "job 'nope' not found"}
    assert web.get("/job?name=nope").status_code == 404


def test_a_database_outage_answers_503() -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    down = JobRepository(f"postgresql+psycopg://postgres@127.0.0.1:{port}/test?connect_timeout=2")
    web = TestClient(create_app(down))
    answer = web.get("/api/jobs")
    assert answer.status_code == 503 and "database unavailable" in answer.json()["error"]
    page = web.get("/jobs")
    assert page.status_code == 503 and "database unavailable" in page.text


# --- the JSON API ------------------------------------------------------------------------------------------


def test_api_shapes(populated: JobRepository, client: Client) -> None:
    web = client()
    jobs = web.get("/api/jobs").json()
    assert set(jobs) == {"jobs", "next"}
    steady = next(job for job in jobs["jobs"] if job["name"] == "steady")
    assert set(steady) >= {
        "name", "description", "kind", "state", "schedule", "schedule_spec", "every", "next_run", "enabled",
        "paused", "active_runs", "failure_count", "queue", "interrupt_threshold", "policy", "last_run",
        "success_rate", "durations", "overrides", "origin", "task", "one_off", "expire_time",
    }  # fmt: skip
    assert (steady["origin"], steady["task"], steady["one_off"], steady["expire_time"]) == ("code", None, False, None)
    assert steady["durations"] == [1.0, 3.0, 2.0] and steady["success_rate"] == 1.0
    assert steady["last_run"]["status"] == "completed"
    assert set(steady["policy"]) == {"misfire", "misfire_grace", "max_active", "retry_backoff", "expires"}

    job = web.get("/api/job?name=busy").json()
    assert set(job) == {"job", "next_slots", "active", "runs", "next"}
    assert len(job["next_slots"]) == 5
    (active,) = job["active"]
    assert active["progress"] == {"completed": 3, "total": 10} and active["status"] == "running"
    assert set(active) == {
        "id", "job", "status", "interrupt_reason", "progress", "claimed", "started", "updated", "ended",
        "duration", "claimed_by", "worker", "queue", "task_id", "scheduled_for", "error",
    }  # fmt: skip

    runs = web.get("/api/runs?job=flaky").json()
    assert [run["status"] for run in runs["runs"]] == ["failed", "completed"]
    assert runs["runs"][0]["error"].endswith(f"ValueError: {XSS} broke")
    assert [run["job"] for run in web.get("/api/runs/active").json()["runs"]] == ["busy"]

    # The JSON of `dbsched status --json`: one read model (observe) for the page, the API, the CLI and metrics.
    status = web.get("/api/status").json()
    assert status["active"]["count"] == 1 and status["failures_last_hour"]["count"] == 1
    assert status["beats"] == []
    assert [(worker["id"], worker["host"], worker["pid"], worker["alive"]) for worker in status["workers"]] == [
        ("worker@host", "host", 4242, True)
    ]
    assert status["due"]["count"] >= 1 and status["due"]["oldest_lateness"] > 0
    assert status["healthy"] is False and status["problems"][0].startswith("no beat is alive")


def test_jobs_filter_search_and_sort(populated: JobRepository, client: Client) -> None:
    repository = populated
    repository.set_paused("steady", True)
    web = client()

    def names(query: str) -> list[str]:
        return [job["name"] for job in web.get(f"/api/jobs?{query}").json()["jobs"]]

    assert names("state=paused") == ["steady"]
    assert names("state=running") == ["busy"]
    assert names("state=failing") == ["flaky"]
    assert "cron" not in names("state=late") and XSS in names("state=late")
    assert "steady" not in names("state=enabled")
    assert names("q=NIGHT") == ["cron"]  # the description, any case
    assert names("q=%25") == []  # a LIKE wildcard is searched for, not obeyed
    assert names("sort=-name") == sorted(names("sort=name"), reverse=True)
    by_next = web.get("/api/jobs?sort=next_run").json()["jobs"]
    assert [job["next_run"] for job in by_next] == sorted(job["next_run"] for job in by_next)


@pytest.mark.parametrize("sort", ["name", "-name", "next_run", "-next_run"])
def test_jobs_pages_by_keyset(repository: JobRepository, clock: TestClock, client: Client, sort: str) -> None:
    clock.freeze(T0)
    for i in range(7):
        repository.upsert_job(f"job-{i}", "x", every=seconds(60), first_run_in=seconds(i % 3 * 10))
    web = client()
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(4):
        page = web.get("/api/jobs", params={"sort": sort, "limit": 3, **({"after": cursor} if cursor else {})}).json()
        seen += [job["name"] for job in page["jobs"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert sorted(seen) == [f"job-{i}" for i in range(7)] and len(seen) == 7
    html = web.get(f"/jobs?sort={sort}&limit=3")
    assert 'id="next-page"' in html.text


def test_runs_page_by_keyset_and_filters(populated: JobRepository, client: Client) -> None:
    web = client()
    ids: list[int] = []
    before: int | None = None
    while True:
        page = web.get("/api/runs", params={"limit": 2, **({"before": before} if before else {})}).json()
        ids += [run["id"] for run in page["runs"]]
        before = page["next"]
        if before is None:
            break
    assert ids == sorted(ids, reverse=True) and len(ids) == 6
    assert [run["status"] for run in web.get("/api/runs?status=failed").json()["runs"]] == ["failed"]
    assert len(web.get("/api/runs?worker=worker@host").json()["runs"]) == 6
    assert web.get("/api/runs?worker=other").json()["runs"] == []
    assert len(web.get("/api/runs?job=steady&until=2026-12-05T08:03:00Z").json()["runs"]) == 2
    assert web.get("/api/runs?since=2026-12-05T09:00:00Z").json()["runs"] == []
    assert 'id="next-page"' in web.get("/runs?limit=2").text


def test_a_filtered_history_page_scans_a_bounded_window(
    populated: JobRepository, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No index serves a worker or time filter: each page scans at most RUNS_SCAN_WINDOW run ids, and a page
    that found nothing there still links to the older ones. A job or a status has its index: no window."""
    monkeypatch.setattr(repository_module, "RUNS_SCAN_WINDOW", 2)
    web = client()
    pages: list[list[str]] = []
    before: int | None = None
    while True:
        params = {"status": "completed", "worker": "worker@host", **({"before": before} if before else {})}
        page = web.get("/api/runs", params=params).json()
        pages.append([run["job"] for run in page["runs"]])
        before = page["next"]
        if before is None:
            break
    assert pages == [[], ["flaky", "steady"], ["steady", "steady"]]  # ids 6-5, 4-3, 2-1
    empty = web.get("/runs?status=completed&worker=worker@host").text
    assert "No runs match among the latest runs searched" in empty and 'id="next-page"' in empty
    assert len(web.get("/api/runs?job=steady").json()["runs"]) == 3  # by job: the job's index, no window
    completed = web.get("/api/runs?status=completed").json()  # by status: the status index, no window
    assert [run["job"] for run in completed["runs"]] == ["flaky", "steady", "steady", "steady"]
    assert completed["next"] is None


ACTIVE_INDEXES = ("dbsched_job_run_active_update", "dbsched_job_run_active_slot")


@pytest.mark.postgres
def test_history_filters_and_last_runs_read_through_indexes_at_scale(postgres_database: Database) -> None:
    """With 2,000 jobs and 200,000 runs analysed: a status filter walks the status index (a rare status no
    longer walks the id index past the others), and `dbsched jobs`'s last run of each job is one probe of the
    runs-by-job index per job, never a pass over the history."""
    dashboard.fill(postgres_database.url, 2_000, 200_000, log=lambda line: None)
    repository = postgres_database.repository()
    last_runs = sql.last_runs(repository.dialect)
    by_status = {
        status: sql.runs_page(
            job_name=None, status=status, worker=None, since=None, until=None, before=None, at_least=None, limit=51
        )
        for status in ("failed", "interrupted", "queued", "dispatched")
    }
    with repository.engine.connect() as conn:
        plan = dashboard.plan(conn, last_runs)
        assert "Seq Scan on dbsched_job_run" not in plan and "Index Scan" in plan, plan
        assert "dbsched_job_run_job on dbsched_job_run" in plan and "Limit" in plan, plan
        assert "HashAggregate" not in plan and "GroupAggregate" not in plan, plan
        for status, statement in by_status.items():
            plan = dashboard.plan(conn, statement)
            assert "Seq Scan on dbsched_job_run" not in plan, f"{status}:\n{plan}"
            # An active status may also come from a partial index of active runs: bounded by them, too.
            served = ("dbsched_job_run_status",) + (ACTIVE_INDEXES if status in ACTIVE else ())
            assert any(f"using {index} on dbsched_job_run" in plan for index in served), f"{status}:\n{plan}"
    last = repository.last_runs()
    assert len(last) == 2_000
    page = repository.runs_page(status="interrupted", limit=50)
    assert len(page.runs) == 50 and {run.status for run in page.runs} == {"interrupted"}


def test_last_runs_probe_the_runs_by_job_index_per_job_on_sqlite(sqlite_database: Database) -> None:
    repository = sqlite_database.migrated_repository()
    with repository.engine.connect() as conn:
        compiled = sql.last_runs(repository.dialect).compile(conn, compile_kwargs={"literal_binds": True})
        plan = [row[3] for row in conn.execute(text(f"EXPLAIN QUERY PLAN {compiled}"))]
    assert "CORRELATED SCALAR SUBQUERY 1" in plan, plan
    assert "SEARCH dbsched_job_run USING COVERING INDEX dbsched_job_run_job (job_name=?)" in plan, plan
    assert not any(step.startswith("SCAN dbsched_job_run") for step in plan), plan


# --- authentication and actions ----------------------------------------------------------------------------


def test_without_a_token_the_dashboard_is_read_only(populated: JobRepository, client: Client) -> None:
    web = client()
    assert 'id="read-only"' in web.get("/jobs").text
    page = web.get("/job?name=steady").text
    assert 'id="actions-read-only"' in page and 'id="trigger-form"' not in page
    response = web.post("/api/jobs/pause", json={"name": "steady"})
    assert response.status_code == 403
    assert response.json() == {"error": NO_TOKEN}
    assert populated.lookup_job("steady").paused is False


def test_with_a_token_everything_needs_it(populated: JobRepository, client: Client) -> None:
    anonymous = client(TOKEN)
    assert anonymous.get("/jobs").headers["location"] == "/login?next=%2Fjobs"
    assert anonymous.get("/job?name=busy").headers["location"] == "/login?next=%2Fjob%3Fname%3Dbusy"
    denied = anonymous.get("/api/jobs")
    assert denied.status_code == 401 and denied.headers["www-authenticate"] == 'Basic realm="dbsched"'
    assert anonymous.post("/api/jobs/pause", json={"name": "steady"}).status_code == 401
    wrong = anonymous.post("/login", data={"token": "not-the-token-at-all", "user": "mallory"})
    assert wrong.status_code == 401 and "wrong token" in wrong.text
    assert client(TOKEN, authorization="Bearer wrong-token-xxxxxxxxx").get("/api/jobs").status_code == 401

    assert client(TOKEN, authorization=f"Bearer {TOKEN}").get("/api/jobs").status_code == 200
    basic = base64.b64encode(f"bob:{TOKEN}".encode()).decode()
    assert client(TOKEN, authorization=f"Basic {basic}").get("/jobs").status_code == 200
    web = _signed_in(client)
    page = web.get("/jobs")
    assert page.status_code == 200 and "signed in as ann" in page.text
    for elsewhere in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        signed = client(TOKEN).post("/login", data={"token": TOKEN, "next": elsewhere})
        assert signed.headers["location"] == "/jobs", elsewhere  # never sent on to another site
    assert web.post("/logout").headers["location"] == "/login"


def test_actions_from_the_page_are_done_and_logged(
    populated: JobRepository, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    repository = populated
    web = _signed_in(client)
    page = web.get("/job?name=steady").text
    csrf = _csrf(page)
    back = "/job?name=steady"
    caplog.set_level(logging.INFO, logger="celery_dbsched.web")

    before = repository.lookup_job("cron").next_scheduled_run
    done = web.post("/api/jobs/trigger", data={"csrf": csrf, "name": "cron", "next": back})
    assert done.status_code == 303 and done.headers["location"] == back
    assert repository.lookup_job("cron").next_scheduled_run < before
    assert 'id="flash" role="status">triggered cron<' in web.get(back).text

    web.post("/api/jobs/pause", data={"csrf": csrf, "name": "steady", "next": back})
    assert repository.lookup_job("steady").paused is True
    assert 'id="resume-form"' in web.get(back).text
    web.post("/api/jobs/resume", data={"csrf": csrf, "name": "steady", "next": back})
    assert repository.lookup_job("steady").paused is False

    (busy,) = repository.active_runs_of("busy")
    cancel_page = web.get("/job?name=busy").text
    assert f'action="/api/runs/{busy.id}/cancel"' in cancel_page
    web.post(f"/api/runs/{busy.id}/cancel", data={"csrf": csrf, "next": "/job?name=busy"})
    cancelled = repository.lookup_run(busy.id)
    assert cancelled.status == RunState.INTERRUPTED and cancelled.error == "cancelled: by ann (dashboard)"

    lines = [record.getMessage() for record in caplog.records]
    assert "dashboard: triggered cron by ann (cookie) from testclient" in lines
    assert "dashboard: paused steady by ann (cookie) from testclient" in lines
    assert f"dashboard: cancelled run {busy.id} of busy by ann (cookie) from testclient" in lines


def test_a_forged_cross_site_post_is_refused(populated: JobRepository, client: Client) -> None:
    repository = populated
    web = _signed_in(client)
    csrf = _csrf(web.get("/job?name=steady").text)
    forged = [
        ({"name": "steady"}, {}),  # no CSRF token: a form on another site cannot know it
        ({"name": "steady", "csrf": "0" * 43}, {}),
        ({"name": "steady", "csrf": csrf}, {"origin": "https://evil.example"}),
        ({"name": "steady", "csrf": csrf}, {"sec-fetch-site": "cross-site"}),
    ]
    for data, headers in forged:
        response = web.post("/api/jobs/pause", data=data, headers=headers)
        assert response.status_code == 403, (data, headers)
        assert response.json()["error"].startswith(("missing or wrong CSRF token", "cross-site request refused"))
    assert repository.lookup_job("steady").paused is False
    same_site = web.post(
        "/api/jobs/pause", data={"name": "steady", "csrf": csrf}, headers={"origin": "http://testserver"}
    )
    assert same_site.status_code == 303 and repository.lookup_job("steady").paused is True


def test_api_actions_with_the_token(populated: JobRepository, client: Client) -> None:
    repository = populated
    api = client(TOKEN, authorization=f"Bearer {TOKEN}")
    paused = api.post("/api/jobs/pause", json={"name": "flaky"})
    assert paused.status_code == 200
    assert paused.json()["job"]["paused"] is True and paused.json()["message"] == "paused flaky"
    refused = api.post("/api/jobs/trigger", json={"name": "flaky"})
    assert refused.status_code == 409 and "is paused; resume it to run it" in refused.json()["error"]
    assert api.post("/api/jobs/trigger", json={"name": "nope"}).status_code == 404
    assert api.post("/api/jobs/fly", json={"name": "flaky"}).status_code == 404
    (busy,) = repository.active_runs_of("busy")
    assert api.post(f"/api/runs/{busy.id}/cancel").json()["run"]["status"] == "interrupted"
    assert repository.lookup_job("busy").next_scheduled_run > repository.database_now()  # not claimed again at once
    again = api.post(f"/api/runs/{busy.id}/cancel")
    assert again.status_code == 409 and "interrupted" in again.json()["error"]


def test_edit_a_jobs_schedule_and_policies(populated: JobRepository, client: Client) -> None:
    repository = populated
    api = client(TOKEN, authorization=f"Bearer {TOKEN}")
    edited = api.post(
        "/api/jobs/edit",
        json={
            "name": "cron",
            "schedule": "*/15 * * * *",
            "timezone": "Europe/Berlin",
            "max_active": 2,
            "expires": "30",
        },
    )
    assert edited.status_code == 200, edited.text
    job = repository.lookup_job("cron")
    assert job.schedule == CrontabSchedule(minute="*/15", timezone="Europe/Berlin")
    assert job.policy.max_active == 2 and job.policy.expires == seconds(30)
    assert job.next_scheduled_run.minute % 15 == 0  # the new schedule's next slot

    api.post(
        "/api/jobs/edit", json={"name": "steady", "schedule": "300", "retry_backoff_base": 5, "retry_backoff_cap": 50}
    )
    steady = repository.lookup_job("steady")
    assert steady.every == seconds(300) and steady.policy.retry_backoff == (seconds(5), seconds(50))

    bad = api.post("/api/jobs/edit", json={"name": "cron", "max_active": 0})
    assert bad.status_code == 400 and "max_active must be a whole number from 1 to 1000" in bad.json()["error"]
    assert api.post("/api/jobs/edit", json={"name": "cron", "schedule": "1 2 3"}).status_code == 400
    assert repository.lookup_job("cron").policy.max_active == 2

    web = _signed_in(client)
    page = web.get("/job?name=cron").text
    form = {"csrf": _csrf(page), "name": "cron", "next": "/job?name=cron", "enabled": "off", "schedule": "600"}
    web.post("/api/jobs/edit", data=form)
    job = repository.lookup_job("cron")
    assert job.schedule == IntervalSchedule(600.0) and job.policy.enabled is False


def test_an_edit_holds_across_syncs_until_reverted_to_code(populated: JobRepository, client: Client) -> None:
    """As django-celery-beat users expect of an admin edit: an edit overrides the code's value of the fields it
    changes across the syncs of a worker start (`define_job` as `JobRegistry.add`, `sync_jobs` as
    `JobRegistry.sync`), which still apply the code's other changes; "revert to code" drops it."""
    repository = populated
    declared = repository.lookup_job("steady")
    code = definition_of(declared)
    api = client(TOKEN, authorization=f"Bearer {TOKEN}")
    edited = api.post("/api/jobs/edit", json={"name": "steady", "max_active": 3, "schedule": "300"})
    assert edited.json()["job"]["overrides"] == {
        "every": {"code": 60.0, "edited": 300.0},
        "max_active": {"code": 1, "edited": 3},
    }
    assert repository.sync_jobs([code]).unchanged  # the code as declared, under the edit: nothing to do
    repository.upsert_job("steady", declared.description, every=declared.every)  # a worker start's sync
    held = repository.lookup_job("steady")
    assert held.policy.max_active == 3 and held.every == seconds(300) and held.edited_fields == ["every", "max_active"]

    # The code changes: its other fields are applied, the edited ones hold, and the record of the code follows.
    changed = dataclasses.replace(code, description="the steady job, v2", policy=JobPolicy(max_active=2))
    assert repository.sync_jobs([changed]).changed == ["steady"]
    held = repository.lookup_job("steady")
    assert held.description == "the steady job, v2" and held.policy.max_active == 3
    assert held.overrides_by_field()["max_active"] == {"code": 2, "edited": 3}

    web = _signed_in(client)
    page = web.get("/job?name=steady").text
    assert 'Edited on the dashboard (overrides the code): <span id="edited-fields">every, max_active</span>' in page
    form = {"csrf": _csrf(page), "name": "steady", "next": "/job?name=steady"}
    assert web.post("/api/jobs/revert", data=form).status_code == 303
    reverted = repository.lookup_job("steady")
    assert (reverted.policy.max_active, reverted.every, reverted.overrides) == (2, seconds(60), {})
    assert "edited-fields" not in web.get("/job?name=steady").text
    assert api.post("/api/jobs/revert", json={"name": "nope"}).status_code == 404
    assert client(TOKEN).post("/api/jobs/revert", data={"name": "steady"}).status_code == 401

    # An edit back to the code's value is no override.
    api.post("/api/jobs/edit", json={"name": "steady", "max_active": 4})
    api.post("/api/jobs/edit", json={"name": "steady", "max_active": 2})
    assert repository.lookup_job("steady").overrides == {}


def test_metrics_are_served_behind_the_token(repository: JobRepository, monkeypatch: pytest.MonkeyPatch) -> None:
    """/metrics is `celery_dbsched.metrics.metrics_app(repository)` (issue 12 §4), here a stand-in."""
    served: list[JobRepository] = []

    def metrics_app(repo: JobRepository) -> PlainTextResponse:
        served.append(repo)
        return PlainTextResponse("dbsched_active_runs 0\n")

    monkeypatch.setitem(sys.modules, "celery_dbsched.metrics", SimpleNamespace(metrics_app=metrics_app))
    assert TestClient(create_app(repository)).get("/metrics").text == "dbsched_active_runs 0\n"
    assert served == [repository]
    guarded = TestClient(create_app(repository, token=TOKEN))
    assert guarded.get("/metrics").status_code == 401
    assert guarded.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
    monkeypatch.setitem(sys.modules, "celery_dbsched.metrics", None)  # not installed
    assert TestClient(create_app(repository)).get("/metrics").status_code == 404


# --- binding -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.5"])
def test_loopback_serves_without_a_token(host: str) -> None:
    check_bind(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.4", "::", "example.com"])
def test_beyond_loopback_needs_a_token(host: str) -> None:
    with pytest.raises(
        ValueError, match=f"refusing to serve the dashboard on {re.escape(host)} without authentication"
    ):
        check_bind(host, None)
    check_bind(host, TOKEN)


# --- the token setting -----------------------------------------------------------------------------------------


def test_the_token_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.from_mapping({"dbsched_web_token": TOKEN})
    assert settings.web_token == TOKEN and TOKEN not in repr(settings) and "web_token='***'" in repr(settings)
    with pytest.raises(ValueError, match=r"^dbsched_web_token: at least 16 characters") as refused:
        Settings.from_mapping({"dbsched_web_token": "hunter2"})
    assert "hunter2" not in str(refused.value)
    monkeypatch.delenv(WEB_TOKEN_ENV, raising=False)
    assert web_token(settings) == TOKEN
    monkeypatch.setenv(WEB_TOKEN_ENV, "from-the-environment-0123")
    assert web_token(settings) == "from-the-environment-0123"  # the environment wins


# --- run-time schedules (issue 13) ---------------------------------------------------------------------------

ENTRY = {"config.entry": {"task": "proj.config", "schedule": 3600}}


@pytest.fixture
def celery_app(repository: JobRepository) -> Iterator[Celery]:
    """An app bound to the test's repository, as `dbsched web` serves it: a beat_schedule entry, a zone."""
    app = make_app("web-schedules", beat_schedule=ENTRY, timezone="Europe/Berlin")
    bind_repository(app, repository)
    yield app
    bind_repository(app, None)


@pytest.fixture
def scheduling(repository: JobRepository, celery_app: Celery) -> Client:
    def make(token: str | None = TOKEN, **headers: str) -> TestClient:
        return TestClient(
            create_app(repository, token=token, celery_app=celery_app), headers=headers, follow_redirects=False
        )

    return make


def _form(page: str, form_id: str) -> dict[str, str]:
    """A form's fields as the page fills them (inputs and selected options; a checkbox only when checked, as a
    browser sends it, after its hidden "off")."""
    form = page.split(f'<form id="{form_id}"')[1].split("</form>")[0]
    fields: dict[str, str] = {}
    for tag in re.findall(r"<input [^>]*>", form):
        name = re.search(r'name="([^"]+)"', tag)
        value = re.search(r'value="([^"]*)"', tag)
        if name is None or ('type="checkbox"' in tag and "checked" not in tag):
            continue
        fields[name.group(1)] = html.unescape(value.group(1)) if value else ""
    for name, options in re.findall(r'<select [^>]*name="([^"]+)"[^>]*>(.*?)</select>', form):
        fields[name] = re.search(r'<option value="([^"]+)" selected', options).group(1)  # type: ignore[union-attr]
    return fields


def test_add_edit_and_remove_a_schedule_through_the_forms(
    repository: JobRepository, scheduling: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="celery_dbsched.web")
    web = _signed_in(scheduling)
    assert 'id="new-schedule" href="/schedules/new"' in web.get("/jobs").text
    blank = _form(web.get("/schedules/new").text, "schedule-form")
    assert blank["tz"] == "Europe/Berlin" and blank["enabled"] == "on" and blank["misfire"] == "run_once"
    typed = {
        **blank,
        **{"name": "reports.weekly", "task": "proj.tasks.report", "crontab": "0 7 * * 1", "args": '["weekly"]'},
        **{"kwargs": '{"format": "pdf"}', "queue": "reports", "description": "weekly PDF"},
    }
    added = web.post("/api/schedules/add", data=typed)
    assert added.status_code == 303 and added.headers["location"] == "/job?name=reports.weekly", added.text
    job = repository.lookup_job("reports.weekly")
    assert job.origin == Origin.RUNTIME and job.task == "proj.tasks.report" and job.task_args == ("weekly",)
    assert job.schedule == CrontabSchedule("0", "7", day_of_week="1", timezone="Europe/Berlin")
    assert job.task_kwargs == {"format": "pdf"} and job.task_options == {"queue": "reports"}
    page = web.get("/job?name=reports.weekly").text
    assert 'id="flash" role="status">added reports.weekly: proj.tasks.report' in page
    assert 'data-origin="runtime"' in page and 'id="edit-runtime-schedule"' in page and 'id="remove-form"' in page
    assert 'id="edit-form"' not in page  # not the code jobs' override form
    listed = web.get("/jobs").text.split('data-job="reports.weekly"')[1].split("</tr>")[0]
    assert 'class="job-origin" data-origin="runtime"' in listed

    # The edit form holds the stored values; a change of args keeps the next run, one of the schedule moves it.
    form = _form(web.get("/schedules/edit?name=reports.weekly").text, "schedule-form")
    assert (form["crontab"], form["tz"], form["args"], form["queue"]) == (
        "0 7 * * 1",
        "Europe/Berlin",
        '["weekly"]',
        "reports",
    )
    before = job.next_scheduled_run
    done = web.post("/api/schedules/edit", data={**form, "args": '["monthly"]'})
    assert done.status_code == 303 and done.headers["location"] == "/job?name=reports.weekly"
    job = repository.lookup_job("reports.weekly")
    assert job.task_args == ("monthly",) and job.next_scheduled_run == before and job.task_kwargs == {"format": "pdf"}
    assert "edited reports.weekly: changed args;" in web.get("/job?name=reports.weekly").text
    web.post("/api/schedules/edit", data={**form, "crontab": "", "every": "90"})
    job = repository.lookup_job("reports.weekly")
    assert job.schedule == IntervalSchedule(90.0) and job.next_scheduled_run != before

    # Remove: disabled with the name kept; purge: gone.
    removed = web.post("/api/schedules/remove", data={"csrf": form["csrf"], "name": "reports.weekly", "next": "/x"})
    assert removed.status_code == 303 and removed.headers["location"] == "/job?name=reports.weekly"
    assert repository.lookup_job("reports.weekly").policy.enabled is False
    purged = web.post("/api/schedules/remove", data={"csrf": form["csrf"], "name": "reports.weekly", "purge": "on"})
    assert purged.headers["location"] == "/jobs"
    assert "reports.weekly" not in {job.name for job in repository.list_jobs()}
    lines = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("dashboard: added reports.weekly: ") and "by ann (cookie)" in line for line in lines)
    assert "dashboard: purged reports.weekly and its run history by ann (cookie) from testclient" in lines


def test_a_bad_form_shows_why_keeps_what_was_typed_and_stores_nothing(
    repository: JobRepository, scheduling: Client
) -> None:
    web = _signed_in(scheduling)
    blank = _form(web.get("/schedules/new").text, "schedule-form")
    mistakes = [
        ({"every": "60", "args": "[1, 2"}, "args: not JSON"),
        ({"every": "60", "crontab": "* * * * *"}, "schedule: every and crontab given"),
        ({}, "schedule: give one schedule"),
        ({"crontab": "*/5 * *"}, "crontab: expected five fields"),
        ({"every": "60", "tz": "Mars/Olympus"}, "tz: unknown time zone 'Mars/Olympus'"),
        ({"every": "60", "kwargs": "[1]"}, "kwargs: expected a JSON object"),
    ]
    for fields, why in mistakes:
        typed = {**blank, "name": "oops", "task": "proj.typed.task", **fields}
        shown = web.post("/api/schedules/add", data=typed)
        assert shown.status_code == 400, fields
        error = re.search(r'<p id="form-error" class="error" role="alert">([^<]*)</p>', shown.text)
        assert error and html.unescape(error.group(1)).startswith(f"add failed: {why}"), (
            fields,
            shown.text,
        )
        again = _form(shown.text, "schedule-form")
        assert again["task"] == "proj.typed.task" and again["name"] == "oops"  # nothing typed is lost
        assert all(again[key] == value for key, value in fields.items())
    assert "oops" not in {job.name for job in repository.list_jobs()}


def test_schedule_api_with_the_token(repository: JobRepository, scheduling: Client) -> None:
    api = scheduling(TOKEN, authorization=f"Bearer {TOKEN}")
    added = api.post(
        "/api/schedules/add",
        json={"name": "tick", "task": "proj.tick", "every": 60, "args": [1, "two"], "kwargs": {"a": 1}},
    )
    assert added.status_code == 200, added.text
    assert added.json()["job"]["name"] == "tick" and added.json()["message"].startswith("added tick: proj.tick")
    assert (added.json()["job"]["origin"], added.json()["job"]["task"]) == ("runtime", "proj.tick")
    assert repository.lookup_job("tick").task_args == (1, "two")
    edited = api.post("/api/schedules/edit", json={"name": "tick", "queue": "fast"})
    assert edited.status_code == 200 and edited.json()["message"].startswith("edited tick: changed options;")
    tick = repository.lookup_job("tick")
    assert tick.task_options == {"queue": "fast"} and tick.task_kwargs == {"a": 1}  # only what was given

    bad = api.post("/api/schedules/add", json={"name": "bad", "task": "t", "every": 60, "headers": "x"})
    assert bad.status_code == 400 and bad.json()["error"].startswith("headers: not JSON")
    taken = api.post("/api/schedules/add", json={"name": "tick", "task": "t", "every": 60})
    assert taken.status_code == 409 and "edit" in taken.json()["error"]
    entry = api.post("/api/schedules/add", json={"name": "config.entry", "task": "t", "every": 60})
    assert entry.status_code == 409 and "beat_schedule" in entry.json()["error"]
    repository.upsert_job("coded", "in the code", every=seconds(60))
    assert api.post("/api/schedules/edit", json={"name": "coded", "every": 5}).status_code == 409
    assert api.post("/api/schedules/edit", json={"name": "nope", "every": 5}).status_code == 404
    assert api.post("/api/schedules/fly", json={"name": "tick"}).status_code == 404
    overridden = api.post("/api/jobs/edit", json={"name": "tick", "max_active": 2})
    assert overridden.status_code == 409 and "/api/schedules/edit" in overridden.json()["error"]
    assert repository.lookup_job("coded").every == seconds(60) and repository.lookup_job("tick").policy.max_active == 1
    assert {"bad", "config.entry"}.isdisjoint(job.name for job in repository.list_jobs())

    assert api.post("/api/schedules/remove", json={"name": "tick", "purge": True}).status_code == 200
    assert "tick" not in {job.name for job in repository.list_jobs()}


def test_schedule_actions_need_the_token_the_csrf_token_and_the_app(
    repository: JobRepository, scheduling: Client, celery_app: Celery
) -> None:
    add = {"name": "sneaky", "task": "proj.tick", "every": "60"}
    assert scheduling(None).post("/api/schedules/add", json=add).status_code == 403  # no token: read-only
    assert 'id="schedule-read-only"' in scheduling(None).get("/schedules/new").text
    assert scheduling(TOKEN).post("/api/schedules/add", json=add).status_code == 401
    web = _signed_in(scheduling)
    csrf = _csrf(web.get("/schedules/new").text)
    assert web.post("/api/schedules/add", data=add).status_code == 403  # a form on another site cannot know it
    forged = web.post("/api/schedules/add", data={**add, "csrf": csrf}, headers={"origin": "https://evil.example"})
    assert forged.status_code == 403
    assert "sneaky" not in {job.name for job in repository.list_jobs()}

    without_app = _signed_in(lambda token=None: TestClient(create_app(repository, token=token), follow_redirects=False))
    assert 'id="new-schedule"' not in without_app.get("/jobs").text
    refused = without_app.post(
        "/api/schedules/add", json=add, headers={"x-csrf-token": _page_csrf(without_app.get("/jobs").text)}
    )
    assert refused.status_code == 409 and refused.json()["error"].startswith("run-time schedules need the Celery app")


def test_code_and_beat_schedule_jobs_keep_their_override_edit(repository: JobRepository, scheduling: Client) -> None:
    repository.upsert_job("coded", "in the code", every=seconds(60))
    web = _signed_in(scheduling)
    page = web.get("/job?name=coded").text
    assert 'id="job-origin" data-origin="code"' in page and 'id="edit-form"' in page
    assert 'id="remove-form"' not in page and 'id="edit-runtime-schedule"' not in page
    refused = web.get("/schedules/edit?name=coded")
    assert refused.status_code == 409 and "its page&#39;s edit overrides its schedule" in refused.text
