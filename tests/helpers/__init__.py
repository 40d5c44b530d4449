"""The tests' helpers, one home each: `services` (the databases and brokers), `processes` (real celery
subprocesses), `polling` (`wait_for`), `apps` (Celery apps and durations), `repository` (claiming as a beat
does), `cluster` (the end-to-end cluster). tests/conftest.py holds only the fixtures and hooks built on them.
"""
