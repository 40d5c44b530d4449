"""The dashboard: `celery -A proj dbsched web` (extra `web`: Starlette, uvicorn, Jinja2).

Pages (Jobs, Job detail, Runs, Fleet) and a JSON API beside them (`/api/...`), read from a `JobRepository`
through bounded, keyset-paged queries; actions (trigger, pause, resume, cancel a run, edit a job) need the
token (`dbsched_web_token` / DBSCHED_WEB_TOKEN) and are CSRF-checked and logged. `create_app` builds it."""

from __future__ import annotations

from .app import create_app
from .auth import check_bind

__all__ = ["check_bind", "create_app"]
