"""Workers of the test apps stop within 0.1 s of being asked.

Celery's worker reads its stop flag (`state.should_stop`, set by SIGTERM's handler or by `start_worker`) only
between two polls of its event loop, and an idle loop on RabbitMQ or Redis polls for up to 10 s. An embedded
worker's stop then raced `start_worker`'s 10 s timeout (the CI failure of stop 19), and every worker
subprocess took ~10 s to stop at a test's end (a minute or more of CI). What the tests test is not how long
Celery idles before reading its flag."""

from __future__ import annotations

from typing import Any

from celery import Celery, bootsteps


class _PromptStop(bootsteps.StartStopStep):  # type: ignore[misc]
    """Wakes the worker's event loop (RabbitMQ, Redis) every 0.1 s."""

    def start(self, consumer: Any) -> None:
        # The consumer's steps start again at each reconnect; the hub is the worker's: one timer is enough.
        hub = getattr(consumer, "hub", None)
        if hub is not None and not getattr(hub, "_dbsched_prompt_stop", False):
            hub._dbsched_prompt_stop = True
            hub.call_repeatedly(0.1, _nothing)


def _nothing() -> None:
    return None


def stop_promptly(app: Celery) -> Celery:
    """Add the step to `app`'s consumer; returns the app."""
    app.steps["consumer"].add(_PromptStop)
    return app
