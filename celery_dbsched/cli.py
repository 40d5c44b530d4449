"""`celery -A proj dbsched ...`: migrate the schema, read jobs and runs, and control jobs without writing SQL.
How things are shown (times, durations, tables) is `display`; what the controls do is `controls`."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
from collections.abc import Callable
from typing import Any

import click
from sqlalchemy.engine import make_url

from . import display, observe, schedule_input
from .binding import repository_for
from .controls import cancel_job, pause_job, remove_job, resume_job, trigger_job
from .errors import DbschedError, FieldError, JobNotFound, NameTaken
from .migrate import current_revision, head_revision, migrate
from .observe import Server, Status
from .records import JobRecord, RunRecord
from .registry import app_timezone
from .repository import JobRepository
from .runtime import add_schedule, remove_schedule, update_schedule
from .schedules import CrontabSchedule, parse_timezone
from .settings import Settings, mask_database_url, parse_web_token, settings_for
from .states import JobKind, Misfire, Origin, RunState

_HISTORY_NOT_KEPT = "not kept: a run stores its latest progress only (completed/total above)"


def _repository(ctx: click.Context) -> JobRepository:
    app = ctx.obj.app
    try:
        return repository_for(app, Settings.from_mapping(app.conf))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


def _existing_repository(ctx: click.Context) -> JobRepository:
    """The repository of a command that reads or changes what is stored: on SQLite, a database file that does
    not exist is an error, and nothing is created (it would hold nothing, and a wrong path would go unnoticed).
    The settings are checked first, so that a bad one is what is reported."""
    try:
        url = make_url(Settings.from_mapping(ctx.obj.app.conf).database_url)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    path = url.database or ""
    if url.get_backend_name() != "sqlite" or path.startswith("file:") or os.path.exists(path):
        return _repository(ctx)
    missing = _missing_folders(os.path.dirname(os.path.abspath(path)))
    try:
        _repository(ctx)  # its errors first (engine options, ...); building the engine connects to nothing
    finally:
        for folder in missing:  # but it makes the file's folder: take back what it made
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    raise click.ClickException(
        f"no database at {path} (dbsched_database_url): nothing is stored there; check the setting, "
        "or create it with `celery -A proj dbsched migrate` (workers and beats also create it at start)"
    )


def _missing_folders(folder: str) -> list[str]:
    """`folder` and those of its parents that do not exist, deepest first."""
    missing = []
    while folder and not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def _reading(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except DbschedError as exc:
        raise click.ClickException(str(exc)) from exc


def _zone(value: str) -> Any:
    try:
        return parse_timezone(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


_tz_option = click.option(
    "--tz",
    "zone",
    default="UTC",
    show_default=True,
    callback=lambda ctx, param, value: _zone(value),
    help="show times in this IANA zone (e.g. Europe/Berlin)",
)


_json_option = click.option(
    "--json", "as_json", is_flag=True, help="print JSON instead (its shape: README, Status and health)"
)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


@click.group(name="dbsched")
def dbsched() -> None:
    """celery_dbsched: the database-backed scheduler (times in UTC unless --tz)."""


@dbsched.command()
@click.pass_context
def migrate_command(ctx: click.Context) -> None:
    """Create or upgrade the scheduler's tables."""
    repository = _repository(ctx)
    url = mask_database_url(repository.engine.url)
    try:
        before = migrate(repository.engine)
    except DbschedError as exc:
        raise click.ClickException(str(exc)) from exc
    except Exception as exc:
        raise click.ClickException(f"could not migrate {url}: {exc}") from exc
    after = current_revision(repository.engine)
    if before == after:
        click.echo(f"{url}: schema already at revision {after}")
    else:
        click.echo(f"{url}: schema migrated from {before or 'nothing'} to {after} (head {head_revision()})")


migrate_command.name = "migrate"


# -- jobs -----------------------------------------------------------------------------------------------------


def _unknown_tasks(app: Any, records: list[JobRecord]) -> dict[str, str]:
    """The enabled beat_schedule entries whose task this app does not know (its modules imported as a beat's
    and worker's are), by job name: their runs are sent and never run."""
    entries = [job for job in records if job.kind == JobKind.TASK and job.policy.enabled and job.task]
    if not entries:
        return {}
    app.loader.import_default_modules()
    return {job.name: str(job.task) for job in entries if job.task not in app.tasks}


