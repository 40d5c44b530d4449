"""Alembic environment for celery_dbsched's own tables; driven by `celery_dbsched.migrate`, not the CLI."""

from __future__ import annotations

from alembic import context

from celery_dbsched.migrate import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=None,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
