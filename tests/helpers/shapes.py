"""The documented JSON shapes (README, "Status and health"): the keys, in order, that `--json` and
`celery_dbsched.observe` promise. A key added is added here and to the README; one removed breaks users."""

from __future__ import annotations

SERVER_KEYS = ["id", "role", "host", "pid", "version", "started", "last_seen", "heartbeat_interval", "alive"]
SERVER_KEYS += ["silent_for"]
BEAT_KEYS = [*SERVER_KEYS, "last_tick", "claims_last_minute", "claim_lag_p50", "claim_lag_max"]
WORKER_KEYS = [*SERVER_KEYS, "runs_in_flight"]
RUN_KEYS = ["id", "job", "kind", "status", "interrupt_reason", "completed", "total", "scheduled_for", "claimed"]
RUN_KEYS += ["started", "updated", "ended", "duration", "claimed_by", "worker", "queue", "task_id", "slot", "error"]
STATUS_KEYS = ["now", "healthy", "problems", "beats", "workers", "due", "active", "stalled", "failures_last_hour"]
STATUS_KEYS += ["orphaned_jobs"]
JOB_KEYS = ["name", "kind", "origin", "state", "description", "schedule", "next_run", "due", "queue", "task"]
JOB_KEYS += ["failure_count", "active_runs", "max_active", "last_run", "overrides", "one_off", "expire_time"]
