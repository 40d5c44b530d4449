"""An example Celery project scheduled by celery_dbsched (see README: `python -m example_proj`)."""

from .celery_app import app

__all__ = ["app"]
