"""`celery -A proj dbsched watch`: the live terminal view (issue 12 §2), drawn with rich (extra `watch`).

At the top the fleet line (the beats and workers, alive or silent since when as `observe.Fleet` tells them
apart, and the active runs), under it the active runs with their progress bars, under them the latest outcomes,
newest first. On a terminal the view is redrawn in place every `interval` seconds until Ctrl-C; elsewhere (a
pipe, a file) each refresh is printed after the last. While the database is unavailable the last frame stays
under a line that says so, and each refresh tries again. What one refresh reads is `JobRepository.watch_frame`:
four bounded, indexed statements.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from . import display
from .errors import DatabaseUnavailable
from .observe import Fleet, Server
from .records import RunRecord, WatchFrame, WatchRun
from .states import RunState

SILENT_NAMED = 3  # silent servers named on the fleet line, the rest counted
BAR_WIDTH = 24
_OUTCOME_STYLES = {
    RunState.COMPLETED: "green",
    RunState.FAILED: "bold red",
    RunState.INTERRUPTED: "yellow",
    RunState.DISPATCHED: "cyan",
}


def _servers(kind: str, mine: Sequence[Server], zone: dt.tzinfo) -> str:
    if not mine:
        return f"{kind}s: none seen"
    silent = [server for server in mine if not server.alive]
    text = f"{kind}s: {len(mine) - len(silent)} alive"
    if silent:
        named = ", ".join(f"{one.id} since {display.when(one.last_seen, zone)}" for one in silent[:SILENT_NAMED])
        more = f", {len(silent) - SILENT_NAMED} more" if len(silent) > SILENT_NAMED else ""
        text += f", {len(silent)} silent ({named}{more})"
    return text


def fleet_line(frame: WatchFrame, zone: dt.tzinfo, job_name: str | None = None) -> str:
    """`2026-12-05 07:50:00 UTC  beats: 1 alive  workers: 2 alive, 1 silent (w3 since ...)  active runs: 3`
    (with `(1 stalled)` when some are)."""
    stalled = sum(1 for run in frame.active if run.stalled_for(frame.now) is not None)
    active = f"active runs: {len(frame.active)}{'+' if frame.more_active else ''}"
    if stalled:
        active += f" ({stalled} stalled)"
    fleet = Fleet.of(frame.servers, frame.now)
    parts = [
        f"{display.when(frame.now, zone)} {display.zone_name(zone)}",
        _servers("beat", fleet.beats, zone),
        _servers("worker", fleet.workers, zone),
        active,
    ]
    if job_name is not None:
        parts.append(f"job: {job_name}")
    return "  ".join(parts)


def _bar(run: RunRecord) -> RenderableType:
    if run.status != RunState.RUNNING or run.total == 0:
        return Text("-")
    return ProgressBar(total=run.total, completed=run.completed, width=BAR_WIDTH)


def _done(run: RunRecord) -> str:
    if run.total == 0:
        return "-"
    return f"{run.completed}/{run.total} {100 * run.completed // run.total}%"


def _active_row(item: WatchRun, now: dt.datetime) -> list[RenderableType]:
    run = item.run
    stalled = item.stalled_for(now)
    if run.status == RunState.QUEUED:
        age, where = f"queued {display.duration(now - run.create_time)}", f"claimed by {run.claimed_by}"
    else:
        age, where = display.run_duration(run, now), run.worker or "-"
    progress = Text(display.ago(run.update_time, now))
    if stalled is not None:
        what = "not started" if run.status == RunState.QUEUED else "no progress"
        progress = Text(f"STALLED: {what} for {display.duration(stalled)}", style="bold red")
    return [str(run.id), run.job_name, Text(run.status), _bar(run), _done(run), age, progress, where]


def active_table(frame: WatchFrame) -> RenderableType:
    if not frame.active:
        return Text("no active runs")
    table = Table(box=None, pad_edge=False, title="Active runs", title_justify="left", title_style="bold")
    for header in ("RUN", "JOB", "STATUS", "PROGRESS", "DONE", "FOR", "LAST PROGRESS", "WORKER"):
        table.add_column(header, no_wrap=header != "WORKER")
    for item in frame.active:
        table.add_row(*_active_row(item, frame.now))
    if not frame.more_active:
        return table
    return Group(table, Text(f"(the oldest {len(frame.active)} shown; more are active: narrow with --job)"))


def _outcome(run: RunRecord) -> Text:
    label = run.status + (f" ({run.interrupt_reason})" if run.interrupt_reason else "")
    return Text(label, style=_OUTCOME_STYLES.get(run.status, ""))


def recent_table(frame: WatchFrame, zone: dt.tzinfo) -> RenderableType:
    if not frame.recent:
        return Text("no ended runs")
    table = Table(box=None, pad_edge=False, title="Recent outcomes", title_justify="left", title_style="bold")
    for header in (f"ENDED ({display.zone_name(zone)})", "RUN", "JOB", "OUTCOME", "DURATION", "WORKER", "ERROR"):
        table.add_column(header, no_wrap=header != "ERROR", overflow="ellipsis")
    for run in frame.recent:
        table.add_row(
            display.when(run.end_time, zone),
            str(run.id),
            run.job_name,
            _outcome(run),
            display.run_duration(run, frame.now),
            run.worker or "-",
            display.error_line(run.error),
        )
    return table


def render(frame: WatchFrame, zone: dt.tzinfo, job_name: str | None = None) -> RenderableType:
    """One frame: the fleet line, the active runs, the recent outcomes."""
    return Group(
        Text(fleet_line(frame, zone, job_name), style="bold"),
        Text(""),
        active_table(frame),
        Text(""),
        recent_table(frame, zone),
    )


class _Refresh:
    """`read()` for the live view: while the database is unavailable (an outage), the last frame under a line
    that says so; it goes on trying at each refresh. Any other error ends the view."""

    def __init__(self, read: Callable[[], RenderableType], interval: float) -> None:
        self.read, self.interval = read, interval
        self.last: RenderableType | None = None

    def __call__(self) -> RenderableType:
        try:
            self.last = self.read()
            return self.last
        except DatabaseUnavailable as exc:
            note = Text(f"{exc}; trying again every {self.interval:g} s (Ctrl-C ends)", style="bold red")
            return note if self.last is None else Group(note, self.last)


def watch(
    read: Callable[[], RenderableType], *, interval: float, once: bool = False, console: Console | None = None
) -> None:
    """Show `read()`: once, or again every `interval` seconds (in place on a terminal) until Ctrl-C, which ends
    it quietly with the last frame left on the screen. Once, every error of `read` is raised; live, an outage
    is shown and waited out (`_Refresh`)."""
    console = console or Console(highlight=False)
    if once:
        console.print(read())
        return
    refresh = _Refresh(read, interval)
    try:
        if not console.is_terminal:
            while True:
                console.print(refresh())
                console.print()
                time.sleep(interval)
        with Live(refresh(), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(refresh(), refresh=True)
    except KeyboardInterrupt:
        return