def _state(job: JobRecord, orphaned: bool, unknown: bool) -> str:
    if job.paused:
        return "paused"
    if not job.policy.enabled:
        return "disabled"
    return "orphaned" if orphaned else ("unknown-task" if unknown else "enabled")


def _last(run: RunRecord | None, now: dt.datetime) -> str:
    if run is None:
        return "-"
    if run.end_time is None:
        return f"{run.status} for {display.duration(now - (run.start_time or run.create_time))}"
    return f"{run.status} {display.ago(run.end_time, now)}"


@dbsched.command()
@_tz_option
@_json_option
@click.pass_context
def jobs(ctx: click.Context, zone: Any, as_json: bool) -> None:
    """List the jobs: state, origin (code, beat_schedule, runtime), next run, last outcome, schedule. Flags jobs
    that look removed from the code (orphaned) and plain-task entries whose task this app does not know."""
    repository = _existing_repository(ctx)
    records, now, last, orphaned = _reading(
        lambda: (repository.list_jobs(), repository.database_now(), repository.last_runs(), repository.orphaned_jobs())
    )
    unknown = _unknown_tasks(ctx.obj.app, records)
    states = {job.name: _state(job, job.name in orphaned, job.name in unknown) for job in records}
    if as_json:
        listed = [observe.job_json(job, states[job.name], last.get(job.name), now) for job in records]
        _echo_json({"now": now.isoformat(), "jobs": listed})
        return
    if not records:
        click.echo("no jobs registered")
        return
    rows = [
        [
            job.name,
            states[job.name],
            job.origin,
            display.when(job.next_scheduled_run, zone),
            states[job.name] if not job.policy.enabled or job.paused else display.relative(job.next_scheduled_run, now),
            _last(last.get(job.name), now),
            display.schedule(job) + (" (edited)" if job.overrides else ""),
            job.queue or "-",
            job.failure_count,
            job.description,
        ]
        for job in records
    ]
    headers = ["NAME", "STATE", "ORIGIN", f"NEXT RUN ({display.zone_name(zone)})", "DUE", "LAST RUN", "SCHEDULE"]
    click.echo(display.table([*headers, "QUEUE", "FAILURES", "DESCRIPTION"], rows))
    notes = [_orphaned_note(name, orphaned[name], zone) for name in sorted(orphaned) if states.get(name) == "orphaned"]
    notes += [
        f"unknown-task: {name}: this app does not know the task {task!r}: its runs are sent and never run "
        "(check the task name and the workers' imports)"
        for name, task in sorted(unknown.items())
        if states.get(name) == "unknown-task"
    ]
    notes += [
        f"edited: {job.name}: edited on the dashboard (overrides the code): {', '.join(job.edited_fields)}; "
        'its page\'s "revert to code" drops the edit'
        for job in records
        if job.overrides
    ]
    if notes:
        click.echo("\n" + "\n".join(notes))


def _orphaned_note(name: str, registered: dt.datetime | None, zone: Any) -> str:
    last = "never by a worker of this version" if registered is None else display.when(registered, zone)
    return (
        f"orphaned: {name}: last registered {last}; the workers started since do not have it in their code, "
        f"so its runs fail. Remove it: celery -A proj dbsched remove {name}"
    )


# -- runs -----------------------------------------------------------------------------------------------------


def _since(ctx: click.Context, param: Any, value: str | None) -> str | None:
    if value is not None:
        try:
            display.parse_since(value, dt.datetime.now(dt.timezone.utc))
        except ValueError as exc:
            raise click.BadParameter(str(exc).removeprefix("--since: ")) from exc
    return value


