"""`celery -A proj dbsched ...`: migrate the schema and look at jobs and runs without writing SQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

import click

from .binding import repository_for
from .controls import cancel_job, pause_job, resume_job, trigger_job
from .errors import DbschedError
from .migrate import current_revision, head_revision, migrate
from .records import JobRecord
from .repository import JobRepository
from .settings import Settings, mask_database_url
from .states import RunState


def _repository(ctx: click.Context) -> JobRepository:
    app = ctx.obj.app
    try:
        return repository_for(app, Settings.from_mapping(app.conf))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


def _when(value: dt.datetime | None) -> str:
    return "-" if value is None else value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: dt.timedelta | None) -> str:
    return "-" if value is None else f"{value.total_seconds():g}s"


def _schedule(job: JobRecord) -> str:
    if job.schedule is None:
        return "-" if job.every is None else f"every {_seconds(job.every)}"
    spec = job.schedule.spec()
    if spec["type"] == "interval":
        return f"every {spec['seconds']:g}s"
    if spec["type"] == "crontab":
        fields = " ".join(spec[k] for k in ("minute", "hour", "day_of_month", "month_of_year", "day_of_week"))
        return f"cron {fields} {spec['timezone']}"
    return f"{spec['event']} at {spec['lat']:g},{spec['lon']:g}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


@click.group(name="dbsched")
def dbsched() -> None:
    """celery_dbsched: the database-backed scheduler (times in UTC)."""


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


@dbsched.command()
@click.pass_context
def jobs(ctx: click.Context) -> None:
    """List the registered jobs and when each runs next."""
    repository = _repository(ctx)
    try:
        records = repository.list_jobs()
        now = repository.database_now()
    except DbschedError as exc:
        raise click.ClickException(str(exc)) from exc
    rows = []
    for job in records:
        due = (job.next_scheduled_run - now).total_seconds()
        rows.append(
            [
                job.name,
                "paused" if job.paused else ("enabled" if job.policy.enabled else "disabled"),
                _when(job.next_scheduled_run),
                "due" if due <= 0 else f"in {due:.0f}s",
                _schedule(job),
                job.queue or "-",
                job.failure_count,
                job.description,
            ]
        )
    headers = ["name", "state", "next run", "", "schedule", "queue", "failures", "description"]
    click.echo(_table(headers, rows) if rows else "no jobs registered")


@dbsched.command()
@click.option("--job", "job_name", default=None, help="only this job's runs")
@click.option("--status", type=click.Choice([s.value for s in RunState]), default=None, help="only runs in this state")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.pass_context
def runs(ctx: click.Context, job_name: str | None, status: str | None, limit: int) -> None:
    """List runs, newest first: state, progress, who claimed and ran them, errors."""
    repository = _repository(ctx)
    try:
        if job_name is not None:
            repository.lookup_job(job_name)
        records = repository.list_runs(job_name=job_name, status=status, limit=limit)
    except DbschedError as exc:
        raise click.ClickException(str(exc)) from exc
    rows = [
        [
            run.id,
            run.job_name,
            run.status,
            f"{run.completed}/{run.total}",
            _when(run.create_time),
            _when(run.start_time),
            _when(run.end_time),
            run.claimed_by,
            run.worker or "-",
            (run.error or "").strip().splitlines()[-1][:80] if run.error else "",
        ]
        for run in records
    ]
    headers = ["id", "job", "status", "progress", "claimed", "started", "ended", "claimed by", "worker", "error"]
    click.echo(_table(headers, rows) if rows else "no runs")


def _cancelled(name: str, runs: Any) -> str:
    if runs:
        return f"cancelled run(s) {', '.join(str(run.id) for run in runs)} of {name}"
    return f"{name} has no active run"


# The control commands: name, the function in controls.py, help, and what each prints on success.
_CONTROL_COMMANDS: list[tuple[str, Callable[[Any, str], Any], str, Callable[[str, Any], str]]] = [
    ("pause", pause_job, "Stop claiming job NAME (its running run goes on).", lambda name, _: f"paused {name}"),
    (
        "resume",
        resume_job,
        "Claim job NAME again, from its next slot.",
        lambda name, job: f"resumed {name}; next run {_when(job.next_scheduled_run)} UTC",
    ),
    ("trigger", trigger_job, "Run job NAME now.", lambda name, _: f"triggered {name}"),
    ("cancel", cancel_job, "Interrupt the active run(s) of job NAME.", _cancelled),
]


def _add_control_command(
    command_name: str, action: Callable[[Any, str], Any], help_text: str, report: Callable[[str, Any], str]
) -> None:
    @click.argument("name")
    @click.pass_context
    def control(ctx: click.Context, name: str) -> None:
        _repository(ctx)  # validates the settings first, with a clear message
        try:
            result = action(ctx.obj.app, name)
        except (DbschedError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(report(name, result))

    dbsched.command(name=command_name, help=help_text)(control)


for _spec in _CONTROL_COMMANDS:
    _add_control_command(*_spec)
