"""One adapter per measured system: how to empty its store, fill it with N interval schedules, make them all
due, build its beat scheduler, and add one due schedule while the beat runs.

Schedules are named `bench.e<i>` everywhere. celery_dbsched is driven only through its public surface
(`Scheduler(app=...)`, `JobRepository`, `dbsched_*` settings); the bulk setup of N jobs (not timed) clones a
job stored by `JobRepository.upsert_job` with one INSERT ... SELECT so that whatever columns that row has
are kept, and "make all due" is one UPDATE of `next_scheduled_run`; on PostgreSQL and, for the MariaDB
columns (`dbsched_maria`, `dbsched_bs_maria`, issue 14), in MariaDB's SQL on a database of the MariaDB server.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import types
import uuid
from typing import Any

from .common import (
    IDLE_AHEAD,
    INTERVAL,
    TASK,
    Config,
    drop_mariadb_database,
    ensure_database,
    ensure_mariadb_database,
    fresh_schema,
    template_columns,
)

UTC = dt.timezone.utc
BATCH = 2000


def entry_name(i: int) -> str:
    return f"bench.e{i}"


def base_app(name: str, broker: str, max_interval: float | None = None, **conf: Any) -> Any:
    """A Celery app on BROKER. `max_interval` None leaves `beat_max_loop_interval` unset, so that the scheduler
    class's own default applies (as in production); a number forces it."""
    from celery import Celery

    app = Celery(name, set_as_current=True)
    app.conf.update(
        broker_url=broker,
        timezone="UTC",
        enable_utc=True,
        task_default_queue="bench",
        result_expires=None,  # no celery.backend_cleanup entry in the peers' schedules
        broker_connection_retry_on_startup=True,
    )
    if max_interval is not None:
        app.conf.beat_max_loop_interval = max_interval
    app.conf.update(conf)
    return app


class System:
    key = ""
    label = ""
    store = ""
    modules: tuple[str, ...] = ()
    # How the system runs in production with its defaults (bench/README.md, and the report's header).
    configured = ""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.n = 0  # the number of schedules of the measure (the beat_schedule system puts them in its app)

    def missing(self) -> str | None:
        """Why this system cannot be measured here (a module not installed), or None."""
        for module in self.modules:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed (pip install -e '.[bench]')"
        return None

    # in the parent, once per run
    def prepare_store(self) -> None: ...

    # in a subprocess
    def reset(self) -> None: ...
    def populate(self, n: int, due: bool) -> dict[str, Any] | None: ...
    def make_due(self) -> None: ...
    def app(self, broker: str = "memory://", **conf: Any) -> Any: ...
    def build(self, app: Any) -> Any: ...
    def insert_due(self, app: Any, name: str) -> None: ...

    # Settings for a scheduler whose tick() is timed: its work, not its wait (see Dbsched.tick_only).
    tick_only: dict[str, Any] = {}

    def start(self, scheduler: Any) -> None:
        """What `celery beat` does after building the scheduler, before the first tick (beat_init)."""

    def cleanup(self) -> None:
        """Drop what the run created (the smoke test)."""


# -- celery_dbsched --------------------------------------------------------------------------------------