@dbsched.command()
@click.option("--job", "job_name", default=None, help="only this job's runs")
@click.option("--status", type=click.Choice([s.value for s in RunState]), default=None, help="only runs in this state")
@click.option("--since", default=None, callback=_since, help="only runs claimed since: 30m, 1h, 2d, or an ISO time")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@_tz_option
@_json_option
@click.pass_context
def runs(
    ctx: click.Context,
    job_name: str | None,
    status: str | None,
    since: str | None,
    limit: int,
    zone: Any,
    as_json: bool,
) -> None:
    """List runs, newest first: state, progress, times, duration, who claimed and ran them, errors."""
    repository = _existing_repository(ctx)

    def read() -> tuple[list[RunRecord], dt.datetime]:
        if job_name is not None:
            repository.lookup_job(job_name)
        now = repository.database_now()
        start = None if since is None else display.parse_since(since, now, zone)
        return repository.list_runs(job_name=job_name, status=status, limit=limit, since=start), now

    records, now = _reading(read)
    if as_json:
        _echo_json({"now": now.isoformat(), "runs": [observe.run_json(run, now) for run in records]})
        return
    rows = [
        [
            run.id,
            run.job_name,
            run.status,
            f"{run.completed}/{run.total}",
            display.when(run.create_time, zone),
            display.when(run.start_time, zone),
            display.when(run.end_time, zone),
            display.run_duration(run, now),
            run.claimed_by,
            run.worker or "-",
            display.error_line(run.error),
        ]
        for run in records
    ]
    label = f"({display.zone_name(zone)})"
    headers = ["ID", "JOB", "STATUS", "PROGRESS", f"CLAIMED {label}", f"STARTED {label}", f"ENDED {label}"]
    click.echo(display.table([*headers, "DURATION", "CLAIMED BY", "WORKER", "ERROR"], rows) if rows else "no runs")


@dbsched.command(name="run")
@click.argument("run_id", metavar="ID", type=click.IntRange(min=1))
@_tz_option
@_json_option
@click.pass_context
def run_command(ctx: click.Context, run_id: int, zone: Any, as_json: bool) -> None:
    """Show run ID: every field, its full error (traceback) and how long it took."""
    repository = _existing_repository(ctx)
    run, stopped, now = _reading(
        lambda: (repository.lookup_run(run_id), repository.run_stopped_time(run_id), repository.database_now())
    )
    if as_json:
        _echo_json({**observe.run_json(run, now), "stopped": None if stopped is None else stopped.isoformat()})
        return
    label = f"({display.zone_name(zone)})"
    fields: list[tuple[str, object]] = [
        ("run", run.id),
        ("job", f"{run.job_name} ({run.kind})"),
        ("status", run.status + (f" ({run.interrupt_reason})" if run.interrupt_reason else "")),
        ("progress", f"{run.completed}/{run.total}"),
        ("progress history", _HISTORY_NOT_KEPT),
        (f"scheduled for {label}", display.when(run.scheduled_for, zone)),
        (f"claimed {label}", display.when(run.create_time, zone)),
        (f"started {label}", display.when(run.start_time, zone)),
        (f"last progress {label}", display.when(run.update_time, zone)),
        (f"ended {label}", display.when(run.end_time, zone)),
        (f"code stopped {label}", display.when(stopped, zone)),
        ("duration", display.run_duration(run, now) + _unfinished(run)),
        ("claimed by", run.claimed_by),
        ("worker", run.worker or "-"),
        ("queue", run.queue or "-"),
        ("task id", run.task_id or "-"),
        ("slot", run.slot),
        (f"pull-in requested {label}", display.when(run.requested_next_run, zone)),
    ]
    width = max(len(name) for name, _ in fields) + 1
    click.echo("\n".join(f"{name + ':':<{width}} {value}" for name, value in fields))
    click.echo("error:" + ("\n" + run.error.rstrip() if run.error else " -"))


def _unfinished(run: RunRecord) -> str:
    if run.start_time is None:
        return " (not started)"
    return " (still running)" if run.end_time is None else ""


# -- status ---------------------------------------------------------------------------------------------------

EXIT_UNHEALTHY = 69  # EX_UNAVAILABLE, as `celery inspect ping` exits when no node replies


def _max_lag(ctx: click.Context, param: Any, value: str | None) -> dt.timedelta | None:
    if value is None:
        return None
    if value.strip().lower() in ("off", "none"):
        return dt.timedelta.max
    lag = display.parse_duration(value)
    if lag is None:
        raise click.BadParameter(f"expected a duration such as 90s, 5m or 1h (or off), got {value!r}")
    return lag


def _server_state(server: Server, zone: Any) -> str:
    return "alive" if server.alive else f"silent since {display.when(server.last_seen, zone)}"


def _lag(value: float | None) -> str:
    """A claim lag: milliseconds matter below a second."""
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else display.duration(value)


