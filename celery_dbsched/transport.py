"""A ``filesystem://`` kombu transport that is safe with several processes.

kombu's own transport opens the final ``.msg`` file before writing it, so another process can read
it empty and die with a JSON decode error (kombu issue 1551), and it claims messages with a move
that is not atomic across filesystems. Here messages appear only complete and are claimed by rename.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import IO, Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem, virtual
from kombu.utils import json as kombu_json

__all__ = ["Channel", "FilesystemTransport", "filesystem_broker_settings"]

logger = logging.getLogger(__name__)

TRANSPORT_PATH = f"{__name__}:FilesystemTransport"

# Every name we create that is not a finished message starts with a dot: kombu's reader, _size and
# _purge keep a name only when the part after its first dot is '<queue>.msg', and these never end
# in '.msg', so no reader (ours or stock kombu's) ever picks one up.
_TMP_SUFFIX = ".tmp"
_CLAIMED_SUFFIX = ".claimed"
_CORRUPT_SUFFIX = ".corrupt"

_Binding = filesystem.exchange_queue_t

# kombu's JSON (not the stdlib's) so files stay interchangeable with stock kombu peers; typed
# aliases because these kombu functions carry no annotations.
_dumps: Callable[[Any], str] = kombu_json.dumps
_loads: Callable[[str], Any] = kombu_json.loads
_lock: Callable[[IO[bytes], int], None] = filesystem.lock
_unlock: Callable[[IO[bytes]], None] = filesystem.unlock


class Channel(filesystem.Channel):
    """Filesystem channel whose messages are published and claimed atomically."""

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)  # type: ignore[no-untyped-call]
        # Stock kombu fails on the first put/get if a folder is missing.
        for folder in (
            self.data_folder_in,
            self.data_folder_out,
            self.processed_folder,
            self.control_folder,
        ):
            os.makedirs(folder, exist_ok=True)

    # kombu's two base classes name the second parameter differently; follow the nearer one.
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Put ``payload`` on ``queue``: the ``.msg`` file appears only once complete."""
        folder = self.data_folder_out
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(folder, name)
        tmp = os.path.join(folder, f".{uuid.uuid4().hex}{_TMP_SUFFIX}")
        data = _dumps(payload).encode("utf-8")
        try:
            # 0o666 and the umask, like kombu's open(): a consumer running as another user in the
            # same group must still be able to read what we rename into place.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                os.replace(tmp, final)
            except BaseException:
                _remove_quietly(tmp)
                raise
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        """Claim, read and remove the oldest message of ``queue``; raise ``Empty`` if none."""
        folder = self.data_folder_in
        wanted = f"{queue}.msg"
        for name in sorted(os.listdir(folder)):
            if name.partition(".")[2] != wanted:
                continue
            path = os.path.join(folder, name)
            # A rename within one directory is atomic: of all the consumers racing for this file
            # exactly one succeeds and the others see FileNotFoundError. kombu's shutil.move into
            # the temp dir degrades to copy-then-unlink across filesystems, where a losing
            # consumer can overwrite the winner's copy mid-read and leaves a stray copy behind.
            claimed = os.path.join(folder, f".{name}.{uuid.uuid4().hex}{_CLAIMED_SUFFIX}")
            try:
                os.rename(path, claimed)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ChannelError(f"Cannot claim file {path!r} from queue.") from exc
            try:
                with open(claimed, "rb") as f:
                    raw = f.read()
            except OSError as exc:
                # Give it back rather than strand it under a name no reader looks at.
                _rename_quietly(claimed, path)
                raise ChannelError(f"Cannot read file {path!r} from queue.") from exc
            try:
                message = _loads(raw.decode("utf-8"))
            except ValueError:
                # A poison file (e.g. written by a stock kombu producer that crashed mid-write)
                # must not stop the consumer; keep it aside for inspection and move on.
                corrupt = os.path.join(folder, f".{name}{_CORRUPT_SUFFIX}")
                _rename_quietly(claimed, corrupt)
                logger.error("Skipping undecodable message file %r, kept as %r", path, corrupt)
                continue
            self._dispose(claimed, name)
            return message
        raise Empty()

    def _dispose(self, claimed: str, name: str) -> None:
        # The message is already read: failing here must not lose it, so only log.
        try:
            if self.store_processed:
                # Not atomic across filesystems, but the file is ours alone by now.
                shutil.move(claimed, os.path.join(self.processed_folder, name))
            else:
                os.remove(claimed)
        except OSError:
            logger.warning("Cannot dispose of consumed message file %r", claimed, exc_info=True)

    # The exchange tables in control_folder have the same flaw as messages: kombu creates a table
    # with open('wb') before locking it, so a process binding or routing at the same moment reads
    # it empty and fails to decode it. Open without truncating, lock, then read-modify-write.

    def get_table(self, exchange: str) -> list[Any]:
        file = self._table_file(exchange)
        try:
            with file.open("rb") as f:
                _lock(f, filesystem.LOCK_SH)
                try:
                    raw = f.read()
                finally:
                    _unlock(f)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ChannelError(f"Cannot open {file}") from exc
        return _parse_table(raw)

    def _queue_bind(self, exchange: str, routing_key: str | None, pattern: str | None, queue: str | None) -> None:
        entry = _Binding(routing_key or "", pattern or "", queue or "")

        def add(table: list[Any]) -> bool:
            if entry in table:
                return False
            table.insert(0, entry)
            return True

        os.makedirs(self.control_folder, exist_ok=True)
        self._update_table(self._table_file(exchange), add, create=True)

    def _delete(
        self,
        queue: str,
        exchange: str,
        routing_key: str | None,
        pattern: str | None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        # Skip filesystem.Channel._delete (it rewrites the table unsafely); virtual's purges.
        virtual.Channel._delete(  # type: ignore[no-untyped-call]
            self, queue, exchange, routing_key, pattern, *args, **kwargs
        )
        entry = _Binding(routing_key or "", pattern or "", queue or "")

        def remove(table: list[Any]) -> bool:
            if entry not in table:
                return False
            table.remove(entry)
            return True

        self._update_table(self._table_file(exchange), remove, create=False)

    def _table_file(self, exchange: str) -> Path:
        # kombu's validation keeps an exchange name from escaping control_folder.
        file: Path = self._exchange_file(exchange)  # type: ignore[no-untyped-call]
        return file

    def _update_table(self, file: Path, change: Callable[[list[Any]], bool], *, create: bool) -> None:
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:
            fd = os.open(file, flags, 0o666)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ChannelError(f"Cannot open {file}") from exc
        with os.fdopen(fd, "r+b", buffering=0) as f:
            _lock(f, filesystem.LOCK_EX)
            try:
                table = _parse_table(f.read())
                if change(table):
                    f.seek(0)
                    f.write(_dumps(table).encode("utf-8"))
                    f.truncate()
            finally:
                _unlock(f)


class FilesystemTransport(filesystem.Transport):
    """kombu ``filesystem://`` transport using :class:`Channel`."""

    Channel = Channel
    # Our own in-process state, not shared with stock kombu connections in the same process.
    global_state = virtual.BrokerState()  # type: ignore[no-untyped-call]


def filesystem_broker_settings(folder: str | os.PathLike[str]) -> dict[str, object]:
    """Return Celery settings that use :class:`FilesystemTransport` rooted at ``folder``.

    Use as ``app.conf.update(filesystem_broker_settings(path))``. Producers and consumers share
    one queue folder, so data_folder_in and data_folder_out are the same.
    """
    root = Path(folder)
    queue = str(root / "queue")
    return {
        "broker_url": "filesystem://",
        # Celery hands broker_transport to kombu's Connection, where it wins over the URL scheme.
        "broker_transport": TRANSPORT_PATH,
        "broker_transport_options": {
            "data_folder_in": queue,
            "data_folder_out": queue,
            "processed_folder": str(root / "processed"),
            "control_folder": str(root / "control"),
            # kombu polls the folder (1 s by default); a tenth of a second keeps dispatch latency low.
            "polling_interval": 0.1,
        },
    }


def _parse_table(raw: bytes) -> list[Any]:
    # An empty table is one another process has just created and not yet written under its lock.
    text = raw.decode("utf-8")
    if not text.strip():
        return []
    return [_Binding(*row) for row in _loads(text)]


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def _rename_quietly(src: str, dst: str) -> None:
    try:
        os.rename(src, dst)
    except OSError:
        logger.warning("Cannot rename %r to %r", src, dst, exc_info=True)
