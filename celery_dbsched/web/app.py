"""The dashboard's Starlette app: pages and JSON API over one `JobRepository` (`create_app`).

Reads are open when no token is configured (the dashboard is then read-only) and need the token when one is;
actions always need it, and pass the CSRF checks (`auth`). Every query is bounded and keyset-paged
(`JobRepository.jobs_page`, `runs_page`, ...); nothing counts the runs table."""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import display, observe, schedule_input
from ..controls import trigger
from ..errors import DatabaseError, DatabaseUnavailable, DbschedError, JobNotFound, NameTaken, RunNotFound
from ..records import JobRecord
from ..registry import app_timezone
from ..repository import JobRepository
from ..runtime import add_schedule, remove_schedule, update_schedule
from ..schedules import CrontabSchedule, IntervalSchedule
from ..settings import parse_backoff, parse_bool, parse_duration
from ..statements import JOB_FILTERS
from ..states import JobKind, Misfire, Origin, RunState
from . import present
from .auth import CSRF_FIELD, CSRF_HEADER, NO_TOKEN, SESSION_COOKIE, SESSION_SECONDS, Auth, Identity, cross_site

logger = logging.getLogger("celery_dbsched.web")

HERE = Path(__file__).parent
PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
ACTIVE_LIMIT = 200
RECENT_PER_JOB = 20
FLASH_COOKIE = "dbsched_flash"
LATE_AFTER = dt.timedelta(minutes=1)
LAG_POLL = 5  # seconds between the fleet page's polls of /api/status (its claim lag line's samples)
SECURITY_HEADERS = {
    # Everything the page loads is served here: no CDN, no inline script.
    "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}

Handler = Callable[[Request], Awaitable[Response]]
FormError = Callable[[Request, dict[str, Any], str], Awaitable[Response]]
NO_APP = (
    "run-time schedules need the Celery app (its timezone, and the names its code and beat_schedule own): serve "
    "the dashboard with `celery -A proj dbsched web`"
)


class BadRequest(ValueError):
    """A query parameter or form field the dashboard cannot read: 400 with the message."""


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    env.filters["when"] = lambda value: display.when(value)
    env.filters["duration"] = display.duration
    env.filters["schedule_words"] = display.schedule_words
    env.filters["schedule"] = display.schedule
    env.filters["percent"] = lambda value: "-" if value is None else f"{value * 100:.0f}%"
    env.filters["error_summary"] = present.error_summary
    env.globals["run_duration"] = lambda run, now: (
        "-" if run.start_time is None else display.duration((run.end_time or now) - run.start_time)
    )
    env.globals["relative"] = display.relative
    env.globals["ago"] = display.ago
    env.globals["quote"] = lambda value: quote(str(value), safe="")
    return env


# -- reading requests ---------------------------------------------------------------------------------------


def _text(params: Mapping[str, Any], key: str) -> str | None:
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{key}: expected text, got {value!r}")
    return value.strip() or None


def _int(params: Mapping[str, Any], key: str, default: int | None, low: int, high: int) -> int | None:
    value = params.get(key)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{key}: expected a whole number, got {value!r}") from None
    if not low <= number <= high:
        raise BadRequest(f"{key}: expected {low} to {high}, got {number}")
    return number


def _time(params: Mapping[str, Any], key: str, now: dt.datetime) -> dt.datetime | None:
    value = _text(params, key)
    if value is None:
        return None
    try:
        return display.parse_since(value, now)
    except ValueError as exc:
        raise BadRequest(str(exc).replace("--since", key)) from None


def _choice(params: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str | None:
    value = _text(params, key)
    if value is not None and value not in choices:
        raise BadRequest(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


async def _fields(request: Request) -> tuple[dict[str, Any], bool]:
    """An action's fields, from a form or a JSON object, and whether it came from a form (a page)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            data = await request.json()
        except ValueError:
            raise BadRequest("the body is not JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        return data, False
    if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await request.form()
        return {key: value for key, value in form.items() if isinstance(value, str)}, True
    return {}, False


def _page_url(path: str, params: Mapping[str, Any], key: str, value: object) -> str | None:
    """The next page's link: the same query with the keyset `key` set to `value` (None: no next page)."""
    if value is None:
        return None
    return f"{path}?" + urlencode({**{k: v for k, v in params.items() if k != key}, key: value})


def _back(path: str | None, default: str) -> str:
    """A same-site path to return to (never another site: `//host` or a scheme)."""
    if path and path.startswith("/") and not path.startswith("//") and "\\" not in path:
        return path
    return default


# -- the edit form -------------------------------------------------------------------------------------------


def _duration_field(key: str, value: object) -> dt.timedelta | None:
    if value is None or value == "":
        return None
    return parse_duration(key, value, None)


def edit_changes(job: JobRecord, values: Mapping[str, Any]) -> dict[str, Any]:
    """The `JobDefinition` fields an edit sets, from the fields given (a missing key: unchanged). ValueError
    naming the field for a value it cannot read; the definition checks the rest."""
    changed: dict[str, Any] = {}
    if "schedule" in values:
        text = str(values["schedule"] or "").strip()
        zone = str(values.get("timezone") or "UTC").strip()
        fields = text.split()
        if not text:
            if job.schedule is not None:
                raise ValueError("schedule: give seconds (an interval) or five crontab fields")
        elif len(fields) == 5:
            minute, hour, day_of_month, month_of_year, day_of_week = fields
            changed["schedule"] = CrontabSchedule(minute, hour, day_of_week, day_of_month, month_of_year, zone)
        elif len(fields) == 1:
            interval = _duration_field("schedule", text)
            if interval is None:
                raise ValueError("schedule: an interval must be more than 0 seconds")
            if job.schedule is None:
                changed["every"] = interval
            else:
                changed["schedule"] = IntervalSchedule(interval.total_seconds())
        else:
            raise ValueError(f"schedule: give seconds (an interval) or five crontab fields, got {text!r}")
    policy: dict[str, Any] = {}
    if "enabled" in values:
        value = values["enabled"]
        policy["enabled"] = value if isinstance(value, bool) else str(value).lower() in ("on", "true", "1", "yes")
    if "misfire" in values:
        if values["misfire"] not in set(Misfire):
            raise ValueError(f"misfire: one of {', '.join(Misfire)}, got {values['misfire']!r}")
        policy["misfire"] = Misfire(values["misfire"])
    for key in ("misfire_grace", "expires"):
        if key in values:
            policy[key] = _duration_field(key, values[key])
    if "max_active" in values:
        try:
            policy["max_active"] = int(values["max_active"])
        except (TypeError, ValueError):
            raise ValueError(f"max_active: a whole number from 1 to 1000, got {values['max_active']!r}") from None
    if "retry_backoff_base" in values or "retry_backoff_cap" in values:
        base, cap = values.get("retry_backoff_base"), values.get("retry_backoff_cap")
        empty = (None, "")
        policy["retry_backoff"] = (
            None if base in empty and cap in empty else parse_backoff("retry_backoff", (base or 0, cap or None))
        )
    if policy:
        changed["policy"] = dataclasses.replace(job.policy, **policy)
    if "interrupt_threshold" in values:
        changed["interrupt_threshold"] = _duration_field("interrupt_threshold", values["interrupt_threshold"])
    return changed


# -- the app -------------------------------------------------------------------------------------------------


class Dashboard:
    """The handlers, over one repository."""

    def __init__(self, repository: JobRepository, auth: Auth, app: Any = None) -> None:
        self.repository = repository
        self.auth = auth
        self.app = app  # the Celery app: run-time schedules (add, edit, remove) need it
        self.env = _environment()

    # -- plumbing

    async def read(self, call: Callable[[], Any]) -> Any:
        return await run_in_threadpool(call)

    def render(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        identity = request.state.identity
        context.setdefault("nav", "")
        flash = request.cookies.get(FLASH_COOKIE)
        flash = None if flash is None else unquote(flash)
        body = self.env.get_template(template).render(
            request=request,
            identity=identity,
            token_enabled=self.auth.enabled,
            can_act=identity is not None,
            can_schedule=identity is not None and self.app is not None,
            csrf=self.auth.csrf_token(identity),
            csrf_field=CSRF_FIELD,
            flash=flash,
            here=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            **context,
        )
        response = HTMLResponse(body, status_code=status)
        if FLASH_COOKIE in request.cookies:
            response.delete_cookie(FLASH_COOKIE, path="/")
        return response

    def page(self, handler: Handler) -> Handler:
        """A page: with a token configured, only for a signed-in operator (else to the login page)."""

        async def wrapped(request: Request) -> Response:
            request.state.identity = self.auth.identify(request)
            if self.auth.enabled and request.state.identity is None:
                here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/login?{urlencode({'next': here})}", status_code=303)
            try:
                return await handler(request)
            except (ValueError, DbschedError) as exc:
                return self.render(request, "error.html", status=_status_of(exc), message=str(exc))

        return wrapped

    def api(self, handler: Handler) -> Handler:
        """A JSON read: with a token configured, only with credentials (401 otherwise)."""

        async def wrapped(request: Request) -> Response:
            request.state.identity = self.auth.identify(request)
            if self.auth.enabled and request.state.identity is None:
                return _unauthorized()
            try:
                return await handler(request)
            except (ValueError, DbschedError) as exc:
                return JSONResponse({"error": str(exc)}, status_code=_status_of(exc))

        return wrapped

    def action(
        self,
        name: str,
        do: Callable[[Request, dict[str, Any], Identity], Awaitable[tuple[str, Any]]],
        form_error: FormError | None = None,
    ) -> Handler:
        """An action: a token configured (else 403), credentials (else 401), not cross-site and with the
        session's CSRF token (else 403); logged with who did it. From a page's form: back to the page (its
        `next`), or on failure `form_error`'s page (the form again, as typed) when given."""

        async def wrapped(request: Request) -> Response:
            identity = request.state.identity = self.auth.identify(request)
            address = request.client.host if request.client else "-"
            what = request.path_params.get("verb", name)
            values: dict[str, Any] = {}
            from_form = False
            try:
                if not self.auth.enabled:
                    raise Refused(403, NO_TOKEN)
                if identity is None:
                    raise Refused(401, "authentication required: sign in with the dashboard's token")
                reason = cross_site(request)
                if reason is not None:
                    raise Refused(403, f"cross-site request refused ({reason})")
                values, from_form = await _fields(request)
                given = request.headers.get(CSRF_HEADER) or values.get(CSRF_FIELD)
                if not self.auth.csrf_ok(identity, given if isinstance(given, str) else None):
                    raise Refused(403, "missing or wrong CSRF token: reload the page and try again")
                message, payload = await do(request, values, identity)
            except Refused as refused:
                logger.warning(
                    "dashboard: %s refused for %s from %s: %s", what, _who(identity), address, refused.message
                )
                if refused.status == 401:
                    return _unauthorized(refused.message)
                return JSONResponse({"error": refused.message}, status_code=refused.status)
            except (ValueError, DbschedError) as exc:
                logger.warning("dashboard: %s by %s from %s failed: %s", what, _who(identity), address, exc)
                if from_form and form_error is not None:
                    return await form_error(request, values, f"{what} failed: {exc}")
                if from_form:
                    return self._back_with(values, f"{what} failed: {exc}")
                return JSONResponse({"error": str(exc)}, status_code=_status_of(exc))
            logger.warning("dashboard: %s by %s from %s", message, _who(identity), address)
            if from_form:
                return self._back_with(values, message)
            return JSONResponse({"ok": True, "message": message, **payload})

        return wrapped

    def _back_with(self, values: Mapping[str, Any], message: str) -> Response:
        response = RedirectResponse(_back(_text(values, "next"), "/jobs"), status_code=303)
        response.set_cookie(FLASH_COOKIE, quote(message[:500]), max_age=60, httponly=True, samesite="strict")
        return response

    # -- pages and their JSON

    def _jobs_query(self, params: Mapping[str, Any]) -> dict[str, Any]:
        sort = _choice(params, "sort", ("name", "-name", "next_run", "-next_run")) or "name"
        after = _text(params, "after")
        query: dict[str, Any] = {
            "search": _text(params, "q"),
            "state": _choice(params, "state", JOB_FILTERS),
            "sort": sort.lstrip("-"),
            "descending": sort.startswith("-"),
            "limit": _int(params, "limit", PAGE_SIZE, 1, MAX_PAGE_SIZE),
        }
        try:
            query["after"] = None if after is None else present.decode_cursor(after, sort.lstrip("-"))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return query

    def _read_jobs(self, query: dict[str, Any]) -> dict[str, Any]:
        limit = query["limit"]
        rows = self.repository.jobs_page(**{**query, "limit": limit + 1}, late_after=LATE_AFTER)
        jobs = rows[:limit]
        recent = self.repository.recent_runs([job.name for job in jobs], RECENT_PER_JOB)
        now = self.repository.database_now()
        sort = query["sort"]
        following = present.job_cursor(jobs[-1], sort) if len(rows) > limit else None
        return {"jobs": jobs, "recent": recent, "now": now, "next": following}

    async def jobs_page(self, request: Request) -> Response:
        params = request.query_params
        query = self._jobs_query(params)
        data = await self.read(lambda: self._read_jobs(query))
        rows = [
            {
                "job": job,
                "state": present.job_state(job, data["now"], LATE_AFTER),
                "recent": data["recent"][job.name],
                "rate": present.success_rate(data["recent"][job.name]),
                "spark": present.sparkline_points(present.durations(data["recent"][job.name])),
            }
            for job in data["jobs"]
        ]
        next_url = _page_url("/jobs", params, "after", data["next"])
        return self.render(
            request,
            "jobs.html",
            rows=rows,
            now=data["now"],
            params=params,
            next_url=next_url,
            nav="jobs",
            spark=(present.SPARK_WIDTH, present.SPARK_HEIGHT),
        )

    async def jobs_api(self, request: Request) -> Response:
        query = self._jobs_query(request.query_params)
        data = await self.read(lambda: self._read_jobs(query))
        jobs = [present.job_json(job, data["now"], LATE_AFTER, data["recent"][job.name]) for job in data["jobs"]]
        return JSONResponse({"jobs": jobs, "next": data["next"]})

    def _read_job(self, name: str, before: int | None, limit: int) -> dict[str, Any]:
        job = self.repository.lookup_job(name)
        return {
            "job": job,
            "active": self.repository.active_runs_of(name, ACTIVE_LIMIT),
            # The active runs are listed live above it: the history is the ended ones.
            "history": self.repository.runs_page(job_name=name, before=before, limit=limit, ended_only=True),
            "now": self.repository.database_now(),
        }

    def _job_params(self, params: Mapping[str, Any]) -> tuple[str, int | None, int]:
        name = _text(params, "name")
        if name is None:
            raise BadRequest("name: which job? e.g. /job?name=nightly-report")
        before = _int(params, "before", None, 1, 2**62)
        limit = _int(params, "limit", PAGE_SIZE, 1, MAX_PAGE_SIZE)
        assert limit is not None
        return name, before, limit

    async def job_page(self, request: Request) -> Response:
        name, before, limit = self._job_params(request.query_params)
        data = await self.read(lambda: self._read_job(name, before, limit))
        history = data["history"]
        job = data["job"]
        schedule_text, zone = present.schedule_field(job)
        next_url = _page_url("/job", {"name": name}, "before", history.next_before)
        return self.render(
            request,
            "job.html",
            job=job,
            state=present.job_state(job, data["now"], LATE_AFTER),
            slots=present.next_slots(job),
            active=data["active"],
            history=history.runs,
            next_url=next_url,
            now=data["now"],
            schedule_text=schedule_text,
            schedule_zone=zone,
            editable_schedule=job.schedule is None or job.schedule.spec()["type"] not in ("solar", "clocked"),
            misfires=[m.value for m in Misfire],
            is_task=job.kind == JobKind.TASK,
            is_runtime=job.origin == Origin.RUNTIME,
            origin_words=present.ORIGIN_WORDS[job.origin],
            nav="jobs",
        )

    async def job_api(self, request: Request) -> Response:
        name, before, limit = self._job_params(request.query_params)
        data = await self.read(lambda: self._read_job(name, before, limit))
        now, history = data["now"], data["history"]
        return JSONResponse(
            {
                "job": present.job_json(data["job"], now, LATE_AFTER),
                "next_slots": [present.iso(slot) for slot in present.next_slots(data["job"])],
                "active": [present.run_json(run, now) for run in data["active"]],
                "runs": [present.run_json(run, now) for run in history.runs],
                "next": history.next_before,
            }
        )

    def _runs_query(self, params: Mapping[str, Any], now: dt.datetime) -> dict[str, Any]:
        return {
            "job_name": _text(params, "job"),
            "status": _choice(params, "status", tuple(RunState)),
            "worker": _text(params, "worker"),
            "since": _time(params, "since", now),
            "until": _time(params, "until", now),
            "before": _int(params, "before", None, 1, 2**62),
            "limit": _int(params, "limit", PAGE_SIZE, 1, MAX_PAGE_SIZE),
        }

    def _read_runs(self, params: Mapping[str, Any], with_active: bool) -> dict[str, Any]:
        now = self.repository.database_now()
        query = self._runs_query(params, now)
        # With the active runs listed live above it, the history holds the ended ones (unless a status is asked).
        page = self.repository.runs_page(**query, ended_only=with_active and query["status"] is None)
        active = self.repository.active_runs_of(query["job_name"], ACTIVE_LIMIT) if with_active else []
        return {"runs": page.runs, "active": active, "now": now, "next": page.next_before}

    async def runs_page(self, request: Request) -> Response:
        params = request.query_params
        data = await self.read(lambda: self._read_runs(params, True))
        next_url = _page_url("/runs", params, "before", data["next"])
        return self.render(
            request,
            "runs.html",
            **data,
            params=params,
            next_url=next_url,
            statuses=[s.value for s in RunState],
            nav="runs",
        )

    async def runs_api(self, request: Request) -> Response:
        data = await self.read(lambda: self._read_runs(request.query_params, False))
        return JSONResponse(
            {"runs": [present.run_json(run, data["now"]) for run in data["runs"]], "next": data["next"]}
        )

    async def active_api(self, request: Request) -> Response:
        """The live list: what the pages poll to move their progress bars."""
        job_name = _text(request.query_params, "job")

        def read() -> tuple[list[Any], dt.datetime]:
            return self.repository.active_runs_of(job_name, ACTIVE_LIMIT), self.repository.database_now()

        runs, now = await self.read(read)
        return JSONResponse({"runs": [present.run_json(run, now) for run in runs], "now": present.iso(now)})

    async def fleet_page(self, request: Request) -> Response:
        status = await self.read(lambda: observe.status(self.repository))
        return self.render(request, "fleet.html", report=status, now=status.now, nav="fleet", lag_poll=LAG_POLL)

    async def status_api(self, request: Request) -> Response:
        """What `dbsched status --json` prints (`observe.Status.as_json`): one shape, one read."""
        status = await self.read(lambda: observe.status(self.repository))
        return JSONResponse(status.as_json())

    # -- sign in

    async def login_page(self, request: Request) -> Response:
        request.state.identity = self.auth.identify(request)
        return self.render(request, "login.html", next=_back(request.query_params.get("next"), "/jobs"), error=None)

    async def login(self, request: Request) -> Response:
        request.state.identity = None
        address = request.client.host if request.client else "-"
        form = await request.form()
        token, user = str(form.get("token") or ""), str(form.get("user") or "").strip()[:64] or "operator"
        back = _back(str(form.get("next") or ""), "/jobs")
        reason = cross_site(request)
        if reason is not None or not self.auth.enabled or not self.auth.is_token(token):
            why = (
                f"cross-site request refused ({reason})"
                if reason
                else (NO_TOKEN if not self.auth.enabled else "wrong token")
            )
            logger.warning("dashboard: sign-in refused for %s from %s: %s", user, address, why)
            return self.render(
                request, "login.html", status=403 if reason or not self.auth.enabled else 401, next=back, error=why
            )
        logger.warning("dashboard: %s signed in from %s", user, address)
        response = RedirectResponse(back, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            self.auth.session_cookie(user),
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def logout(self, request: Request) -> Response:
        if cross_site(request) is not None:
            return JSONResponse({"error": "cross-site request refused"}, status_code=403)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # -- actions

    async def job_action(self, request: Request, values: dict[str, Any], identity: Identity) -> tuple[str, Any]:
        verb = request.path_params["verb"]
        name = _text(values, "name")
        if name is None:
            raise BadRequest("name: which job?")
        if verb == "trigger":
            job = await self.read(lambda: trigger(self.repository, name))
            message = f"triggered {name}"
        elif verb in ("pause", "resume"):
            job = await self.read(lambda: self.repository.set_paused(name, verb == "pause"))
            message = f"{verb}d {name}"
        elif verb == "edit":

            def edit() -> JobRecord:
                stored = self.repository.lookup_job(name)
                if stored.origin == Origin.RUNTIME:
                    raise DbschedError(
                        f"{name} is a run-time schedule: change it with its schedule form "
                        f"(/schedules/edit?name={quote(name, safe='')}) or POST /api/schedules/edit"
                    )
                changes = edit_changes(stored, values)
                return self.repository.edit_job(name, **changes) if changes else self.repository.lookup_job(name)

            job = await self.read(edit)
            message = (
                f"edited {name}: schedule {display.schedule(job)}, next run {display.when(job.next_scheduled_run)} UTC"
            )
        elif verb == "revert":
            job = await self.read(lambda: self.repository.revert_job(name))
            message = f"reverted {name} to the code's declaration"
        else:
            raise Refused(404, f"no action {verb!r}; one of trigger, pause, resume, edit, revert")
        now = await self.read(self.repository.database_now)
        return message, {"job": present.job_json(job, now, LATE_AFTER)}

    # -- run-time schedules

    def _runtime_app(self) -> Any:
        if self.app is None:
            raise DbschedError(NO_APP)
        return self.app

    def _schedule_zone(self, job: JobRecord | None = None) -> str:
        """The zone a schedule's fields are read in when tz is not given: its crontab's, else the app's."""
        if job is not None and isinstance(job.schedule, CrontabSchedule):
            return job.schedule.timezone
        return app_timezone(self._runtime_app())

    def _schedule_form(
        self,
        request: Request,
        mode: str,
        values: Mapping[str, Any],
        name: str = "",
        error: str | None = None,
        status: int = 200,
    ) -> HTMLResponse:
        return self.render(
            request,
            "schedule.html",
            status=status,
            mode=mode,
            name=name,
            values={key: str(values.get(key) or "") for key in schedule_input.FIELDS},
            error=error,
            misfires=[m.value for m in Misfire],
            nav="jobs",
        )

    async def new_schedule_page(self, request: Request) -> Response:
        zone = self._schedule_zone()
        defaults = {"tz": zone, "enabled": "on", "misfire": Misfire.RUN_ONCE.value, "max_active": "1"}
        return self._schedule_form(request, "add", defaults)

    async def edit_schedule_page(self, request: Request) -> Response:
        name = _text(request.query_params, "name")
        if name is None:
            raise BadRequest("name: which schedule? e.g. /schedules/edit?name=nightly-report")
        self._runtime_app()
        job = await self.read(lambda: self.repository.lookup_job(name))
        if job.origin != Origin.RUNTIME:
            raise DbschedError(
                f"{name} comes from {present.ORIGIN_WORDS[job.origin]}, not from run time: change it there; its "
                "page's edit overrides its schedule and policies"
            )
        return self._schedule_form(request, "edit", present.schedule_form(job, self._schedule_zone()), name=name)

    async def schedule_form_error(self, request: Request, values: dict[str, Any], message: str) -> Response:
        """A failed add or edit from the form: the form again with what was typed, and why (nothing stored)."""
        verb = request.path_params.get("verb")
        if verb not in ("add", "edit"):
            return self._back_with(values, message)
        name = _text(values, "name") or ""
        return self._schedule_form(request, verb, values, name=name, error=message, status=400)

    async def schedule_action(self, request: Request, values: dict[str, Any], identity: Identity) -> tuple[str, Any]:
        """Add, edit or remove a run-time schedule (`runtime`), from the schedule form or JSON (an edit's JSON
        changes the fields it gives; the form gives them all, and what equals the stored value is no change)."""
        verb = request.path_params["verb"]
        if verb not in ("add", "edit", "remove"):
            raise Refused(404, f"no action {verb!r}; one of add, edit, remove")
        app = self._runtime_app()
        name = _text(values, "name")
        if name is None:
            raise BadRequest("name: which schedule?")
        page = "/job?name=" + quote(name, safe="")
        if verb == "add":
            keywords = schedule_input.for_add(schedule_input.read_fields(values, self._schedule_zone()))
            job = await self.read(lambda: add_schedule(app, name, **keywords))
            message = f"added {name}: {display.task_summary(job)}; {_next_run(job)}"
        elif verb == "edit":

            def edit() -> tuple[JobRecord, dict[str, Any]]:
                stored = self.repository.lookup_job(name)
                fields = schedule_input.read_fields(values, self._schedule_zone(stored))
                changes = schedule_input.changes_for(stored, fields)
                return (update_schedule(app, name, **changes) if changes else stored), changes

            job, changes = await self.read(edit)
            changed = ", ".join(sorted(changes)) if changes else "nothing (the same values)"
            message = f"edited {name}: changed {changed}; {_next_run(job)}"
        else:
            purge = parse_bool("purge", values.get("purge"), False)
            job = await self.read(lambda: remove_schedule(app, name, purge=purge))
            message = f"purged {name} and its run history" if purge else f"removed {name}: disabled, its history kept"
            page = "/jobs" if purge else page
        values["next"] = page  # a form goes on to the job's page (the list once purged)
        now = await self.read(self.repository.database_now)
        return message, {"job": present.job_json(job, now, LATE_AFTER)}

    async def cancel_run(self, request: Request, values: dict[str, Any], identity: Identity) -> tuple[str, Any]:
        try:
            run_id = int(request.path_params["run_id"])
        except ValueError:
            raise BadRequest("run id: a whole number") from None
        detail = f"by {identity.user} (dashboard)"
        run = await self.read(lambda: self.repository.cancel_run(run_id, detail))
        now = await self.read(self.repository.database_now)
        return f"cancelled run {run.id} of {run.job_name}", {"run": present.run_json(run, now)}


def _next_run(job: JobRecord) -> str:
    if not job.policy.enabled:
        return "disabled: not run until enabled"
    return f"next run {display.when(job.next_scheduled_run)} UTC"


def _status_of(exc: Exception) -> int:
    """The HTTP status of an error: what was asked cannot be read (400), does not exist (404), is not possible
    now (409: a name taken too), or the database is down (503)."""
    if isinstance(exc, NameTaken):
        return 409
    if isinstance(exc, ValueError):
        return 400
    if isinstance(exc, (JobNotFound, RunNotFound)):
        return 404
    if isinstance(exc, DatabaseUnavailable):
        return 503
    return 500 if isinstance(exc, DatabaseError) else 409


def _who(identity: Identity | None) -> str:
    return "nobody" if identity is None else f"{identity.user} ({identity.via})"


def _unauthorized(message: str = "authentication required: the dashboard's token, as HTTP basic or bearer") -> Response:
    return JSONResponse({"error": message}, status_code=401, headers={"www-authenticate": 'Basic realm="dbsched"'})


class _Guarded:
    """An ASGI app behind the dashboard's token (when one is configured): 401 without it."""

    def __init__(self, app: ASGIApp, auth: Auth) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.auth.enabled and self.auth.identify(Request(scope)) is None:
            await _unauthorized()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _metrics_routes(repository: JobRepository, auth: Auth) -> list[Route]:
    """/metrics (issue 12 §4), when `celery_dbsched.metrics` and its prometheus-client are installed; behind
    the token like every other endpoint (Prometheus: `authorization: {credentials: TOKEN}`)."""
    try:
        metrics = importlib.import_module("celery_dbsched.metrics")
    except ImportError:
        return []
    return [Route("/metrics", _Guarded(metrics.metrics_app(repository), auth))]


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response (an ASGI middleware)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    headers.setdefault(key, value)
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(repository: JobRepository, *, token: str | None = None, celery_app: Any = None) -> Starlette:
    """The dashboard over `repository`. `token`: actions (and reads) need it; None: read-only, open reads.
    `celery_app`: the Celery app bound to `repository`, for the run-time schedules' actions (None: refused)."""
    board = Dashboard(repository, Auth(token), celery_app)

    async def home(request: Request) -> Response:
        return RedirectResponse("/jobs", status_code=303)

    routes = [
        Route("/", home),
        Route("/jobs", board.page(board.jobs_page)),
        Route("/job", board.page(board.job_page)),
        Route("/runs", board.page(board.runs_page)),
        Route("/fleet", board.page(board.fleet_page)),
        Route("/schedules/new", board.page(board.new_schedule_page)),
        Route("/schedules/edit", board.page(board.edit_schedule_page)),
        Route("/login", board.login_page, methods=["GET"]),
        Route("/login", board.login, methods=["POST"]),
        Route("/logout", board.logout, methods=["POST"]),
        Route("/api/jobs", board.api(board.jobs_api)),
        Route("/api/job", board.api(board.job_api)),
        Route("/api/runs", board.api(board.runs_api)),
        Route("/api/runs/active", board.api(board.active_api)),
        Route("/api/status", board.api(board.status_api)),
        Route("/api/jobs/{verb}", board.action("job action", board.job_action), methods=["POST"]),
        Route("/api/runs/{run_id}/cancel", board.action("cancel", board.cancel_run), methods=["POST"]),
        Route(
            "/api/schedules/{verb}",
            board.action("schedule action", board.schedule_action, board.schedule_form_error),
            methods=["POST"],
        ),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        *_metrics_routes(repository, board.auth),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)])
    app.state.dashboard = board
    return app