def _fleet_lines(status: Status, zone: Any) -> list[str]:
    label = f"({display.zone_name(zone)})"
    lines = []
    for title, servers in (("beats", status.fleet.beats), ("workers", status.fleet.workers)):
        alive = sum(server.alive for server in servers)
        lines.append(f"{title}: {alive} alive, {len(servers) - alive} silent")
        if not servers:
            continue
        headers = ["ID", "HOST", "PID", "VERSION", f"STARTED {label}", f"LAST SEEN {label}"]
        if title == "beats":
            headers += ["CLAIMS/MIN", "LAG P50", "LAG MAX", "STATE"]
        else:
            headers += ["IN FLIGHT", "STATE"]
        rows = []
        for server in servers:
            row: list[Any] = [
                server.id,
                server.host,
                server.pid,
                server.version or "-",
                display.when(server.started, zone),
                display.when(server.last_seen, zone),
            ]
            if title == "beats":
                row += [server.claims_last_minute or 0, _lag(server.claim_lag_p50), _lag(server.claim_lag_max)]
            else:
                row += ["-" if server.runs_in_flight is None else server.runs_in_flight]
            rows.append([*row, _server_state(server, zone)])
        lines += ["  " + line for line in display.table(headers, rows).splitlines()]
    return lines


def _count(listed: observe.RunList) -> str:
    return f"{listed.count}{'+' if listed.capped else ''}"


def _run_lines(title: str, listed: observe.RunList, now: dt.datetime) -> list[str]:
    lines = [f"{title}: {_count(listed)}"]
    if listed.runs:
        rows = [
            [
                run.id,
                run.job_name,
                run.status + (f" ({run.interrupt_reason})" if run.interrupt_reason else ""),
                f"{run.completed}/{run.total}",
                display.ago(run.update_time, now),
                run.worker or run.claimed_by,
                (run.error or "").strip().splitlines()[-1][:60] if run.error else "",
            ]
            for run in listed.runs
        ]
        table = display.table(["ID", "JOB", "STATUS", "PROGRESS", "LAST CHANGE", "WORKER", "ERROR"], rows)
        lines += ["  " + line for line in table.splitlines()]
        if listed.count > len(listed.runs):
            lines.append(f"  ... and {listed.count - len(listed.runs)} more")
    return lines


def _status_text(status: Status, zone: Any, problems: list[str]) -> str:
    due = status.due
    lines = _fleet_lines(status, zone)
    if due.count:
        lines.append(
            f"due and not claimed: {due.count}{'+' if due.capped else ''} job(s); the oldest, {due.earliest_job}, "
            f"has waited {display.duration(due.lateness)}"
        )
    else:
        lines.append("due and not claimed: 0")
    lines += _run_lines("active runs", status.active, status.now)
    lines += _run_lines(
        "stalled runs (past their interrupt threshold, not interrupted yet)", status.stalled, status.now
    )
    lines += _run_lines("failures in the last hour", status.failures, status.now)
    if status.orphaned:
        lines.append(f"orphaned jobs: {', '.join(sorted(status.orphaned))} (see `dbsched jobs`)")
    lines.append("healthy" if not problems else f"unhealthy: {len(problems)} problem(s)")
    return "\n".join(lines)


@dbsched.command()
@click.option(
    "--max-lag",
    callback=_max_lag,
    default=None,
    help="unhealthy when a due job has waited longer than this (90s, 5m, 1h; off) "
    "[default: the interrupt threshold plus the monitor interval]",
)
@_tz_option
@_json_option
@click.pass_context
def status(ctx: click.Context, max_lag: dt.timedelta | None, zone: Any, as_json: bool) -> None:
    """The scheduler at a glance: beats and workers, due jobs not claimed, active, stalled and failed runs.

    Exit status, for liveness and readiness probes: 0 healthy; 69 unhealthy (no beat alive, or a due job has
    waited longer than --max-lag), with one line per reason on stderr; 1 error (the database cannot be read);
    2 usage."""
    repository = _existing_repository(ctx)
    if max_lag is None:
        settings = settings_for(ctx.obj.app)
        max_lag = settings.interrupt_threshold + settings.monitor_interval
    lag = None if max_lag == dt.timedelta.max else max_lag
    current: Status = _reading(lambda: observe.status(repository))
    problems = current.problems(lag)
    if as_json:
        _echo_json(current.as_json(lag))
    else:
        click.echo(_status_text(current, zone, problems))
    for problem in problems:
        click.echo(f"unhealthy: {problem}", err=True)
    if problems:
        ctx.exit(EXIT_UNHEALTHY)


