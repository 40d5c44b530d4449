"""What the revisions build differently on MySQL/MariaDB, in one place: the table options (InnoDB, utf8mb4 with
a binary collation, so names compare byte for byte as on PostgreSQL), and the stand-ins for partial indexes,
which MySQL and MariaDB do not have.

- The one active run per job (and slot), a unique partial index on PostgreSQL and SQLite, is on MySQL a
  unique index over a stored generated column, `active_job`, that holds the job's name while the run is
  queued or running and NULL otherwise (NULLs never collide): the database itself refuses a second active run.
- A partial index that only narrows a scan (the claimable jobs, the active runs' update times, the
  skip-policy jobs) is a plain index whose leading columns are the predicate's equality terms.

A later revision that adds an index of this kind calls `create_partial_index` (or `create_active_unique_index`)
and works on every dialect unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from celery_dbsched.engine import MYSQL_BACKENDS, MYSQL_CHARSET, is_mysql, mysql_collation

RUN_TABLE = "dbsched_job_run"
ACTIVE_STATES = "status in ('queued', 'running')"
ACTIVE = sa.text(ACTIVE_STATES)
# The generated column behind the active-run unique index on MySQL/MariaDB (revision 0001).
ACTIVE_JOB = "active_job"


def on_mysql() -> bool:
    return is_mysql(op.get_bind().dialect.name)


def table_options() -> dict[str, Any]:
    """`op.create_table` options: on MySQL/MariaDB InnoDB, utf8mb4 and the server's binary no-pad collation
    (`engine.mysql_collation`); nothing elsewhere."""
    if not on_mysql():
        return {}
    collation = mysql_collation(op.get_bind().dialect)
    options = (("engine", "InnoDB"), ("charset", MYSQL_CHARSET), ("collate", collation))
    return {f"{backend}_{option}": value for backend in MYSQL_BACKENDS for option, value in options}


def create_partial_index(
    name: str,
    table: str,
    columns: Sequence[str],
    where: Any,
    *,
    mysql_columns: Sequence[str],
    sqlite_where: Any = None,
) -> None:
    """A partial index on PostgreSQL and SQLite (`sqlite_where`: the predicate as SQLite renders it, when it
    differs); on MySQL/MariaDB a plain index over `mysql_columns`."""
    if on_mysql():
        op.create_index(name, table, list(mysql_columns))
        return
    op.create_index(
        name, table, list(columns), postgresql_where=where, sqlite_where=where if sqlite_where is None else sqlite_where
    )


def add_active_job_column() -> None:
    """MySQL/MariaDB: the runs' `active_job` (the job's name while the run is active, else NULL)."""
    if on_mysql():
        op.add_column(
            RUN_TABLE,
            sa.Column(
                ACTIVE_JOB,
                sa.String(128),
                sa.Computed(f"case when {ACTIVE_STATES} then job_name end", persisted=True),
                nullable=True,
            ),
        )


def create_active_unique_index(name: str, columns: Sequence[str]) -> None:
    """At most one active run per value of `columns` (the job name first): a unique partial index, or on
    MySQL/MariaDB a unique index over `active_job` and the other columns."""
    if on_mysql():
        op.create_index(name, RUN_TABLE, [ACTIVE_JOB, *columns[1:]], unique=True)
        return
    op.create_index(name, RUN_TABLE, list(columns), unique=True, postgresql_where=ACTIVE, sqlite_where=ACTIVE)