class Dbsched(System):
    key = "dbsched"
    label = "celery_dbsched"
    store = "PostgreSQL"
    modules = ("celery_dbsched", "psycopg")
    # On PostgreSQL the scheduler sleeps inside tick(), on LISTEN, until the next job is due or a NOTIFY; the
    # start-up, idle-tick and backlog-tick figures time the tick's work with listening off. Pickup, dispatch
    # and wake-up run with the default (listening).
    tick_only = {"dbsched_listen": False}
    configured = (
        "defaults: run-jobs interval 5 s (`dbsched_run_jobs_interval`), LISTEN/NOTIFY wake-ups on, claim batch "
        "and everything else as shipped; jobs are `@job` jobs (the beat publishes the wrapper's run message)"
    )

    @property
    def url(self) -> str:
        return self.cfg.dbsched_url or self.cfg.pg_url("dbsched")

    def prepare_store(self) -> None:
        if not self.cfg.dbsched_url:
            ensure_database(self.cfg, "dbsched")

    def reset(self) -> None:
        """Drop whatever tables the database has (so a schema change on a branch needs no edit here) and
        migrate to the package's head."""
        self.prepare_store()
        fresh_schema(self.url)

    # The SQL of the bulk setup, per database (not timed): PostgreSQL here, MariaDB in `MariaStore`.
    def clone_sql(self, quoted: str, picked: str, n: int) -> str:
        """INSERT ... SELECT that clones the template job (`:template`) into `n` (`:n`) jobs named `:prefix<i>`."""
        return (
            f"INSERT INTO dbsched_job (name, {quoted}) SELECT :prefix || g, {picked} "
            f"FROM dbsched_job t, generate_series(0, :n - 1) g WHERE t.name = :template"
        )

    def shifted_now(self, seconds: int) -> str:
        """The database's now, plus `seconds` (negative: before)."""
        return f"now() + interval '{seconds} seconds'"

    def analyze(self, engine: Any) -> None:
        """Fresh planner statistics on the jobs table after a bulk change."""
        from sqlalchemy import text

        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE dbsched_job"))

    def populate(self, n: int, due: bool) -> None:
        from sqlalchemy import text

        from celery_dbsched import JobRepository

        repository = JobRepository(self.url)
        try:
            template = "bench.template"
            repository.upsert_job(template, "benchmark job", every=dt.timedelta(seconds=INTERVAL))
            quoted, picked = template_columns(repository.engine, ("name",))
            offset = -1 if due else int(IDLE_AHEAD)
            with repository.engine.begin() as conn:
                if n > 0:
                    conn.execute(
                        text(self.clone_sql(quoted, picked, n)), {"prefix": "bench.e", "n": n, "template": template}
                    )
                conn.execute(text("DELETE FROM dbsched_job WHERE name = :t"), {"t": template})
                conn.execute(text(f"UPDATE dbsched_job SET next_scheduled_run = {self.shifted_now(offset)}"))
            self.analyze(repository.engine)
        finally:
            repository.close()

    def make_due(self) -> None:
        from sqlalchemy import text

        from celery_dbsched.engine import make_engine

        engine = make_engine(self.url)
        try:
            due = self.shifted_now(-1)
            with engine.begin() as conn:
                conn.execute(text(f"UPDATE dbsched_job SET next_scheduled_run = {due} WHERE name LIKE 'bench.e%'"))
            self.analyze(engine)
        finally:
            engine.dispose()

    def app(self, broker: str = "memory://", **conf: Any) -> Any:
        if self.cfg.max_interval is not None:
            conf.setdefault("dbsched_run_jobs_interval", self.cfg.max_interval)
        return base_app(
            f"bench-dbsched-{uuid.uuid4().hex[:6]}",
            broker,
            dbsched_database_url=self.url,
            dbsched_server_id=f"bench-beat-{os.getpid()}-{uuid.uuid4().hex[:6]}",
            max_interval=self.cfg.max_interval,
            **conf,
        )

    def build(self, app: Any) -> Any:
        from celery_dbsched.scheduler import Scheduler

        return Scheduler(app=app)

    def insert_due(self, app: Any, name: str) -> None:
        # The repository a worker registering its jobs at start uses (another app, so another engine and
        # connection): on PostgreSQL it notifies the beats when the new job is due within their interval.
        from celery_dbsched.binding import repository_for

        if not hasattr(self, "_writer"):
            self._writer = repository_for(self.app())
        self._writer.upsert_job(name, "added while the beat runs", every=dt.timedelta(seconds=INTERVAL))

    def cleanup(self) -> None:
        if not self.cfg.dbsched_url:
            from .common import drop_database

            drop_database(self.cfg, "dbsched")


