"""A beat start with an unchanged `beat_schedule` costs one read.

`dbsched_sync` keeps, per synced source (`beat_schedule`), a fingerprint of what the code declared and how
many jobs of that kind the sync left; a beat whose fingerprint and count match skips the comparison of every
entry. Nothing else reads it: deleting its rows only makes the next start compare everything once.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from celery_dbsched.migrations.dialects import table_options
from celery_dbsched.schema import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dbsched_sync",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=True),
        sa.Column("job_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("update_time", UTCDateTime, nullable=False),
        **table_options(),
    )


def downgrade() -> None:
    op.drop_table("dbsched_sync")
