"""Fault suite, rolling upgrade (issue 15, item 7): beats and workers of an earlier release keep running beside
the new ones while the new code's `migrate` changes the schema under them.

The earlier releases are commits of this repository (there are no tags, and tags may not reach a CI clone):

- OLD_SCHEMA_RELEASE, 5583563: schema head 0005, so migrations 0006, 0007 and 0008 run under its processes;
- CODE_ONLY_RELEASE, 4aa3eb0: schema head 0008, the same as now (a code-only upgrade; behind `soak`).

Their `celery_dbsched` and tests/e2e_app.py (with tests/helpers) come out of tests/releases/<commit>.tar.gz
(5583563, so that CI does not depend on the clone's history) or the clone's history (`git archive`) into a
folder that the old processes get as PYTHONPATH (the same interpreter and dependencies: the old release needed
nothing else). A small wrapper app prints which `celery_dbsched` it imported, and the test checks that it is
the extracted one: an editable install of the new code must not win over PYTHONPATH.

The scenario, on PostgreSQL with the filesystem transport (the broker is not the subject):

1. an old worker and an old beat start with the old release's defaults (so they migrate to its head) and
   run jobs every second (one of them long, so that a run started before the migration ends after it);
2. a new worker and a new beat start (`dbsched_auto_migrate = False`): they stop at once, each with the one
   line that says the schema is older and to run `migrate`;
3. the new code's `dbsched migrate` runs while the old processes work; then a new worker and a new beat
   start and run beside the old ones;
4. an old worker started now (a restart during the rollout) stops with the one line that says the schema is
   newer than it knows (after Celery's "Unrecoverable error" traceback: the old release's code); a new
   `dbsched status` meanwhile reads the old processes' rows and reports healthy;
5. the old worker is stopped (SIGTERM, exit 0);
6. (0005 only) with the new beat stopped, a clocked schedule (one-off, new with schema 0008) is added: the old
   beat claims it, cannot read it and exits with a traceback (`unknown schedule spec`), its claim rolled back;
   a new beat started then runs it. Hence the documented order: no such schedules until every beat is new;
7. the new processes carry on alone.

Asserted: no traceback in any other log (those of steps 4 and 6 are the old release's code); no run started
twice, no slot run twice, never two active runs of a job (sampled throughout); every slot of every job
dispatched on its cadence (no gap longer than the usual lateness, plus the time step 6 left without a beat);
the old beat claimed and the old worker finished runs on the new schema, among them the run that began before
the migration; each release's worker ran runs the other release's beat claimed (so the order of the roll is
free). Runs a worker's warm shutdown interrupted are run again for the same slot, as at any stop: they are
counted apart, not as doubles. One line `FAULTS ...` with the figures (DBSCHED_FAULT_REPORT as elsewhere).
"""

from __future__ import annotations

import datetime as dt
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest
from celery import Celery
from helpers.cluster import LATENESS, PG_FS, assert_runs_spaced, e2e_env, on
from helpers.polling import wait_for
from helpers.processes import REPO_DIR, CeleryProcess, Processes
from helpers.services import Broker, Database, unavailable
from sqlalchemy import select
from test_faults_beats import ActiveRunSampler, all_runs, doubles, report, start_events
from test_startup_errors import exit_code, problem_lines

from celery_dbsched.binding import forget_repository
from celery_dbsched.migrate import current_revision, head_revision
from celery_dbsched.repository import JobRepository
from celery_dbsched.runtime import add_schedule
from celery_dbsched.schema import run_table

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

# Releases are the commits that landed (no tags). 5583563: "Merge i10-clock", schema head 0005.
OLD_SCHEMA_RELEASE = "5583563"
# 4aa3eb0: the release before this one, schema head 0008 as now: a code-only upgrade.
CODE_ONLY_RELEASE = "4aa3eb0"