class DbschedTasks(Dbsched):
    """celery_dbsched on the drop-in path: N interval entries of 60 s in `app.conf.beat_schedule`, each a plain
    task (`bench.noop`, args `[name]`), as a team switching from stock beat has them. The scheduler syncs them
    into the database itself when it starts (`populate` times that first start on an empty database; the
    `beat` measure's start-up is then a restart with the schedule unchanged). Every process that builds a beat
    (the measured beat, each of the two instances) carries the same N entries in its app."""

    key = "dbsched_bs"
    label = "celery_dbsched (beat_schedule)"
    configured = (
        "the same defaults as the `@job` column; the N schedules are `beat_schedule` entries (plain tasks) that "
        "the scheduler syncs at start"
    )

    def entries(self, n: int) -> dict[str, Any]:
        return {entry_name(i): {"task": TASK, "schedule": INTERVAL, "args": [entry_name(i)]} for i in range(n)}

    def app(self, broker: str = "memory://", **conf: Any) -> Any:
        conf.setdefault("beat_schedule", self.entries(self.n))
        return super().app(broker, **conf)

    def populate(self, n: int, due: bool) -> dict[str, Any] | None:
        """The first start on the emptied database (the scheduler syncs the N entries), then every entry is
        made idle (due in an hour) or due, with one UPDATE like the `@job` column."""
        import time

        from sqlalchemy import text

        from celery_dbsched.engine import make_engine

        self.n = n
        app = self.app(**self.tick_only)
        t0 = time.perf_counter()
        scheduler = self.build(app)  # setup_schedule: the sync of N new entries
        first_start = time.perf_counter() - t0
        scheduler.close()
        engine = make_engine(self.url)
        try:
            with engine.begin() as conn:
                stored = conn.execute(
                    text("SELECT count(*) FROM dbsched_job WHERE name LIKE 'bench.e%' AND kind = 'task'")
                ).scalar_one()
                if stored != n:
                    raise RuntimeError(f"the first start synced {stored} of {n} beat_schedule entries")
                offset = -1 if due else int(IDLE_AHEAD)
                conn.execute(
                    text(
                        f"UPDATE dbsched_job SET next_scheduled_run = {self.shifted_now(offset)} "
                        "WHERE name LIKE 'bench.e%'"
                    )
                )
            self.analyze(engine)
        finally:
            engine.dispose()
        return {"first_start_s": first_start}

    def insert_due(self, app: Any, name: str) -> None:
        # One more plain-task job, stored as the sync stores an entry (a beat_schedule change otherwise needs a
        # restart, which the start-up measures): `define_job` of the entry's definition, through the
        # repository a worker or another beat uses (PostgreSQL: it notifies the sleeping beats).
        from celery_dbsched.beat_schedule import definition_from_entry
        from celery_dbsched.binding import repository_for

        if not hasattr(self, "_writer"):
            self._writer = repository_for(Dbsched.app(self))
        entry = {"task": TASK, "schedule": INTERVAL, "args": [name]}
        self._writer.define_job(definition_from_entry(name, entry, "UTC"))


# -- celery_dbsched on MariaDB ---------------------------------------------------------------------------


