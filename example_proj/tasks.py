"""A plain Celery task, scheduled the stock way through `beat_schedule` (see celery_app.py)."""

from __future__ import annotations

import logging

from .celery_app import app

logger = logging.getLogger(__name__)


@app.task(name="example_proj.tasks.rotate_logs")
def rotate_logs(keep: int) -> int:
    logger.info("rotated logs, kept %d", keep)
    return keep
