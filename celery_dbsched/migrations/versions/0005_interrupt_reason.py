"""Why a run was interrupted, in its own column.

Until now an interrupted run's reason was only the first word of its `error` text ("stalled: no progress
within the interrupt threshold"). `interrupt_reason` holds it (NULL for a run that was not interrupted);
the error text stays as it was, for people. Existing interrupted runs get theirs from that first word.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from celery_dbsched.migrations.dialects import on_mysql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# The reasons as of this revision (celery_dbsched.states.InterruptReason); a later reason is a later revision.
REASONS = ("stalled", "shutdown", "restart", "cancelled", "expired")
CHECK = "interrupt_reason in ({})".format(", ".join(f"'{reason}'" for reason in REASONS))
CHECK_NAME = "dbsched_job_run_interrupt_reason_valid"


def upgrade() -> None:
    if on_mysql():  # MySQL/MariaDB take no named CHECK inside ADD COLUMN: the constraint is added apart
        op.add_column("dbsched_job_run", sa.Column("interrupt_reason", sa.String(16), nullable=True))
        op.create_check_constraint(CHECK_NAME, "dbsched_job_run", CHECK)
        _backfill()
        return
    # On SQLite the batch adds the column in place (ALTER TABLE ADD COLUMN, its CHECK on the column), never by
    # copying the runs table: a copy would drop the active-run triggers of revision 0003 with the old table.
    with op.batch_alter_table("dbsched_job_run", recreate="never") as run:
        run.add_column(
            sa.Column("interrupt_reason", sa.String(16), sa.CheckConstraint(CHECK, name=CHECK_NAME), nullable=True)
        )
    _backfill()


def _backfill() -> None:
    for reason in REASONS:
        op.execute(
            sa.text(
                "UPDATE dbsched_job_run SET interrupt_reason = :reason "
                "WHERE status = 'interrupted' AND (error = :reason OR error LIKE :prefix)"
            ).bindparams(reason=reason, prefix=f"{reason}:%")
        )


def downgrade() -> None:
    if on_mysql():
        op.drop_constraint(CHECK_NAME, "dbsched_job_run", type_="check")
    with op.batch_alter_table("dbsched_job_run", recreate="never") as run:
        run.drop_column("interrupt_reason")