class MariaStore:
    """celery_dbsched's columns on MariaDB (issue 14): the same paths as on PostgreSQL, on database
    `<prefix>dbsched` of the MariaDB server (`--mariadb`), recreated at each reset; the bulk setup in MariaDB's
    SQL (the sequence engine's `seq_0_to_<n-1>` for generate_series, CONCAT, `NOW(6)`, ANALYZE TABLE). There is
    no LISTEN/NOTIFY on MariaDB: the beats poll at the run-jobs interval."""

    cfg: Config
    store = "MariaDB"
    modules = ("celery_dbsched", "pymysql")

    @property
    def url(self) -> str:
        return self.cfg.mariadb_url("dbsched")

    def missing(self) -> str | None:
        reason = System.missing(self)  # type: ignore[arg-type]
        if reason:
            return reason.replace("'.[bench]'", "'.[bench,mysql]'")
        return None

    def prepare_store(self) -> None:
        """Once per column and run (in the parent): a new database, migrated to the package's head (dropping the
        database drops the triggers too), so that a schema change on a branch needs no edit here."""
        from .common import mariadb_unavailable

        reason = mariadb_unavailable(self.cfg)
        if reason:
            raise RuntimeError(reason)
        self._recreate()

    def _recreate(self) -> None:
        from celery_dbsched.engine import make_engine
        from celery_dbsched.migrate import migrate

        ensure_mariadb_database(self.cfg, "dbsched", recreate=True)
        engine = make_engine(self.url)
        try:
            migrate(engine)
        finally:
            engine.dispose()

    def reset(self) -> None:
        """Empty tables at the package's head. Migrating a new MariaDB database takes about 1.7 s here (DDL,
        triggers) against 0.5 s on PostgreSQL, so a database that `prepare_store` migrated to the head is emptied
        instead (TRUNCATE of every table but the version table, foreign-key checks off for the session); a
        database at another revision (or none) is recreated and migrated."""
        from sqlalchemy import inspect, text

        from celery_dbsched.engine import make_engine
        from celery_dbsched.migrate import VERSION_TABLE, current_revision, head_revision

        ensure_mariadb_database(self.cfg, "dbsched")
        engine = make_engine(self.url)
        try:
            if current_revision(engine) != head_revision():
                engine.dispose()
                self._recreate()
                return
            tables = [t for t in inspect(engine).get_table_names() if t != VERSION_TABLE]
            with engine.connect() as conn:
                conn.execute(text("SET SESSION foreign_key_checks = 0"))
                for table in tables:
                    conn.execute(text(f"TRUNCATE TABLE `{table}`"))
                conn.execute(text("SET SESSION foreign_key_checks = 1"))
                conn.commit()
        finally:
            engine.dispose()

    def clone_sql(self, quoted: str, picked: str, n: int) -> str:
        # The sequence table's bounds are part of its name (n > 0: the harness's int, not input).
        return (
            f"INSERT INTO dbsched_job (name, {quoted}) SELECT CONCAT(:prefix, s.seq), {picked} "
            f"FROM dbsched_job t, seq_0_to_{int(n) - 1} s WHERE t.name = :template"
        )

    def shifted_now(self, seconds: int) -> str:
        return f"NOW(6) - INTERVAL {-seconds} SECOND" if seconds < 0 else f"NOW(6) + INTERVAL {seconds} SECOND"

    def analyze(self, engine: Any) -> None:
        from sqlalchemy import text

        with engine.connect() as conn:
            conn.execute(text("ANALYZE TABLE dbsched_job")).fetchall()

    def cleanup(self) -> None:
        drop_mariadb_database(self.cfg, "dbsched")


class DbschedMaria(MariaStore, Dbsched):
    key = "dbsched_maria"
    label = "celery_dbsched on MariaDB (@job)"
    configured = (
        "the `@job` column's defaults on MariaDB (PyMySQL): run-jobs interval 5 s, no LISTEN/NOTIFY on MariaDB "
        "(the beat polls at that interval), claims at READ COMMITTED as shipped"
    )


class DbschedTasksMaria(MariaStore, DbschedTasks):
    key = "dbsched_bs_maria"
    label = "celery_dbsched on MariaDB (beat_schedule)"
    configured = (
        "the `beat_schedule` column's setup (N plain-task entries synced at start), with the same defaults as "
        "the MariaDB `@job` column"
    )


# -- django-celery-beat ----------------------------------------------------------------------------------


