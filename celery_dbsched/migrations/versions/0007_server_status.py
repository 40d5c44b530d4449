"""Server rows made useful for `dbsched status`: version, heartbeat interval, beats' claims and claim lag over
the last minute, workers' runs in flight; an index on `last_seen` for pruning the rows of dead servers. Jobs:
an operator's edits kept over the code's values (`overrides`). Runs: an index for the history by status.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from celery_dbsched.schema import Seconds

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("version", sa.String(64)),
    ("heartbeat_interval", Seconds),
    ("claims_last_minute", sa.Integer()),
    ("claim_lag_p50", Seconds),
    ("claim_lag_max", Seconds),
    ("runs_in_flight", sa.Integer()),
)


def upgrade() -> None:
    with op.batch_alter_table("dbsched_server", recreate="never") as server:
        for name, type_ in _COLUMNS:
            server.add_column(sa.Column(name, type_, nullable=True))
    op.create_index("dbsched_server_last_seen", "dbsched_server", ["last_seen"])
    with op.batch_alter_table("dbsched_job", recreate="never") as job:
        job.add_column(sa.Column("overrides", sa.Text(), nullable=True))
    op.create_index("dbsched_job_run_status", "dbsched_job_run", ["status", "id"])


def downgrade() -> None:
    op.drop_index("dbsched_job_run_status", table_name="dbsched_job_run")
    with op.batch_alter_table("dbsched_job", recreate="never") as job:
        job.drop_column("overrides")
    op.drop_index("dbsched_server_last_seen", table_name="dbsched_server")
    with op.batch_alter_table("dbsched_server", recreate="never") as server:
        for name, _ in reversed(_COLUMNS):
            server.drop_column(name)
