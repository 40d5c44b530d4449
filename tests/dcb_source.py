"""A django-celery-beat database written by django-celery-beat itself, for tests/test_import_dcb.py (run as a
subprocess: Django is configured once per process).

    python dcb_source.py create URL            the migrations, then a few dozen PeriodicTasks of every kind;
                                               prints them as JSON (every field, as the ORM reads them back)
    python dcb_source.py bulk URL N            the migrations, then N interval/crontab PeriodicTasks (the benchmark)
    python dcb_source.py due URL               for each enabled task, what django-celery-beat's ModelEntry.is_due()
                                               says now: {"name": {"due": bool, "next": seconds, "at": ISO}}
    python dcb_source.py live URL              three short entries of tests/migration_app.py's task, as a beat that
                                               just ran them left them (the live switch test)
    python dcb_source.py touch URL NAME...     each task's kwargs changed (a second import updates just those)

URL: sqlite:///path or postgresql://user@host:port/db. DCB_TIME_ZONE (Django's TIME_ZONE, default Europe/Berlin) and
DCB_USE_TZ (default 1) configure Django.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from typing import Any
from urllib.parse import urlsplit


def configure(url: str) -> None:
    import django
    from django.conf import settings

    if os.environ.get("DCB_USE_TZ", "1") != "1":  # naive local times: make "local" the project's TIME_ZONE
        os.environ["TZ"] = os.environ.get("DCB_TIME_ZONE", "Europe/Berlin")
        time.tzset()
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        database = {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": parts.path[1:] if url.startswith("sqlite:///") else parts.path,
        }
    else:
        database = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": parts.path.lstrip("/"),
            "USER": parts.username or "postgres",
            "PASSWORD": parts.password or "",
            "HOST": parts.hostname or "127.0.0.1",
            "PORT": str(parts.port or 5432),
        }
    settings.configure(
        DATABASES={"default": database},
        INSTALLED_APPS=["django_celery_beat"],
        USE_TZ=os.environ.get("DCB_USE_TZ", "1") == "1",
        TIME_ZONE=os.environ.get("DCB_TIME_ZONE", "Europe/Berlin"),
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    )
    django.setup()


def migrate() -> None:
    from django.core.management import call_command

    call_command("migrate", "django_celery_beat", verbosity=0)


def create() -> list[dict[str, Any]]:
    from django.utils import timezone
    from django_celery_beat.models import (
        ClockedSchedule,
        CrontabSchedule,
        IntervalSchedule,
        PeriodicTask,
        SolarSchedule,
    )

    now = timezone.now()
    hour, day = dt.timedelta(hours=1), dt.timedelta(days=1)

    def interval(every: int, period: str) -> IntervalSchedule:
        return IntervalSchedule.objects.get_or_create(every=every, period=period)[0]

    def crontab(minute: str, hour_: str, dow: str, dom: str, moy: str, tz: str) -> CrontabSchedule:
        return CrontabSchedule.objects.get_or_create(
            minute=minute, hour=hour_, day_of_week=dow, day_of_month=dom, month_of_year=moy, timezone=tz
        )[0]

    def solar(event: str, lat: str, lon: str) -> SolarSchedule:
        return SolarSchedule.objects.get_or_create(event=event, latitude=lat, longitude=lon)[0]

    def clocked(at: dt.datetime) -> ClockedSchedule:
        return ClockedSchedule.objects.create(clocked_time=at)

    def task(name: str, **fields: Any) -> None:
        PeriodicTask.objects.create(name=name, task=fields.pop("task", "proj.tasks.work"), **fields)

    # Intervals of every period: never ran; ran a moment ago (not due); ran long ago (due now).
    for period, every in (("days", 1), ("hours", 2), ("minutes", 15), ("seconds", 30), ("microseconds", 500_000)):
        task(f"interval-{period}", interval=interval(every, period))
        task(f"interval-{period}-ran", interval=interval(every, period), last_run_at=now - dt.timedelta(seconds=0.2))
        task(f"interval-{period}-late", interval=interval(every, period), last_run_at=now - 3 * day)
    task("interval-minutes-ran-recently", interval=interval(15, "minutes"), last_run_at=now - dt.timedelta(minutes=7))
    # Crontabs in several zones.
    for label, cron in (
        ("utc-daily", ("0", "4", "*", "*", "*", "UTC")),
        ("berlin-weekdays", ("30", "9", "1-5", "*", "*", "Europe/Berlin")),
        ("newyork-5min", ("*/5", "*", "*", "*", "*", "America/New_York")),
        ("kolkata-monthly", ("0", "0", "*", "1", "*", "Asia/Kolkata")),
        ("sydney-2h", ("15", "*/2", "*", "*", "*", "Australia/Sydney")),
        ("tokyo-jan", ("0", "12", "*", "1", "1", "Asia/Tokyo")),
    ):
        task(f"crontab-{label}", crontab=crontab(*cron))
        task(f"crontab-{label}-ran", crontab=crontab(*cron), last_run_at=now - dt.timedelta(seconds=1))
        task(f"crontab-{label}-late", crontab=crontab(*cron), last_run_at=now - 40 * day)
    # Solar events.
    for event, lat, lon in (
        ("sunrise", "52.520000", "13.405000"),
        ("sunset", "40.712800", "-74.006000"),
        ("solar_noon", "-33.868800", "151.209300"),
        ("dawn_civil", "35.676200", "139.650300"),
    ):
        task(f"solar-{event}", solar=solar(event, lat, lon))
        task(f"solar-{event}-ran", solar=solar(event, lat, lon), last_run_at=now - dt.timedelta(seconds=1))
    # Clocked one-offs: in the future, in the past (fires at once), and one that already ran.
    task("clocked-future", clocked=clocked(now + 2 * hour), one_off=True)
    task("clocked-past", clocked=clocked(now - hour), one_off=True)
    task("clocked-ran", clocked=clocked(now - 2 * hour), one_off=True, total_run_count=1, last_run_at=now - 2 * hour)
    task("interval-one-off", interval=interval(10, "minutes"), one_off=True)
    task("interval-one-off-ran", interval=interval(10, "minutes"), one_off=True, total_run_count=1, last_run_at=now)
    # start_time: in the future (interval, crontab), in the past (never ran: runs at once).
    task("start-future-interval", interval=interval(1, "hours"), start_time=now + 3 * hour)
    task("start-future-crontab", crontab=crontab("0", "*/6", "*", "*", "*", "Europe/Berlin"), start_time=now + day)
    task("start-past-interval", interval=interval(1, "hours"), start_time=now - 5 * hour)
    task("start-future-ran", interval=interval(1, "hours"), start_time=now + 2 * hour, last_run_at=now - hour)
    # expires and expire_seconds.
    task("expires-future", interval=interval(5, "minutes"), expires=now + 5 * day)
    task("expires-past", interval=interval(5, "minutes"), expires=now - day)
    task("expire-seconds", interval=interval(5, "minutes"), expire_seconds=120)
    # Disabled; every message option; args, kwargs, headers, description.
    task("disabled", interval=interval(5, "minutes"), enabled=False)
    task(
        "all-options",
        task="proj.tasks.report",
        interval=interval(5, "minutes"),
        args=json.dumps([1, "two", {"three": 3}]),
        kwargs=json.dumps({"to": "ops", "n": [1, 2]}),
        queue="reports",
        exchange="reports-x",
        routing_key="reports.daily",
        priority=7,
        headers=json.dumps({"tenant": "acme"}),
        description="The daily report, with every option.",
        last_run_at=now - dt.timedelta(minutes=2),
    )
    # Celery's own entry (django-celery-beat's beat adds it when result_expires is set): left out.
    task("celery.backend_cleanup", task="celery.backend_cleanup", crontab=crontab("0", "4", "*", "*", "*", "UTC"))
    return [describe(t) for t in PeriodicTask.objects.order_by("id")]


def describe(t: Any) -> dict[str, Any]:
    def iso(value: dt.datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    row: dict[str, Any] = {
        key: getattr(t, key)
        for key in (
            "name", "task", "args", "kwargs", "queue", "exchange", "routing_key", "priority", "headers",
            "expire_seconds", "one_off", "enabled", "total_run_count", "description",
        )
    }  # fmt: skip
    row.update(
        expires=iso(t.expires), start_time=iso(t.start_time), last_run_at=iso(t.last_run_at),
        date_changed=iso(t.date_changed),
    )  # fmt: skip
    if t.interval:
        row["schedule"] = {"type": "interval", "every": t.interval.every, "period": t.interval.period}
    elif t.crontab:
        c = t.crontab
        row["schedule"] = {
            "type": "crontab", "minute": c.minute, "hour": c.hour, "day_of_week": c.day_of_week,
            "day_of_month": c.day_of_month, "month_of_year": c.month_of_year, "timezone": str(c.timezone),
        }  # fmt: skip
    elif t.solar:
        row["schedule"] = {
            "type": "solar",
            "event": t.solar.event,
            "lat": float(t.solar.latitude),
            "lon": float(t.solar.longitude),
        }
    else:
        row["schedule"] = {"type": "clocked", "at": iso(t.clocked.clocked_time)}
    return row


def bulk(count: int) -> None:
    from django.utils import timezone
    from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

    now = timezone.now()
    every = [IntervalSchedule.objects.get_or_create(every=n, period="minutes")[0] for n in (1, 5, 15, 60)]
    crons = [
        CrontabSchedule.objects.get_or_create(minute=str(m), hour="*", timezone="Europe/Berlin")[0] for m in (0, 20, 40)
    ]
    tasks = []
    for i in range(count):
        fields: dict[str, Any] = {"interval": every[i % 4]} if i % 2 else {"crontab": crons[i % 3]}
        tasks.append(
            PeriodicTask(
                name=f"bulk-{i:05d}",
                task="proj.tasks.work",
                kwargs=json.dumps({"i": i}),
                queue="bulk" if i % 3 == 0 else None,
                last_run_at=now - dt.timedelta(seconds=i % 600),
                **fields,
            )
        )
    PeriodicTask.objects.bulk_create(tasks, batch_size=1000)


def live() -> None:
    from django.utils import timezone
    from django_celery_beat.models import ClockedSchedule, IntervalSchedule, PeriodicTask

    now = timezone.now()
    # Short (CI time), yet longer than an import and a beat start on a busy machine: the first slots are ahead.
    for name, every, last_run_at in (("live-a", 8, now), ("live-b", 10, now - dt.timedelta(seconds=3))):
        PeriodicTask.objects.create(
            name=name,
            task="migration_app.record",
            args=json.dumps([name]),
            interval=IntervalSchedule.objects.get_or_create(every=every, period="seconds")[0],
            last_run_at=last_run_at,
            total_run_count=3,
        )
    PeriodicTask.objects.create(
        name="live-once",
        task="migration_app.record",
        args=json.dumps(["live-once"]),
        clocked=ClockedSchedule.objects.create(clocked_time=now + dt.timedelta(seconds=12)),
        one_off=True,
    )


def due() -> dict[str, Any]:
    from celery import Celery
    from django.utils import timezone
    from django_celery_beat.models import PeriodicTask
    from django_celery_beat.schedulers import ModelEntry

    app = Celery("dcb-source", set_as_current=True)
    found = {}
    for model in PeriodicTask.objects.filter(enabled=True).order_by("id"):
        at = timezone.now()
        state = ModelEntry(model, app=app).is_due()
        found[model.name] = {"due": bool(state.is_due), "next": float(state.next), "at": at.isoformat()}
    return found


def touch(names: list[str]) -> None:
    from django_celery_beat.models import PeriodicTask

    for name in names:
        task = PeriodicTask.objects.get(name=name)
        task.kwargs = json.dumps({"touched": True})
        task.save()


def main(argv: list[str]) -> None:
    action, url = argv[0], argv[1]
    configure(url)
    if action == "create":
        migrate()
        print(json.dumps(create()))
    elif action == "bulk":
        migrate()
        bulk(int(argv[2]))
    elif action == "live":
        migrate()
        live()
    elif action == "due":
        print(json.dumps(due()))
    elif action == "touch":
        touch(argv[2:])
    else:
        raise SystemExit(f"unknown action {action!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