class DjangoBeat(System):
    key = "django"
    label = "django-celery-beat"
    store = "PostgreSQL"
    modules = ("django_celery_beat", "django", "psycopg")
    _ready = False

    def prepare_store(self) -> None:
        ensure_database(self.cfg, "django", recreate=True)

    def _setup(self) -> None:
        if DjangoBeat._ready:
            return
        import django
        from django.conf import settings
        from sqlalchemy.engine import make_url

        url = make_url(self.cfg.pg_url("django"))
        settings.configure(
            DATABASES={
                "default": {
                    "ENGINE": "django.db.backends.postgresql",
                    "NAME": url.database,
                    "USER": url.username or "postgres",
                    "PASSWORD": url.password or "",
                    "HOST": url.host or "127.0.0.1",
                    "PORT": str(url.port or 5432),
                }
            },
            INSTALLED_APPS=["django_celery_beat"],
            USE_TZ=True,
            TIME_ZONE="UTC",
            DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        )
        django.setup()
        DjangoBeat._ready = True

    def reset(self) -> None:
        self._setup()
        from django.core.management import call_command
        from django.db import connection

        call_command("migrate", "django_celery_beat", verbosity=0)
        with connection.cursor() as cursor:
            cursor.execute(
                "TRUNCATE django_celery_beat_periodictask, django_celery_beat_intervalschedule, "
                "django_celery_beat_periodictasks RESTART IDENTITY CASCADE"
            )

    def _interval(self) -> Any:
        from django_celery_beat.models import IntervalSchedule

        schedule, _ = IntervalSchedule.objects.get_or_create(every=int(INTERVAL), period=IntervalSchedule.SECONDS)
        return schedule

    def _last_run(self, due: bool) -> dt.datetime:
        now = dt.datetime.now(UTC)
        return now - dt.timedelta(seconds=2 * INTERVAL) if due else now + dt.timedelta(seconds=IDLE_AHEAD - INTERVAL)

    def populate(self, n: int, due: bool) -> None:
        self._setup()
        from django.db import connection
        from django_celery_beat.models import PeriodicTask, PeriodicTasks

        interval = self._interval()
        last = self._last_run(due)
        for start in range(0, n, BATCH):
            PeriodicTask.objects.bulk_create(
                [
                    PeriodicTask(
                        name=entry_name(i),
                        task=TASK,
                        interval=interval,
                        args=json.dumps([entry_name(i)]),
                        last_run_at=last,
                    )
                    for i in range(start, min(n, start + BATCH))
                ]
            )
        PeriodicTasks.update_changed()
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE django_celery_beat_periodictask")

    def make_due(self) -> None:
        self._setup()
        from django.db import connection
        from django_celery_beat.models import PeriodicTasks

        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE django_celery_beat_periodictask SET last_run_at = now() - interval '120 seconds' "
                "WHERE name LIKE 'bench.e%%'"
            )
        PeriodicTasks.update_changed()

    def app(self, broker: str = "memory://", **conf: Any) -> Any:
        self._setup()
        return base_app("bench-django", broker, self.cfg.max_interval, **conf)

    configured = "defaults: `DatabaseScheduler.max_interval` 5 s (its own default), `beat_max_loop_interval` unset"

    def build(self, app: Any) -> Any:
        from django_celery_beat.schedulers import DatabaseScheduler

        return DatabaseScheduler(app=app)

    def insert_due(self, app: Any, name: str) -> None:
        from django.db import close_old_connections
        from django_celery_beat.models import PeriodicTask

        PeriodicTask.objects.create(
            name=name, task=TASK, interval=self._interval(), args=json.dumps([name]), last_run_at=self._last_run(True)
        )
        close_old_connections()

    def cleanup(self) -> None:
        from .common import drop_database

        drop_database(self.cfg, "django")


# -- sqlalchemy-celery-beat ------------------------------------------------------------------------------