# -- watch ----------------------------------------------------------------------------------------------------


@dbsched.command()
@click.option("--job", "job_name", default=None, help="only this job's runs")
@click.option("--once", is_flag=True, help="print one frame and exit (for scripts)")
@click.option(
    "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help="seconds between refreshes"
)
@_tz_option
@click.pass_context
def watch(ctx: click.Context, job_name: str | None, once: bool, interval: float, zone: Any) -> None:
    """Watch the scheduler live: the fleet, active runs with their progress, the latest outcomes (Ctrl-C ends)."""
    try:
        from . import watch as view
    except ImportError as exc:
        raise click.ClickException(
            f"dbsched watch needs rich ({exc}); install it: pip install 'celery-dbsched[watch]'"
        ) from exc
    repository = _existing_repository(ctx)
    if job_name is not None:
        _reading(lambda: repository.lookup_job(job_name))
    _reading(
        lambda: view.watch(
            lambda: view.render(repository.watch_frame(job_name), zone, job_name), interval=interval, once=once
        )
    )


# -- controls -------------------------------------------------------------------------------------------------

# The simple control commands: name, the function in controls.py, help, and what each prints on success.
_CONTROL_COMMANDS: list[tuple[str, Callable[[Any, str], Any], str, Callable[[str, Any], str]]] = [
    ("pause", pause_job, "Stop claiming job NAME (its running run goes on).", lambda name, _: f"paused {name}"),
    (
        "resume",
        resume_job,
        "Claim job NAME again, from its next slot.",
        lambda name, job: f"resumed {name}; next run {display.when(job.next_scheduled_run)} UTC",
    ),
    ("trigger", trigger_job, "Run job NAME now.", lambda name, _: f"triggered {name}"),
]


