"""The Celery app that `tests/test_controls.py` drives through `celery -A controls_app dbsched ...`.

It only points at the test's database (CONTROLS_DATABASE_URL): the commands need nothing else, no broker
and no job code.
"""

from __future__ import annotations

import os

from celery import Celery
from helpers.prompt_stop import stop_promptly

app = stop_promptly(Celery("controls_app"))  # workers stop within 0.1 s (helpers/prompt_stop.py)
app.conf.dbsched_database_url = os.environ["CONTROLS_DATABASE_URL"]
