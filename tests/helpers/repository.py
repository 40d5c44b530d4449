"""Claiming runs on a `JobRepository` as a beat does."""

from __future__ import annotations

from celery_dbsched.records import RunRecord
from celery_dbsched.repository import JobRepository


def claim(repository: JobRepository, server_id: str = "beat-1", limit: int = 1000) -> list[RunRecord]:
    return repository.claim_runs(server_id, limit).runs


def claim_one(repository: JobRepository, name: str, server_id: str = "beat-1") -> RunRecord:
    """The one run of job `name` claimed now (other due jobs are claimed too)."""
    runs = [run for run in claim(repository, server_id) if run.job_name == name]
    assert len(runs) == 1, f"expected to claim {name!r}, claimed {runs}"
    return runs[0]