def _control(ctx: click.Context, action: Callable[[Any, str], Any], name: str) -> Any:
    _existing_repository(ctx)  # validates the settings first, with a clear message
    try:
        return action(ctx.obj.app, name)
    except (DbschedError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


def _add_control_command(
    command_name: str, action: Callable[[Any, str], Any], help_text: str, report: Callable[[str, Any], str]
) -> None:
    @click.argument("name")
    @click.pass_context
    def control(ctx: click.Context, name: str) -> None:
        click.echo(report(name, _control(ctx, action, name)))

    dbsched.command(name=command_name, help=help_text)(control)


for _spec in _CONTROL_COMMANDS:
    _add_control_command(*_spec)


def _cancel_report(run: RunRecord, monitor_interval: dt.timedelta) -> str:
    if run.start_time is None:
        return f"cancelled run {run.id} of {run.job_name}: it was queued and will not start"
    if run.kind == JobKind.TASK:
        return (
            f"cancelled run {run.id} of {run.job_name}: recorded interrupted; a plain task is not stopped on "
            f"{run.worker}"
        )
    return (
        f"cancelling run {run.id} of {run.job_name} on {run.worker}: the worker notices within its monitor "
        f"interval ({display.duration(monitor_interval)}) and the job stops at its next check of ctx.cancelled"
    )


def _wait_stopped(repository: JobRepository, run: RunRecord, timeout: float) -> str:
    started = time.monotonic()
    while True:
        if _reading(lambda: repository.run_stopped_time(run.id)) is not None:
            return f"run {run.id} of {run.job_name} stopped after {display.duration(time.monotonic() - started)}"
        if time.monotonic() - started >= timeout:
            raise click.ClickException(
                f"run {run.id} of {run.job_name} is still running on {run.worker} after {display.duration(timeout)}: "
                "the job does not check ctx.cancelled often enough, or its worker is gone (it is recorded "
                "interrupted either way)"
            )
        time.sleep(0.2)


@dbsched.command()
@click.argument("name")
@click.option("--wait", is_flag=True, help="wait until the job's code has stopped on its worker")
@click.option(
    "--timeout", type=click.FloatRange(min=0), default=300.0, show_default=True, help="seconds --wait waits at most"
)
@click.pass_context
def cancel(ctx: click.Context, name: str, wait: bool, timeout: float) -> None:
    """Interrupt the active run(s) of job NAME."""
    cancelled: list[RunRecord] = _control(ctx, cancel_job, name)
    if not cancelled:
        click.echo(f"{name} has no active run")
        return
    interval = settings_for(ctx.obj.app).monitor_interval
    for run in cancelled:
        click.echo(_cancel_report(run, interval))
    if wait:
        repository = _repository(ctx)
        for run in cancelled:
            if run.start_time is not None and run.kind == JobKind.JOB:
                click.echo(_wait_stopped(repository, run, timeout))


@dbsched.command()
@click.argument("name")
@click.option("--purge", is_flag=True, help="delete the job and its run history instead of disabling it")
@click.pass_context
def remove(ctx: click.Context, name: str, purge: bool) -> None:
    """Remove job NAME: a run-time schedule (dbsched add), or a job no longer in the code or beat_schedule.
    It is disabled (never claimed again, its history kept, the name stays taken), or with --purge deleted
    with its history."""
    ctx.obj.app.loader.import_default_modules()  # the app's job modules, as a worker imports them: is NAME declared?
    repository = _existing_repository(ctx)
    runtime = _reading(lambda: _origin(repository, name)) == Origin.RUNTIME
    action = remove_schedule if runtime else remove_job
    job: JobRecord = _control(ctx, lambda app, job_name: action(app, job_name, purge=purge), name)
    if purge:
        click.echo(f"purged {name} and its run history" + ("; the name is free again" if runtime else ""))
        return
    runs = _reading(lambda: repository.list_runs(job_name=name, limit=1))
    kept = f"its history is kept (celery -A proj dbsched runs --job {name})" if runs else "it has no runs"
    taken = f" The name stays taken: `dbsched edit {name} --enable` brings it back." if runtime else ""
    active = " Its active run goes on: celery -A proj dbsched cancel " + name + " stops it." if job.active_runs else ""
    click.echo(f"removed {name}: disabled, never claimed again; {kept}; --purge deletes it.{taken}{active}")


def _origin(repository: JobRepository, name: str) -> Origin | None:
    """Who owns job NAME (None: not stored)."""
    try:
        return repository.lookup_job(name).origin
    except JobNotFound:
        return None


# -- run-time schedules ---------------------------------------------------------------------------------------

_ISO = "an ISO time such as 2026-12-24T18:00, read in --tz unless it has an offset (+01:00, Z)"
# The options of `add` and `edit` (`edit` changes only those given), by field of `schedule_input`.
_SCHEDULE_OPTIONS = [
    click.option(
        "--task", metavar="TASK", help="the Celery task to send, by its registered name (e.g. proj.tasks.cleanup)"
    ),
    click.option("--every", metavar="SECONDS", help="run every SECONDS (or 90s, 5m, 1h, 2d); the first run is now"),
    click.option(
        "--crontab",
        metavar="'M H DOM MON DOW'",
        help="run on cron's five fields, quoted, in --tz: minute hour day-of-month month day-of-week, "
        "e.g. '*/5 * * * *' (every 5 min) or '0 2 * * 1-5' (02:00 Monday to Friday)",
    ),
    click.option("--at", metavar="TIME", help=f"run once at TIME, {_ISO}; then the job is disabled (one-off)"),
    click.option(
        "--solar",
        metavar="EVENT",
        help="run at a solar event (sunrise, sunset, solar_noon, dawn_civil, ...) at --lat/--lon",
    ),
    click.option("--lat", metavar="DEGREES", help="the latitude of --solar (-90 to 90)"),
    click.option("--lon", metavar="DEGREES", help="the longitude of --solar (-180 to 180)"),
    click.option(
        "--tz",
        metavar="ZONE",
        help="the IANA zone (e.g. Europe/Berlin) of --crontab, of --at and --start-time, and of the times printed "
        "[default: the app's timezone; edit: the crontab's]",
    ),
    click.option("--args", metavar="JSON", help="the task's positional arguments, a JSON array: '[1, \"two\"]'"),
    click.option("--kwargs", metavar="JSON", help="the task's keyword arguments, a JSON object: '{\"days\": 7}'"),
    click.option("--queue", metavar="QUEUE", help="send to this queue (edit: '' for the task's default)"),
    click.option("--routing-key", metavar="KEY", help="the message's routing key"),
    click.option("--exchange", metavar="EXCHANGE", help="the message's exchange"),
    click.option("--priority", metavar="0-255", help="the message's priority"),
    click.option("--headers", metavar="JSON", help='the message\'s headers, a JSON object: \'{"tenant": "acme"}\''),
    click.option(
        "--expires",
        metavar="SECONDS",
        help="a run not started within SECONDS of its slot is dropped (the message's expires; or 90s, 5m, 1h)",
    ),
    click.option("--description", metavar="TEXT", help="what the job is for, shown in listings"),
    click.option("--start-time", metavar="TIME", help=f"no run before TIME, {_ISO}"),
    click.option(
        "--expire-time",
        metavar="TIME",
        help=f"no run after TIME ({_ISO}): the job is disabled then (edit: '' for none)",
    ),
    click.option(
        "--misfire",
        type=click.Choice([m.value for m in Misfire]),
        help="a slot missed by more than --misfire-grace (a beat was down): run it once late, or skip it",
    ),
    click.option("--misfire-grace", metavar="SECONDS", help="how late a slot may still run (or 90s, 5m, 1h)"),
    click.option("--max-active", metavar="N", help="runs of this job at once, at most (1 to 1000; default 1)"),
]


def _schedule_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_SCHEDULE_OPTIONS):
        command = option(command)
    return command


