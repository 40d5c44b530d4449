"""The beats' wake-up channel on PostgreSQL: one per schema (a LISTEN/NOTIFY channel is per database, and
deployments may share a database in schemas of their own)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

import pytest
from helpers.services import Database, drop_database, make_postgres_database

from celery_dbsched.wakeup import Wakeup

pytestmark = pytest.mark.postgres

HOUR = dt.timedelta(hours=1)


@pytest.fixture
def other_schema() -> Iterator[Database]:
    """A second deployment: another schema of the same PostgreSQL database."""
    db = make_postgres_database()
    try:
        yield db
    finally:
        drop_database(db)


def test_a_notify_for_another_schema_does_not_wake_a_beat(postgres_database: Database, other_schema: Database) -> None:
    ours, theirs = postgres_database.migrated_repository(), other_schema.migrated_repository()
    for repository in (ours, theirs):
        repository.upsert_job("later", "due in an hour", first_run_in=HOUR)
    our_beat, their_beat = Wakeup(ours.engine), Wakeup(theirs.engine)
    try:
        assert our_beat.wait(0.01) is False and their_beat.wait(0.01) is False  # both listening now
        assert our_beat.channel and their_beat.channel and our_beat.channel != their_beat.channel
        assert our_beat.channel.startswith("dbsched_wakeup_")

        theirs.update_job_next_run_in_at_least("later", dt.timedelta(0), run_now=True)
        assert their_beat.wait(10) is True  # the other deployment's beat is woken
        began = time.monotonic()
        assert our_beat.wait(1.5) is False  # ours sleeps on
        assert time.monotonic() - began >= 1.4

        ours.update_job_next_run_in_at_least("later", dt.timedelta(0), run_now=True)
        assert our_beat.wait(10) is True
    finally:
        our_beat.close()
        their_beat.close()
