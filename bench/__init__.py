"""Benchmark harness: celery_dbsched side by side with django-celery-beat, sqlalchemy-celery-beat and RedBeat.

Run `python bench/run.py --help` (or `bench/run.sh`, which also installs the peers). See bench/README.md.
"""
