"""When a worker last registered each job, and when a cancelled run's code stopped.

`dbsched_job.registered_time`: set for every `@job` a worker knows, each time a worker starts (NULL until a
worker of this version starts). A job no worker registered for a while is *orphaned* (removed from the code):
`dbsched jobs` flags it. `dbsched_job_run.stopped_time`: set by the worker when the code of a run that was
interrupted or cancelled under it has actually returned, so that `dbsched cancel --wait` can wait for it.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from celery_dbsched.schema import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # In place (ALTER TABLE ADD COLUMN) on SQLite: copying the runs table would drop the triggers of 0003.
    with op.batch_alter_table("dbsched_job", recreate="never") as job:
        job.add_column(sa.Column("registered_time", UTCDateTime(), nullable=True))
    with op.batch_alter_table("dbsched_job_run", recreate="never") as run:
        run.add_column(sa.Column("stopped_time", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dbsched_job_run", recreate="never") as run:
        run.drop_column("stopped_time")
    with op.batch_alter_table("dbsched_job", recreate="never") as job:
        job.drop_column("registered_time")
