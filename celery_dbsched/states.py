"""The vocabulary of runs and jobs, as `str` enums: a member is its stored value (it compares equal to it and
prints as it), so f-strings, JSON and SQL see the plain text; records carry the members."""

from __future__ import annotations

import enum


class _Value(str, enum.Enum):
    def __str__(self) -> str:
        return str(self.value)


class RunState(_Value):
    """A run's `status` (design: runs and their states)."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    DISPATCHED = "dispatched"


ACTIVE = (RunState.QUEUED, RunState.RUNNING)  # hold the job's slot (design §2)
FINAL = (RunState.COMPLETED, RunState.FAILED, RunState.INTERRUPTED, RunState.DISPATCHED)  # history


class InterruptReason(_Value):
    """Why a run ended `interrupted` (its `interrupt_reason`)."""

    STALLED = "stalled"  # no progress within the threshold, or its worker stopped answering: retried
    SHUTDOWN = "shutdown"  # a worker's warm shutdown: due again at once
    RESTART = "restart"  # the process that owned it restarted and found it: due again at once
    CANCELLED = "cancelled"  # an operator: its next slot
    EXPIRED = "expired"  # not started before its slot + expires: its next slot


class JobKind(_Value):
    """What a job is: code registered with @job/register_job that runs in our wrapper task (`job`), or a plain
    Celery task from beat_schedule that the beat sends as it is (`task`)."""

    JOB = "job"
    TASK = "task"


class Misfire(_Value):
    """What a claim does with a slot later than the job's `misfire_grace`: run it once, or skip to the next."""

    RUN_ONCE = "run_once"
    SKIP = "skip"


class Origin(_Value):
    """Who owns a job (its `origin`): code (`@job`/`register_job`), the app's `beat_schedule`, or the database
    itself (created at run time through `celery_dbsched.runtime`, the CLI, the dashboard or an importer). A sync
    of code or `beat_schedule` never touches a runtime job, and a runtime job never takes a declared name."""

    CODE = "code"
    BEAT_SCHEDULE = "beat_schedule"
    RUNTIME = "runtime"
