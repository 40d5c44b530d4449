"""The copies of a migrated database the suites run on (helpers/templates.py) are what `migrate` makes: the
same tables, columns, keys, indexes, constraints, triggers and version, on each database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers.services import (
    Database,
    drop_database,
    make_mariadb_database,
    make_postgres_database,
    sqlite_database,
)
from sqlalchemy import Engine, inspect, text
from sqlalchemy.sql import ClauseElement

from celery_dbsched.migrate import migrate


def _text(value: Any) -> str:
    """`value` as text, SQL expressions (a partial index's WHERE) by their SQL, not their identity."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_text(item)}" for key, item in sorted(value.items())) + "}"
    return str(value) if isinstance(value, ClauseElement) else repr(value)


def _schema(engine: Engine) -> dict[str, Any]:
    inspector = inspect(engine)
    found: dict[str, Any] = {}
    for table in sorted(inspector.get_table_names()):
        columns = [
            (c["name"], str(c["type"]), c["nullable"], str(c.get("default")), str(c.get("computed")))
            for c in inspector.get_columns(table)
        ]
        found[table] = {
            "columns": columns,
            "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
            "foreign_keys": sorted(str(sorted(fk.items())) for fk in inspector.get_foreign_keys(table)),
            "indexes": sorted(_text(sorted(ix.items())) for ix in inspector.get_indexes(table)),
            "unique": sorted(str(sorted(uc.items())) for uc in inspector.get_unique_constraints(table)),
            "checks": sorted(str(sorted(ck.items())) for ck in inspector.get_check_constraints(table)),
        }
    with engine.connect() as conn:
        found["version"] = conn.execute(text("SELECT version_num FROM dbsched_alembic_version")).scalars().all()
        if engine.dialect.name == "sqlite":
            triggers = "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger'"
        elif engine.dialect.name == "postgresql":
            triggers = (
                "SELECT t.tgname, c.relname, t.tgtype, p.proname, p.prosrc FROM pg_trigger t "
                "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_proc p ON p.oid = t.tgfoid "
                "WHERE NOT t.tgisinternal AND c.relnamespace = current_schema()::regnamespace"
            )
        else:
            triggers = (
                "SELECT trigger_name, event_manipulation, action_timing, event_object_table, action_statement "
                "FROM information_schema.triggers WHERE trigger_schema = DATABASE()"
            )
        found["triggers"] = sorted(tuple(row) for row in conn.execute(text(triggers)))
    return found


def _fresh_like(kind: str, folder: Path) -> Database:
    if kind == "sqlite":
        folder.mkdir()
        return sqlite_database(folder)
    return make_postgres_database() if kind == "postgres" else make_mariadb_database()


def test_a_copied_database_is_the_migrated_one(database: Database, tmp_path: Path) -> None:
    kind = database.kind
    copied = database.migrated_repository()  # a fresh database: copied from the session's template
    reference = _fresh_like(kind, tmp_path / "reference")
    try:
        migrated = reference.repository()
        assert migrate(migrated.engine) is None  # really migrated here: it was empty
        assert migrate(copied.engine) == found_version(copied.engine)  # the copy is current: nothing to do
        copy, original = _schema(copied.engine), _schema(migrated.engine)
        assert copy == original
        assert copy["dbsched_job_run"]["columns"] and copy["dbsched_job"]["indexes"] and copy["version"]
        assert copy["triggers"]  # the active-run counters
    finally:
        drop_database(reference)


def found_version(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(text("SELECT version_num FROM dbsched_alembic_version")).scalar_one())