class SqlaBeat(System):
    key = "sqla"
    label = "sqlalchemy-celery-beat"
    store = "PostgreSQL"
    modules = ("sqlalchemy_celery_beat", "psycopg")

    @property
    def url(self) -> str:
        return self.cfg.pg_url("sqla").replace("postgresql://", "postgresql+psycopg://", 1)

    def prepare_store(self) -> None:
        ensure_database(self.cfg, "sqla", recreate=True)

    def _engine(self) -> Any:
        from sqlalchemy import create_engine

        return create_engine(self.url).execution_options(schema_translate_map={"celery_schema": None})

    def reset(self) -> None:
        from sqlalchemy_celery_beat.session import ModelBase

        engine = self._engine()
        ModelBase.metadata.drop_all(engine)
        ModelBase.metadata.create_all(engine)
        engine.dispose()

    def _interval_id(self, conn: Any) -> int:
        from sqlalchemy import select
        from sqlalchemy_celery_beat.models import IntervalSchedule

        table = IntervalSchedule.__table__
        found = conn.execute(select(table.c.id).where(table.c.every == int(INTERVAL))).scalar()
        if found is None:
            found = conn.execute(
                table.insert().values(every=int(INTERVAL), period="seconds").returning(table.c.id)
            ).scalar()
        return int(found)

    def populate(self, n: int, due: bool) -> None:
        from sqlalchemy import text
        from sqlalchemy_celery_beat.models import PeriodicTask, PeriodicTaskChanged

        engine = self._engine()
        now = dt.datetime.now(UTC)
        last = now - dt.timedelta(seconds=2 * INTERVAL) if due else now + dt.timedelta(seconds=IDLE_AHEAD - INTERVAL)
        with engine.begin() as conn:
            interval_id = self._interval_id(conn)
            table = PeriodicTask.__table__
            for start in range(0, n, BATCH):
                conn.execute(
                    table.insert(),
                    [
                        {
                            "name": entry_name(i),
                            "task": TASK,
                            "args": json.dumps([entry_name(i)]),
                            "kwargs": "{}",
                            "discriminator": "intervalschedule",
                            "schedule_id": interval_id,
                            "last_run_at": last,
                            "enabled": True,
                            "one_off": False,
                            "total_run_count": 0,
                            "description": "",
                        }
                        for i in range(start, min(n, start + BATCH))
                    ],
                )
            PeriodicTaskChanged.update_changed(None, conn, None)
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(f"VACUUM ANALYZE {table.name}"))
        engine.dispose()

    def make_due(self) -> None:
        from sqlalchemy import text
        from sqlalchemy_celery_beat.models import PeriodicTask, PeriodicTaskChanged

        engine = self._engine()
        with engine.begin() as conn:
            conn.execute(
                text(
                    f"UPDATE {PeriodicTask.__table__.name} SET last_run_at = now() - interval '120 seconds' "
                    "WHERE name LIKE 'bench.e%'"
                )
            )
            PeriodicTaskChanged.update_changed(None, conn, None)
        engine.dispose()

    def app(self, broker: str = "memory://", **conf: Any) -> Any:
        return base_app("bench-sqla", broker, self.cfg.max_interval, beat_dburi=self.url, **conf)

    configured = "defaults: `DatabaseScheduler.max_interval` 5 s (its own default), `beat_max_loop_interval` unset"

    def build(self, app: Any) -> Any:
        from sqlalchemy_celery_beat.schedulers import DatabaseScheduler

        return DatabaseScheduler(app=app)

    def insert_due(self, app: Any, name: str) -> None:
        from sqlalchemy.orm import Session
        from sqlalchemy_celery_beat.models import IntervalSchedule, PeriodicTask

        if not hasattr(self, "_writer"):
            self._writer = self._engine()
        with Session(self._writer) as session:
            interval = session.query(IntervalSchedule).filter_by(every=int(INTERVAL)).first()
            session.add(
                PeriodicTask(
                    name=name,
                    task=TASK,
                    args=json.dumps([name]),
                    schedule_model=interval,
                    last_run_at=dt.datetime.now(UTC) - dt.timedelta(seconds=2 * INTERVAL),
                )
            )
            session.commit()  # its after_insert listener marks the schedule changed

    def cleanup(self) -> None:
        from .common import drop_database

        drop_database(self.cfg, "sqla")


# -- celery-redbeat --------------------------------------------------------------------------------------