def _field_error(exc: FieldError) -> click.BadParameter:
    return click.BadParameter(exc.reason, param_hint=f"'{exc.option}'")


def _stored(action: Callable[[], JobRecord]) -> JobRecord:
    """Store a schedule: a value the API refuses is a usage error (2), a refusal by what is stored (a name
    taken, a job not found) an error (1)."""
    try:
        return action()
    except FieldError as exc:
        raise _field_error(exc) from exc
    except NameTaken as exc:
        raise click.ClickException(str(exc)) from exc
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    except DbschedError as exc:
        raise click.ClickException(str(exc)) from exc


def _print_zone(values: dict[str, Any], default: str) -> Any:
    try:
        return parse_timezone(schedule_input.zone_of(values, default))
    except FieldError as exc:
        raise _field_error(exc) from exc


def _next_run(job: JobRecord, zone: Any, now: dt.datetime) -> str:
    if not job.policy.enabled:
        return f"none: disabled (celery -A proj dbsched edit {job.name} --enable)"
    if job.paused:
        return f"none: paused (celery -A proj dbsched resume {job.name})"
    return (
        f"{display.when(job.next_scheduled_run, zone)} {display.zone_name(zone)} "
        f"({display.relative(job.next_scheduled_run, now)})"
    )


@dbsched.command()
@click.argument("name")
@_schedule_options
@click.option("--disabled", is_flag=True, help="store it disabled: it runs once enabled (dbsched edit NAME --enable)")
@click.option("--one-off", is_flag=True, help="run once, at the first slot, then disable it (as --at does)")
@click.pass_context
def add(ctx: click.Context, /, name: str, disabled: bool, one_off: bool, **values: Any) -> None:
    """Add NAME, a schedule of a plain Celery task, stored in the database (no deploy, no beat restart):
    --task and one of --every, --crontab, --at or --solar. Running beats see it at once on PostgreSQL,
    within their run-jobs interval elsewhere.

    \b
    Examples:
      celery -A proj dbsched add cleanup --task proj.tasks.cleanup --every 5m
      celery -A proj dbsched add report --task proj.tasks.report --crontab '0 7 * * 1-5' --tz Europe/Berlin \\
          --kwargs '{"format": "pdf"}' --queue reports
      celery -A proj dbsched add launch --task proj.tasks.launch --at 2026-12-24T18:00
    """
    repository = _existing_repository(ctx)
    app = ctx.obj.app
    app.loader.import_default_modules()  # the app's own jobs and beat_schedule: their names are taken
    default_zone = app_timezone(app)
    values.update(enabled=False if disabled else None, one_off=True if one_off else None)
    try:
        keywords = schedule_input.for_add(schedule_input.read_fields(values, default_zone))
    except FieldError as exc:
        raise _field_error(exc) from exc
    zone = _print_zone(values, default_zone)
    job = _stored(lambda: add_schedule(app, name, **keywords))
    now = _reading(repository.database_now)
    click.echo(f"added {name}: {display.task_summary(job)}")
    click.echo(f"next run: {_next_run(job, zone, now)}")
    _warn_unknown_task(app, job)


