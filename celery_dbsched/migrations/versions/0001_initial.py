"""Jobs and their runs.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from celery_dbsched.migrations.dialects import (
    ACTIVE,
    add_active_job_column,
    create_active_unique_index,
    create_partial_index,
    table_options,
)
from celery_dbsched.schema import Seconds, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dbsched_job",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("next_scheduled_run", UTCDateTime, nullable=False),
        sa.Column("default_next_run_in", Seconds, nullable=True),
        sa.Column("queue", sa.String(255), nullable=True),
        sa.Column("interrupt_threshold", Seconds, nullable=True),
        sa.Column("failure_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("create_time", UTCDateTime, nullable=False),
        sa.Column("update_time", UTCDateTime, nullable=False),
        sa.CheckConstraint("length(name) > 0", name="dbsched_job_name_not_empty"),
        **table_options(),
    )
    op.create_index("dbsched_job_due", "dbsched_job", ["next_scheduled_run"])
    op.create_table(
        "dbsched_job_run",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column(
            "job_name",
            sa.String(128),
            sa.ForeignKey("dbsched_job.name", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("queue", sa.String(255), nullable=True),
        sa.Column("claimed_by", sa.String(255), nullable=False),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("task_id", sa.String(255), nullable=True),
        sa.Column("completed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("total", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("requested_next_run", UTCDateTime, nullable=True),
        sa.Column("create_time", UTCDateTime, nullable=False),
        sa.Column("start_time", UTCDateTime, nullable=True),
        sa.Column("update_time", UTCDateTime, nullable=False),
        sa.Column("end_time", UTCDateTime, nullable=True),
        sa.CheckConstraint(
            "status in ('queued', 'running', 'completed', 'failed', 'interrupted', 'dispatched')",
            name="dbsched_job_run_status_valid",
        ),
        sa.CheckConstraint(
            "completed >= 0 and total >= 0 and completed <= total", name="dbsched_job_run_progress_valid"
        ),
        # Run ids are never reused after pruning (a late message must never name a newer run).
        sqlite_autoincrement=True,
        **table_options(),
    )
    add_active_job_column()
    create_active_unique_index("dbsched_job_run_one_active", ["job_name"])
    create_partial_index(
        "dbsched_job_run_active_update",
        "dbsched_job_run",
        ["update_time"],
        ACTIVE,
        mysql_columns=["status", "update_time"],
    )
    op.create_index("dbsched_job_run_job", "dbsched_job_run", ["job_name", "id"])
    op.create_index("dbsched_job_run_end", "dbsched_job_run", ["end_time"])


def downgrade() -> None:
    op.drop_table("dbsched_job_run")
    op.drop_table("dbsched_job")
