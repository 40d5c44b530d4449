"""Schedules, beat_schedule entries, per-job policies, run slots, and the server table.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from celery_dbsched.migrations.dialects import create_active_unique_index, table_options
from celery_dbsched.schema import Seconds, UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # In place (ALTER TABLE ADD COLUMN) on SQLite: a `false()` default would make batch mode copy the table, and
    # dropping the old jobs table deletes every run through the runs' ON DELETE CASCADE (foreign keys are on).
    with op.batch_alter_table("dbsched_job", recreate="never") as job:
        job.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="job"))
        job.add_column(sa.Column("schedule", sa.Text, nullable=True))
        job.add_column(sa.Column("task", sa.String(255), nullable=True))
        job.add_column(sa.Column("task_args", sa.Text, nullable=True))
        job.add_column(sa.Column("task_kwargs", sa.Text, nullable=True))
        job.add_column(sa.Column("task_options", sa.Text, nullable=True))
        job.add_column(sa.Column("misfire", sa.String(16), nullable=False, server_default="run_once"))
        job.add_column(sa.Column("misfire_grace", Seconds, nullable=True))
        job.add_column(sa.Column("max_active", sa.Integer, nullable=False, server_default="1"))
        job.add_column(sa.Column("retry_backoff_base", Seconds, nullable=True))
        job.add_column(sa.Column("retry_backoff_cap", Seconds, nullable=True))
        job.add_column(sa.Column("expires", Seconds, nullable=True))
        job.add_column(sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()))
        job.add_column(sa.Column("retry_slot", UTCDateTime, nullable=True))
    op.drop_index("dbsched_job_run_one_active", table_name="dbsched_job_run")
    with op.batch_alter_table("dbsched_job_run", recreate="never") as run:
        run.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="job"))
        run.add_column(sa.Column("slot", sa.Integer, nullable=False, server_default="0"))
        run.add_column(sa.Column("scheduled_for", UTCDateTime, nullable=True))
    create_active_unique_index("dbsched_job_run_active_slot", ["job_name", "slot"])
    op.create_table(
        "dbsched_server",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("start_time", UTCDateTime, nullable=False),
        sa.Column("last_seen", UTCDateTime, nullable=False),
        **table_options(),
    )


def downgrade() -> None:
    op.drop_table("dbsched_server")
    op.drop_index("dbsched_job_run_active_slot", table_name="dbsched_job_run")
    with op.batch_alter_table("dbsched_job_run") as run:
        run.drop_column("scheduled_for")
        run.drop_column("slot")
        run.drop_column("kind")
    create_active_unique_index("dbsched_job_run_one_active", ["job_name"])
    with op.batch_alter_table("dbsched_job") as job:
        for column in (
            "retry_slot", "paused", "expires", "retry_backoff_cap", "retry_backoff_base", "max_active", "misfire_grace",
            "misfire", "task_options", "task_kwargs", "task", "schedule", "kind",
        ):  # fmt: skip
            job.drop_column(column)