OLD_APP = "upgrade_old_app"
NEW_APP = "e2e_app"
# The wrapper the old processes run: the old release's own tests/e2e_app.py, and a line naming the
# celery_dbsched it imported (checked: PYTHONPATH, not the installed new code).
OLD_APP_SOURCE = """\
import celery_dbsched
from e2e_app import app  # the old release's app module

print(f"UPGRADE celery_dbsched from {celery_dbsched.__file__}", flush=True)
"""

SLOW_JOB = "up.long"
JOB_EVERY = 1.0
SLOW_SECONDS = 5.0  # the long job: a run that began before the migration ends after it


# Releases kept as archives (`git archive --format=tar.gz <commit> celery_dbsched tests/e2e_app.py tests/helpers`)
# so that the CI scenario does not depend on the clone's history (a shallow clone has none).
RELEASES_DIR = Path(__file__).parent / "releases"


def extract_release(commit: str, folder: Path) -> Path:
    """The release's `celery_dbsched`, tests/e2e_app.py and the helpers it imports (and the wrapper app) in
    `folder`: from tests/releases/<commit>.tar.gz if it is there, else from git."""
    kept = RELEASES_DIR / f"{commit}.tar.gz"
    if kept.exists():
        folder.mkdir(parents=True)
        subprocess.run(["tar", "-xzf", str(kept), "-C", str(folder)], check=True)
        (folder / "tests" / f"{OLD_APP}.py").write_text(OLD_APP_SOURCE)
        return folder
    if shutil.which("git") is None:
        unavailable("git is needed to take an earlier release out of this clone's history")
    git = ["git", "-C", str(REPO_DIR)]
    found = subprocess.run([*git, "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True, check=False)
    if found.returncode != 0:
        unavailable(f"release commit {commit} is not in the git history of {REPO_DIR} (a shallow clone?): fetch it")
    folder.mkdir(parents=True)
    archive = subprocess.run(
        [*git, "archive", commit, "celery_dbsched", "tests/e2e_app.py", "tests/helpers"],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    (folder / "tests" / f"{OLD_APP}.py").write_text(OLD_APP_SOURCE)
    return folder


class Run(NamedTuple):
    id: int
    job_name: str
    status: str
    claimed_by: str
    worker: str | None
    create_time: dt.datetime
    end_time: dt.datetime | None


def new_app(database: Database) -> Celery:
    """An app of the new code in the test process, on `database` (to call the public API)."""
    app = Celery("upgrade-test", set_as_current=False)
    app.conf.dbsched_database_url = database.url
    return app


def runs_now(repository: JobRepository) -> list[Run]:
    """Every run, oldest first, through the columns every schema revision has (the test reads the database
    before and after the migration; the repository's own reads need the current schema)."""
    r = run_table
    columns = [r.c.id, r.c.job_name, r.c.status, r.c.claimed_by, r.c.worker, r.c.create_time, r.c.end_time]
    with repository.engine.connect() as conn:
        return [Run(*row) for row in conn.execute(select(*columns).order_by(r.c.id)).all()]


def tracebacks(processes: Processes, *, clocked_ok: bool) -> list[str]:
    """Logs with a traceback, but for the old worker restarted on the new schema (assert_one_clear_stop) and,
    with `clocked_ok`, the old beat stopped by a clocked schedule (step 6)."""
    return [
        f"{p.name}:\n{p.log_tail(60)}"
        for p in processes.started
        if "Traceback" in p.log() and p.name != "old-worker-late" and not (p.name == "old-beat" and clocked_ok)
    ]


def upgrade_scenario(
    release: str,
    database: Database,
    broker: Broker,
    processes: Processes,
    tmp_path: Path,
    *,
    name: str,
    schema_changes: bool,
) -> None:
    """The scenario of the module docstring; `schema_changes`: the release's schema is older than the head
    (steps 2 and 4 refuse), else `migrate` has nothing to do and an old process may start at any time."""
    began = time.monotonic()
    old_tree = extract_release(release, tmp_path / "old")
    old_path = {"PYTHONPATH": f"{old_tree / 'tests'}:{old_tree}"}
    old_code = f"UPGRADE celery_dbsched from {old_tree / 'celery_dbsched' / '__init__.py'}"
    setup_s = time.monotonic() - began
    events = tmp_path / "events"
    jobs = [{"kind": "instant", "name": f"up.{n}", "every": JOB_EVERY} for n in range(4)]
    jobs.append({"kind": "long", "name": SLOW_JOB, "every": JOB_EVERY, "seconds": SLOW_SECONDS, "step": 0.5})
    names = [spec["name"] for spec in jobs]

    def old(kind: str) -> dict[str, str]:
        # The old release's defaults, as deployed: dbsched_auto_migrate on (it migrates to its own head).
        return {**e2e_env(database, broker, events, kind, jobs if "worker" in kind else [], {}), **old_path}

    def new(kind: str) -> dict[str, str]:
        settings = {"dbsched_auto_migrate": False}
        return e2e_env(database, broker, events, kind, jobs if "worker" in kind else [], settings)

    no_beat_s = 0.0  # step 6: how long no beat ran
    # 1. The old release migrates at its start and runs.
    old_worker = processes.start_worker(OLD_APP, env=old("old-worker"), name="old-worker", node="old@%h")
    old_worker.wait_ready()
    old_beat = processes.start_beat(OLD_APP, env=old("old-beat"), name="old-beat")
    repo = database.repository()
    old_revision = current_revision(repo.engine)
    assert old_revision is not None and (old_revision < head_revision()) == schema_changes, old_revision
    sampler = ActiveRunSampler(repo, interval=0.1)
    sampler.start()
    try:
        # 2. New processes on the older schema: one clear line each, and they stop.
        early = (
            [
                processes.start_worker(NEW_APP, env=new("new-worker-early"), name="new-worker-early"),
                processes.start_beat(NEW_APP, env=new("new-beat-early"), name="new-beat-early"),
            ]
            if schema_changes
            else []
        )
        for process in (old_worker, old_beat):
            process.wait_for_log(old_code)  # the old release's code, not the installed one

        def ended_once() -> bool:
            processes.check_alive(old_worker, old_beat)
            ended = {run.job_name for run in runs_now(repo) if run.end_time}
            return ended >= set(names) - {SLOW_JOB}

        wait_for(ended_once, 60, message="a run of each job by the old worker")
        for process in early:
            assert exit_code(process, 60) != 0, process.log_tail()
            # One line, the test_startup_errors way: the schema's revision, the code's, and what to run.
            problems = problem_lines(process)
            expected = f"schema revision '{old_revision}', this celery_dbsched needs '{head_revision()}'"
            assert len(problems) == 1 and expected in problems[0], process.log_tail()
            assert "dbsched migrate" in problems[0], process.log_tail()

        # 3. The new code's migrate under the running old processes; then the new processes beside them.
        slow_before = [run.id for run in runs_now(repo) if run.job_name == SLOW_JOB and run.status == "running"]
        migrate_began = time.monotonic()
        new_migrate = processes.start_celery(["-A", NEW_APP, "dbsched", "migrate"], new("new-migrate"), "new-migrate")
        assert exit_code(new_migrate, 60) == 0, new_migrate.log_tail()
        migrate_s = time.monotonic() - migrate_began
        migrated_at = repo.database_now()
        assert current_revision(repo.engine) == head_revision()
        new_worker = processes.start_worker(NEW_APP, env=new("new-worker"), name="new-worker", node="new@%h")
        new_beat = processes.start_beat(NEW_APP, env=new("new-beat"), name="new-beat")
        # 4. An old worker (re)started now, during the rollout.
        old_restart = processes.start_worker(OLD_APP, env=old("old-worker-late"), name="old-worker-late")
        new_worker.wait_ready()
        if schema_changes:
            assert exit_code(old_restart, 60) != 0, old_restart.log_tail()
            assert_one_clear_stop(old_restart, "newer than this celery_dbsched knows")
        else:
            old_restart.wait_ready()

        # Old and new side by side: the old beat claims and the old worker finishes on the new schema.
        old_beat_id = f"{socket.gethostname()}:{old_beat.pid}"
        new_beat_id = f"{socket.gethostname()}:{new_beat.pid}"

        def old_kept_working() -> bool:
            processes.check_alive(old_worker, old_beat, new_worker, new_beat)
            runs = [run for run in runs_now(repo) if run.create_time > migrated_at and run.end_time]
            return any(run.claimed_by == old_beat_id for run in runs) and all(
                any(run.claimed_by == beat and run.worker == worker for run in runs)
                for beat, worker in ((old_beat_id, new_worker.node), (new_beat_id, old_worker.node))
            )

        wait_for(old_kept_working, 30, message="each release's worker running runs the other's beat claimed")

        # What an operator looks at, with the new code, while both releases write: it reads the jobs the old
        # worker registered and the runs of both, and reports healthy (the 0005 release's processes leave no
        # server rows it shows: it lists the new ones only).
        status = processes.start_celery(["-A", NEW_APP, "dbsched", "status"], new("new-status"), "new-status")
        assert exit_code(status, 60) == 0, status.log_tail()
        assert "healthy" in status.log(), status.log_tail()

        # 5. The old processes go; the new ones carry on.
        assert old_worker.stop(signal.SIGTERM, 30) == 0, old_worker.log_tail()
        if schema_changes:
            # 6. A schedule the old release cannot read (clocked: added with schema 0008) stops its beat with
            # a traceback when that beat is the one to claim it (the only beat here): the documented order
            # keeps such schedules out until every beat runs the new release.
            assert new_beat.stop(signal.SIGTERM, 30) == 0, new_beat.log_tail()
            no_beat_from = repo.database_now()
            clocked = f"up.clocked-{uuid.uuid4().hex[:6]}"
            app = new_app(database)
            try:
                add_schedule(app, clocked, task="celery.backend_cleanup", schedule=repo.database_now())
            finally:
                forget_repository(app)
            assert exit_code(old_beat, 30) != 0, old_beat.log_tail()
            assert "unknown schedule spec" in old_beat.log() and '"type": "clocked"' in old_beat.log()
            new_beat = processes.start_beat(NEW_APP, env=new("new-beat-2"), name="new-beat-2")
            # The old beat's claim was rolled back (no run left queued): the new beat claims the schedule.
            claimed = wait_for(
                lambda: [run for run in runs_now(repo) if run.job_name == clocked and run.end_time], 30, message=clocked
            )
            new_beat_2_id = f"{socket.gethostname()}:{new_beat.pid}"
            assert [run.claimed_by for run in claimed] == [new_beat_2_id], claimed
            # No beat ran from the new beat's stop to the second one's first claim: slots wait that long.
            first_claim = min(run.create_time for run in runs_now(repo) if run.claimed_by == new_beat_2_id)
            no_beat_s = (first_claim - no_beat_from).total_seconds()
        else:
            for process in (old_beat, old_restart):
                assert process.stop(signal.SIGTERM, 30) == 0, process.log_tail()
        stopped_at = repo.database_now()

        def new_runs_after_stop() -> bool:
            processes.check_alive(new_worker, new_beat)
            ended = {run.job_name for run in runs_now(repo) if run.create_time > stopped_at and run.end_time}
            return ended >= set(names) - {SLOW_JOB}

        wait_for(new_runs_after_stop, 30, message="runs claimed by the new beat after the old ones stopped")
    finally:
        sampler.stop()
    assert new_beat.stop(signal.SIGTERM, 30) == 0, new_beat.log_tail()
    assert new_worker.stop(signal.SIGTERM, 30) == 0, new_worker.log_tail()

    starts = start_events(events)
    runs = all_runs(repo)
    # A worker's warm shutdown interrupts the runs in its hands and their slot is run again at once (the
    # documented stop, not the upgrade's doing): those runs are counted, and left out of the double count.
    stopped = [run for run in runs if run.status == "interrupted"]
    doubled = doubles([run for run in runs if run.status != "interrupted"], starts)
    doubled += [
        f"run {run_id} started {n} times" for run_id, n in starts.items() if n > 1 and run_id in {r.id for r in stopped}
    ]
    old_claims = [run for run in runs if run.claimed_by == old_beat_id and migrated_at < run.create_time]
    old_finished = [
        run
        for run in runs
        if run.worker == old_worker.node and run.end_time and migrated_at < run.end_time < stopped_at
    ]
    # Each release's worker ran what the other release's beat sent (one queue): the order of the roll is free.
    old_ran_new = [run for run in runs if run.claimed_by == new_beat_id and run.worker == old_worker.node]
    new_ran_old = [run for run in runs if run.claimed_by == old_beat_id and run.worker == new_worker.node]
    slow_across = [run.id for run in runs if run.id in slow_before and run.status == "completed"]
    report(
        name,
        release=release,
        schema=f"{old_revision}->{head_revision()}",
        setup_s=round(setup_s, 2),
        migrate_s=round(migrate_s, 2),
        runs=len(runs),
        old_beat_claims_after_migrate=len(old_claims),
        old_worker_ends_after_migrate=len(old_finished),
        slow_run_across_migrate=len(slow_across),
        old_worker_ran_new_beats=len(old_ran_new),
        new_worker_ran_old_beats=len(new_ran_old),
        interrupted_at_stops=len(stopped),
        no_beat_s=round(no_beat_s, 1),
        doubled=len(doubled),
        double_active=len(sampler.double_active),
        samples=sampler.samples,
        elapsed_s=round(time.monotonic() - began, 1),
    )
    assert not doubled, doubled
    sampler.check()
    assert not tracebacks(processes, clocked_ok=schema_changes), tracebacks(processes, clocked_ok=schema_changes)
    assert old_claims, "the old beat claimed nothing on the new schema"
    assert old_finished, "the old worker finished nothing on the new schema"
    assert old_ran_new and new_ran_old, "a worker ran nothing the other release's beat claimed"
    assert slow_across == slow_before, f"runs begun before the migration that did not complete: {slow_before}"
    assert all(run.interrupt_reason == "shutdown" for run in stopped), [(r.id, r.error) for r in stopped]
    # Every slot dispatched on its cadence: an interrupted run's slot is run again (left out here), and the
    # run that replaces it may come a whole long run after its slot (the shutdown came that late); in step 6
    # no beat ran for no_beat_s.
    for job in names:
        done = [run for run in runs if run.job_name == job and run.status != "interrupted"]
        slack = no_beat_s + (SLOW_SECONDS if job == SLOW_JOB else 0)
        assert_runs_spaced(done, JOB_EVERY, lateness=LATENESS + slack)


def assert_one_clear_stop(process: CeleryProcess, message: str) -> None:
    """The old release stops a worker on an unknown schema with Celery's "Unrecoverable error" and its
    traceback (its code, not ours to change): the error is the one SchemaMismatch line saying what to do."""
    log = process.log()
    assert message in log and "upgrade celery_dbsched" in log, process.log_tail()
    errors = [line for line in log.splitlines() if line.startswith("celery_dbsched.errors.")]
    assert len(errors) == 1 and "SchemaMismatch" in errors[0], process.log_tail()


@on(PG_FS)
def test_old_processes_beside_the_new_during_and_after_migrate(
    e2e_database: Database, broker: Broker, processes: Processes, tmp_path: Path
) -> None:
    """Release 0005 -> head: migrations 0006-0008 under the running old processes."""
    upgrade_scenario(
        OLD_SCHEMA_RELEASE, e2e_database, broker, processes, tmp_path, name="upgrade_0005_to_head", schema_changes=True
    )


@pytest.mark.soak
@on(PG_FS)
def test_old_processes_beside_the_new_code_only(
    e2e_database: Database, broker: Broker, processes: Processes, tmp_path: Path
) -> None:
    """The previous release, same schema head: `migrate` does nothing, old and new run side by side."""
    upgrade_scenario(
        CODE_ONLY_RELEASE, e2e_database, broker, processes, tmp_path, name="upgrade_code_only", schema_changes=False
    )