class RedBeat(System):
    key = "redbeat"
    label = "celery-redbeat"
    store = "Redis"
    modules = ("redbeat", "redis")

    def _client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.cfg.redis_url)

    def prepare_store(self) -> None:
        self._client().ping()

    def reset(self) -> None:
        self._client().flushdb()

    def app(self, broker: str = "memory://", **conf: Any) -> Any:
        return base_app(
            "bench-redbeat",
            broker,
            self.cfg.max_interval,
            redbeat_redis_url=self.cfg.redis_url,
            # RedBeat 2.4.2 deprecates falling back to broker_transport_options and asks for this setting.
            redbeat_redis_options={},
            redbeat_key_prefix="bench:",
            **conf,
        )

    configured = (
        "defaults: `beat_max_loop_interval` unset, so Celery's 300 s, and `redbeat_lock_timeout` unset, so "
        "5 x 300 s = 1,500 s (RedBeat's documented default); `redbeat_redis_url` and `redbeat_redis_options` "
        "set explicitly, as RedBeat 2.4.2's deprecation of the broker fallbacks asks"
    )

    def _write(self, app: Any, entries: list[Any]) -> None:
        """What `RedBeatSchedulerEntry.save()` writes, for many entries in one pipeline (setup only)."""
        from redbeat.decoder import RedBeatJSONEncoder

        schedule_key = app.redbeat_conf.schedule_key
        pipe = self._client().pipeline(transaction=False)
        for entry in entries:
            definition = {
                "name": entry.name,
                "task": entry.task,
                "args": entry.args,
                "kwargs": entry.kwargs,
                "options": entry.options,
                "schedule": entry.schedule,
                "enabled": entry.enabled,
            }
            pipe.hset(entry.key, "definition", json.dumps(definition, cls=RedBeatJSONEncoder))
            pipe.hset(entry.key, "meta", json.dumps({"last_run_at": entry.last_run_at}, cls=RedBeatJSONEncoder))
            pipe.zadd(schedule_key, {entry.key: entry.score})
        pipe.execute()

    def _entries(self, app: Any, names: list[str], last: dt.datetime) -> list[Any]:
        from celery.schedules import schedule
        from redbeat import RedBeatSchedulerEntry

        every = schedule(dt.timedelta(seconds=INTERVAL), app=app)
        return [RedBeatSchedulerEntry(name, TASK, every, args=[name], app=app, last_run_at=last) for name in names]

    def populate(self, n: int, due: bool, app: Any = None) -> None:
        app = app or self.app()
        now = dt.datetime.now(UTC)
        last = now - dt.timedelta(seconds=2 * INTERVAL) if due else now + dt.timedelta(seconds=IDLE_AHEAD - INTERVAL)
        for start in range(0, n, BATCH):
            self._write(app, self._entries(app, [entry_name(i) for i in range(start, min(n, start + BATCH))], last))

    def make_due(self) -> None:
        from redbeat.schedulers import ensure_conf

        app = self.app()
        ensure_conf(app)
        client = self._client()
        keys = client.zrange(app.redbeat_conf.schedule_key, 0, -1)
        self.populate(len([k for k in keys if k.startswith(b"bench:bench.e")]), True, app)

    def build(self, app: Any) -> Any:
        from redbeat import RedBeatScheduler

        return RedBeatScheduler(app=app)

    def start(self, scheduler: Any) -> None:
        # `celery beat` sends beat_init, on which RedBeat takes its lock (blocking while another beat holds it).
        from redbeat.schedulers import acquire_distributed_beat_lock

        acquire_distributed_beat_lock(sender=types.SimpleNamespace(scheduler=scheduler))
        # redis-py keeps the lock token thread-local; this harness ticks the same scheduler from a loop thread
        # (pickup) and the main thread (dispatch), so share the token (beat itself ticks from one thread).
        lock = scheduler.lock
        if lock is not None:
            lock.local = types.SimpleNamespace(token=lock.local.token)

    def insert_due(self, app: Any, name: str) -> None:
        from celery.schedules import schedule
        from redbeat import RedBeatSchedulerEntry

        RedBeatSchedulerEntry(
            name,
            TASK,
            schedule(dt.timedelta(seconds=INTERVAL), app=app),
            args=[name],
            app=app,
            last_run_at=dt.datetime.now(UTC) - dt.timedelta(seconds=2 * INTERVAL),
        ).save()

    def cleanup(self) -> None:
        self._client().flushdb()


SYSTEMS: dict[str, type[System]] = {
    s.key: s for s in (Dbsched, DbschedTasks, DbschedMaria, DbschedTasksMaria, DjangoBeat, SqlaBeat, RedBeat)
}


def is_dbsched(key: str) -> bool:
    """celery_dbsched, on either path (`@job` or `beat_schedule`), on either database."""
    return issubclass(SYSTEMS[key], Dbsched)


def is_mariadb(key: str) -> bool:
    """celery_dbsched on MariaDB (issue 14)."""
    return issubclass(SYSTEMS[key], MariaStore)
