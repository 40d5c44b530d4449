"""Importers: `celery -A proj dbsched import PEER ...` moves another scheduler's schedules into runtime schedules.

Each peer has a module here with a `read_...` function that turns the peer's data into a `Reading` (entries for
`runtime.put_schedules`, and what cannot be carried over, each with its reason) and a click `command`; this module
holds what they share: storing the reading, printing the plan, and the exit status (1 when anything was skipped
or refused, unless --allow-skip). The commands are loaded lazily, when asked for (`PEERS`).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import click

from ..records import PutResult

__all__ = ["PEERS", "Reading", "Skipped", "allow_skip_option", "dry_run_option", "import_group", "run_import"]

# Subcommand name -> module holding its click `command`.
PEERS: Mapping[str, str] = {
    "django-celery-beat": "celery_dbsched.importers.django_celery_beat",
    "redbeat": "celery_dbsched.importers.redbeat",
}
_SHOWN = 50  # names listed per line of the plan; skipped and refused entries are always all listed


@dataclass(frozen=True)
class Skipped:
    """An entry of the peer that is not imported, and why (an unsupported schedule type, unreadable JSON, ...)."""

    name: str
    reason: str


@dataclass
class Reading:
    """What a reader found: `entries` for `put_schedules` (dicts of "name" and add_schedule's keywords),
    `skipped` (never silently dropped: listed, and exit status 1 unless --allow-skip), and `left_out`: entries
    not imported on purpose because celery_dbsched provides them itself (listed, not an error)."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    left_out: list[Skipped] = field(default_factory=list)


class _PeerGroup(click.Group):
    """`import`: one subcommand per peer, each imported only when it is run (or its help is asked for)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, module in PEERS.items() if importlib.util.find_spec(module) is not None)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = PEERS.get(cmd_name)
        if module is None:
            return None
        command: click.Command = importlib.import_module(module).command
        return command


@click.group(name="import", cls=_PeerGroup)
def import_group() -> None:
    """Import the schedules of another scheduler (django-celery-beat, RedBeat) as runtime schedules."""


dry_run_option = click.option("--dry-run", is_flag=True, help="store nothing; print what would be created or changed")
allow_skip_option = click.option(
    "--allow-skip", is_flag=True, help="exit 0 even when some entries could not be imported (they are still listed)"
)


def _names(names: list[str]) -> str:
    if len(names) <= _SHOWN:
        return ", ".join(names)
    return f"{', '.join(names[:_SHOWN])} and {len(names) - _SHOWN:,} more"


def plan_lines(source: str, reading: Reading, result: PutResult) -> list[str]:
    """The plan: what was (or, in a dry run, would be) created, updated, left unchanged, refused and skipped."""
    dry = result.dry_run
    read = len(reading.entries) + len(reading.skipped) + len(reading.left_out)
    lines = [f"{source}: {read:,} entries read" + (" (dry run: nothing stored)" if dry else "")]
    verbs = ("would create", "would update") if dry else ("created", "updated")
    for verb, names in ((verbs[0], result.created), (verbs[1], result.updated)):
        if names:
            lines.append(f"  {verb} {len(names):,}: {_names(names)}")
    if result.unchanged:
        lines.append(f"  unchanged {len(result.unchanged):,} (already imported as they are)")
    for heading, items in (
        ("refused", [Skipped(name, reason) for name, reason in result.refused]),
        ("skipped", reading.skipped),
        ("left out", reading.left_out),
    ):
        if items:
            lines.append(f"  {heading} {len(items):,}:")
            lines.extend(f"    {item.name}: {item.reason}" for item in items)
    not_imported = len(result.refused) + len(reading.skipped)
    if not_imported:
        lines.append(
            f"{not_imported:,} entries not imported (above): fix them at the source and run the import again, "
            "or pass --allow-skip to accept that"
        )
    return lines


def exit_status(reading: Reading, result: PutResult, allow_skip: bool) -> int:
    """1 when an entry was skipped or refused, unless `allow_skip`; else 0."""
    return 1 if (reading.skipped or result.refused) and not allow_skip else 0


def run_import(
    ctx: click.Context, source: str, read: Callable[[], Reading], *, dry_run: bool, allow_skip: bool
) -> None:
    """Read the peer, store (or with `dry_run`, only plan) its entries, print the plan, and exit with
    `exit_status`. A reader's errors (DbschedError, ValueError) and the store's become one click error."""
    from ..errors import DbschedError
    from ..runtime import put_schedules

    app = ctx.obj.app
    app.loader.import_default_modules()  # the app's beat_schedule and @job modules: whose names are taken?
    try:
        reading = read()
        result = put_schedules(app, reading.entries, dry_run=dry_run)
    except (DbschedError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    for line in plan_lines(source, reading, result):
        click.echo(line)
    ctx.exit(exit_status(reading, result, allow_skip))