@dbsched.command()
@click.argument("name")
@_schedule_options
@click.option(
    "--enable/--disable", "enabled", default=None, help="claim it again from its next slot / stop claiming it"
)
@click.option("--one-off/--repeat", "one_off", default=None, help="disable it after its next run / keep it running")
@click.pass_context
def edit(ctx: click.Context, /, name: str, **values: Any) -> None:
    """Change the run-time schedule NAME (made by dbsched add): only the options given change. A new schedule
    (or --tz) moves the next run to the new schedule's first slot; other changes keep it. Jobs of the code or of
    beat_schedule are changed there (or, their schedule and policies, on the dashboard).

    \b
    Examples:
      celery -A proj dbsched edit cleanup --every 10m
      celery -A proj dbsched edit report --kwargs '{"format": "csv"}' --queue ''
      celery -A proj dbsched edit report --disable
    """
    repository = _existing_repository(ctx)
    app = ctx.obj.app
    if all(value is None for value in values.values()):
        raise click.UsageError(f"nothing to change: give the options to change, e.g. dbsched edit {name} --every 60")
    job = _reading(lambda: repository.lookup_job(name))
    if job.origin != Origin.RUNTIME:
        raise click.ClickException(
            f"{name} comes from the app's {'code' if job.origin == Origin.CODE else 'beat_schedule'}, not from "
            f"dbsched add: change it there (or pause it: celery -A proj dbsched pause {name}); the dashboard's "
            "edit overrides its schedule and policies"
        )
    default_zone = app_timezone(app)
    if isinstance(job.schedule, CrontabSchedule):
        default_zone = job.schedule.timezone  # a new crontab keeps the zone of the one it replaces
    try:
        changes = schedule_input.changes_for(job, schedule_input.read_fields(values, default_zone))
    except FieldError as exc:
        raise _field_error(exc) from exc
    zone = _print_zone(values, default_zone)
    if changes:
        job = _stored(lambda: update_schedule(app, name, **changes))
    now = _reading(repository.database_now)
    changed = ", ".join(sorted(changes)) if changes else "nothing (it already has these values)"
    click.echo(f"edited {name}: changed {changed}; now {display.task_summary(job)}")
    moved = "" if changes.keys() & {"schedule", "start_time"} else " (unchanged)"
    click.echo(f"next run: {_next_run(job, zone, now)}{moved if changes and job.policy.enabled else ''}")
    if "task" in changes:
        _warn_unknown_task(app, job)


def _warn_unknown_task(app: Any, job: JobRecord) -> None:
    """A task this app does not know is stored (a worker may have it), with a note: a typo is sent and never runs."""
    for task in _unknown_tasks(app, [job]).values():
        click.echo(
            f"note: this app does not know the task {task!r}: its runs are sent and never run unless the workers "
            f"have it (check the name; fix it: celery -A proj dbsched edit {job.name} --task NAME)",
            err=True,
        )


# -- the dashboard --------------------------------------------------------------------------------------------

WEB_TOKEN_ENV = "DBSCHED_WEB_TOKEN"


def web_token(settings: Settings) -> str | None:
    """The dashboard's token: the environment's DBSCHED_WEB_TOKEN when set, else `dbsched_web_token`."""
    return parse_web_token(WEB_TOKEN_ENV, os.environ.get(WEB_TOKEN_ENV)) or settings.web_token


@dbsched.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to serve on")
@click.option("--port", type=click.IntRange(0, 65535), default=8555, show_default=True)
@click.pass_context
def web(ctx: click.Context, host: str, port: int) -> None:
    """Serve the dashboard: jobs, runs, fleet, a JSON API, and (with the token) actions. Needs the `web` extra."""
    try:
        import uvicorn

        from .web import check_bind, create_app
    except ImportError as exc:
        raise click.ClickException(
            f"the dashboard needs the web extra ({exc.name} is missing): pip install 'celery-dbsched[web]'"
        ) from None
    try:
        settings = Settings.from_mapping(ctx.obj.app.conf)
        token = web_token(settings)
        check_bind(host, token)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    repository = _existing_repository(ctx)
    ctx.obj.app.loader.import_default_modules()  # the names its code and beat_schedule own (run-time schedules)
    app = create_app(repository, token=token, celery_app=ctx.obj.app)
    access = "actions need the token" if token else "read-only: no token (dbsched_web_token / DBSCHED_WEB_TOKEN)"
    click.echo(f"celery_dbsched dashboard on http://{host}:{port}/ ({access})")
    uvicorn.run(app, host=host, port=port, log_level="info")
