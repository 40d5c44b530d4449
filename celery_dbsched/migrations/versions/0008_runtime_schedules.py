"""Schedules at run time (issue 13): who owns each job (`origin`: code, beat_schedule or runtime, backfilled
from `kind`), django-celery-beat's `one_off` and absolute `expires` (`expire_time`).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from celery_dbsched.schema import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # In place (ALTER TABLE ADD COLUMN) on SQLite: copying the jobs table would lose nothing, but the runs
    # table's triggers of 0003 reference it; no table is recreated.
    with op.batch_alter_table("dbsched_job", recreate="never") as job:
        job.add_column(sa.Column("origin", sa.String(16), nullable=False, server_default="code"))
        job.add_column(sa.Column("one_off", sa.Boolean(), nullable=False, server_default=sa.false()))
        job.add_column(sa.Column("expire_time", UTCDateTime(), nullable=True))
    # Before 0008 a plain task ("task") could only come from beat_schedule, a job ("job") only from code.
    op.execute("UPDATE dbsched_job SET origin = 'beat_schedule' WHERE kind = 'task'")


def downgrade() -> None:
    with op.batch_alter_table("dbsched_job", recreate="never") as job:
        job.drop_column("expire_time")
        job.drop_column("one_off")
        job.drop_column("origin")
