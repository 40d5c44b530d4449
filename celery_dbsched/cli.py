"""`celery -A proj dbsched ...`: migrate the schema and look at jobs and runs without writing SQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import click

from .binding import repository_for
from .controls import cancel_job, pause_job, resume_job, trigger_job
from .errors import DbschedError
from .migrate import current_revision, head_revision, migrate
from .records import JobRecord
from .repository import JobRepository
from .schema import RUN_STATES
from .settings import Settings


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
    url = repository.engine.url.render_as_string(hide_password=True)
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
@click.option("--status", type=click.Choice(RUN_STATES), default=None, help="only runs in this state")
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


def _control(ctx: click.Context, action: Any, name: str) -> Any:
    _repository(ctx)  # validates the settings first, with a clear message
    try:
        return action(ctx.obj.app, name)
    except (DbschedError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@dbsched.command()
@click.argument("name")
@click.pass_context
def pause(ctx: click.Context, name: str) -> None:
    """Stop claiming job NAME (its running run goes on)."""
    _control(ctx, pause_job, name)
    click.echo(f"paused {name}")


@dbsched.command()
@click.argument("name")
@click.pass_context
def resume(ctx: click.Context, name: str) -> None:
    """Claim job NAME again, from its next slot."""
    job = _control(ctx, resume_job, name)
    click.echo(f"resumed {name}; next run {_when(job.next_scheduled_run)} UTC")


@dbsched.command()
@click.argument("name")
@click.pass_context
def trigger(ctx: click.Context, name: str) -> None:
    """Run job NAME now."""
    _control(ctx, trigger_job, name)
    click.echo(f"triggered {name}")


@dbsched.command()
@click.argument("name")
@click.pass_context
def cancel(ctx: click.Context, name: str) -> None:
    """Interrupt the active run(s) of job NAME."""
    runs = _control(ctx, cancel_job, name)
    if runs:
        click.echo(f"cancelled run(s) {', '.join(str(run.id) for run in runs)} of {name}")
    else:
        click.echo(f"{name} has no active run")
