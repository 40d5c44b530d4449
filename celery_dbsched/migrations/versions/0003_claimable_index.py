"""Claims and idle ticks cost what is due, not what exists.

Each job counts its active runs (`active_runs`: queued or running, in a slot), kept by triggers on the runs
table in the same transaction as every run transition, whichever code (or operator) makes it. The due index
then holds only the jobs that can be claimed: a job leaves it when its last free slot is taken, so a beat's
claim and its idle "when is the next job due" are range scans that never wade through running jobs.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from celery_dbsched.migrations.dialects import create_partial_index, on_mysql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# As celery_dbsched.schema.claimable renders it on each dialect: a partial index is used only by queries
# whose WHERE clause contains its predicate's terms as written.
CLAIMABLE = sa.text("enabled AND NOT paused AND active_runs < max_active")
SQLITE_CLAIMABLE = sa.text("enabled = 1 AND paused = 0 AND active_runs < max_active")
COUNTS = "status IN ('queued', 'running') AND slot >= 0"

POSTGRES_FUNCTION = """
CREATE OR REPLACE FUNCTION dbsched_count_active_runs() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    was_active boolean := TG_OP <> 'INSERT' AND OLD.status IN ('queued', 'running') AND OLD.slot >= 0;
    is_active boolean := TG_OP <> 'DELETE' AND NEW.status IN ('queued', 'running') AND NEW.slot >= 0;
BEGIN
    IF was_active AND NOT is_active THEN
        UPDATE dbsched_job SET active_runs = active_runs - 1 WHERE name = OLD.job_name;
    ELSIF is_active AND NOT was_active THEN
        UPDATE dbsched_job SET active_runs = active_runs + 1 WHERE name = NEW.job_name;
    END IF;
    RETURN NULL;
END
$$
"""
POSTGRES_TRIGGER = """
CREATE TRIGGER dbsched_job_run_counts
AFTER INSERT OR DELETE OR UPDATE OF status, slot ON dbsched_job_run
FOR EACH ROW EXECUTE FUNCTION dbsched_count_active_runs()
"""

_OLD = COUNTS.replace("status", "OLD.status").replace("slot", "OLD.slot")
_NEW = COUNTS.replace("status", "NEW.status").replace("slot", "NEW.slot")
_DEC = "UPDATE dbsched_job SET active_runs = active_runs - 1 WHERE name = OLD.job_name;"
_INC = "UPDATE dbsched_job SET active_runs = active_runs + 1 WHERE name = NEW.job_name;"
SQLITE_TRIGGERS = {
    "dbsched_job_run_counts_insert": f"AFTER INSERT ON dbsched_job_run WHEN {_NEW} BEGIN {_INC} END",
    "dbsched_job_run_counts_delete": f"AFTER DELETE ON dbsched_job_run WHEN {_OLD} BEGIN {_DEC} END",
    "dbsched_job_run_counts_end": (
        f"AFTER UPDATE OF status, slot ON dbsched_job_run WHEN ({_OLD}) AND NOT ({_NEW}) BEGIN {_DEC} END"
    ),
    "dbsched_job_run_counts_start": (
        f"AFTER UPDATE OF status, slot ON dbsched_job_run WHEN ({_NEW}) AND NOT ({_OLD}) BEGIN {_INC} END"
    ),
}


# MySQL/MariaDB: one trigger per event (a MySQL trigger has no WHEN and no UPDATE OF). A statement that writes
# the runs table must not read the job table (MySQL error 1442: a trigger may not write a table its statement
# uses): statements.py keeps those apart on MySQL.
MYSQL_TRIGGERS = {
    "dbsched_job_run_counts_insert": f"AFTER INSERT ON dbsched_job_run FOR EACH ROW IF {_NEW} THEN {_INC} END IF",
    "dbsched_job_run_counts_delete": f"AFTER DELETE ON dbsched_job_run FOR EACH ROW IF {_OLD} THEN {_DEC} END IF",
    "dbsched_job_run_counts_update": (
        f"AFTER UPDATE ON dbsched_job_run FOR EACH ROW IF ({_OLD}) AND NOT ({_NEW}) THEN {_DEC} "
        f"ELSEIF ({_NEW}) AND NOT ({_OLD}) THEN {_INC} END IF"
    ),
}


def _triggers() -> dict[str, str]:
    return MYSQL_TRIGGERS if on_mysql() else SQLITE_TRIGGERS


def upgrade() -> None:
    bind = op.get_bind()
    # A plain ADD COLUMN on SQLite too (never a batch copy of the job table: its drop would cascade to the runs).
    op.add_column("dbsched_job", sa.Column("active_runs", sa.Integer, nullable=False, server_default="0"))
    op.execute(
        "UPDATE dbsched_job SET active_runs = (SELECT count(*) FROM dbsched_job_run r "
        f"WHERE r.job_name = dbsched_job.name AND {COUNTS.replace('status', 'r.status').replace('slot', 'r.slot')})"
    )
    if bind.dialect.name == "postgresql":
        op.execute(POSTGRES_FUNCTION)
        op.execute(POSTGRES_TRIGGER)
    else:
        for name, body in _triggers().items():
            op.execute(f"CREATE TRIGGER {name} {body}")
    op.drop_index("dbsched_job_due", table_name="dbsched_job")
    create_partial_index(
        "dbsched_job_claimable",
        "dbsched_job",
        ["next_scheduled_run", "name"],
        CLAIMABLE,
        sqlite_where=SQLITE_CLAIMABLE,
        mysql_columns=["enabled", "paused", "next_scheduled_run", "name"],
    )
    create_partial_index(
        "dbsched_job_misfire_skip",
        "dbsched_job",
        ["next_scheduled_run"],
        sa.text("misfire = 'skip'"),
        mysql_columns=["misfire", "next_scheduled_run"],
    )


def downgrade() -> None:
    bind = op.get_bind()
    op.drop_index("dbsched_job_misfire_skip", table_name="dbsched_job")
    op.drop_index("dbsched_job_claimable", table_name="dbsched_job")
    op.create_index("dbsched_job_due", "dbsched_job", ["next_scheduled_run"])
    if bind.dialect.name == "postgresql":
        op.execute("DROP TRIGGER dbsched_job_run_counts ON dbsched_job_run")
        op.execute("DROP FUNCTION dbsched_count_active_runs()")
    elif on_mysql():
        for name in MYSQL_TRIGGERS:
            op.execute(f"DROP TRIGGER {name}")
    else:
        for name in SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER {name}")
        # Not a batch "move and copy": dropping the old job table would cascade to every run (history lost).
        op.execute("ALTER TABLE dbsched_job DROP COLUMN active_runs")
        return
    op.drop_column("dbsched_job", "active_runs")
