"""The per-process binding of a Celery app to its `JobRepository` (engines are never shared across a fork)."""

from __future__ import annotations

import os
import threading
from typing import Any

from .repository import JobRepository
from .settings import Settings

_repositories: dict[tuple[int, int], JobRepository] = {}
_repositories_lock = threading.Lock()


def repository_for(app: Any, settings: Any = None) -> JobRepository:
    """The process's repository for a Celery app (engines are never shared across a fork)."""
    key = (id(app), os.getpid())
    with _repositories_lock:
        repository = _repositories.get(key)
        if repository is None:
            resolved = settings if settings is not None else Settings.from_mapping(app.conf)
            repository = JobRepository.from_settings(resolved)
            _repositories[key] = repository
        return repository


def _after_fork_in_child() -> None:
    # The parent's pooled connections belong to the parent: drop them without closing their sockets.
    with _repositories_lock:
        inherited = [key for key in _repositories if key[1] != os.getpid()]
        for key in inherited:
            _repositories.pop(key).engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def bind_repository(app: Any, repository: JobRepository | None) -> JobRepository | None:
    """Make `repository` the app's in this process (None unbinds); returns the one it replaces."""
    key = (id(app), os.getpid())
    with _repositories_lock:
        previous = _repositories.pop(key, None)
        if repository is not None:
            _repositories[key] = repository
    return previous


def forget_repository(app: Any) -> None:
    with _repositories_lock:
        repository = _repositories.pop((id(app), os.getpid()), None)
    if repository is not None:
        repository.close()
