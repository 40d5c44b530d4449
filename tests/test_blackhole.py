"""PostgreSQL against a server that stops answering without refusing (issue 15, item 1): the connection
defaults an engine gets and what overrides them, the statement watchdog (`dbsched_client_timeout`), the
idle-in-transaction timeout set on connect, and the beat's LISTEN round trip. The fault test with real processes
is in test_faults_outages.py."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import pytest
from helpers.polling import wait_for
from helpers.proxy import TcpProxy, with_port
from helpers.services import Database
from sqlalchemy import text
from sqlalchemy.engine import make_url

from celery_dbsched import wakeup
from celery_dbsched.engine import (
    POSTGRES_CONNECT_DEFAULTS,
    make_engine,
    mysql_connect_args,
    postgres_connect_args,
    set_client_timeout,
)
from celery_dbsched.errors import DatabaseUnavailable, is_client_timeout
from celery_dbsched.migrate import migrate
from celery_dbsched.repository import JobRepository

DEFAULTS = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 20000,
}
# How late past its bound the watchdog may fire on a loaded machine (it notices every 0.1 s).
MARGIN = 1.5

# -- the connect arguments -----------------------------------------------------------------------------------


def test_the_connection_defaults() -> None:
    assert POSTGRES_CONNECT_DEFAULTS == DEFAULTS
    url = make_url("postgresql+psycopg://u@db.example/app")
    assert postgres_connect_args(url, {}, environ={}) == DEFAULTS


def test_the_url_query_wins_over_the_defaults() -> None:
    url = make_url("postgresql+psycopg://u@db.example/app?connect_timeout=3&keepalives_idle=60")
    args = postgres_connect_args(url, {}, environ={})
    assert "connect_timeout" not in args and "keepalives_idle" not in args  # libpq reads them from the URL
    assert args["tcp_user_timeout"] == 20000


def test_connect_args_win_over_the_defaults() -> None:
    url = make_url("postgresql+psycopg://u@db.example/app")
    args = postgres_connect_args(url, {"connect_timeout": 2, "keepalives": 0, "application_name": "x"}, environ={})
    assert args == {**DEFAULTS, "connect_timeout": 2, "keepalives": 0, "application_name": "x"}


def test_pgconnect_timeout_wins_over_the_default_connect_timeout() -> None:
    url = make_url("postgresql+psycopg://u@db.example/app")
    args = postgres_connect_args(url, {}, environ={"PGCONNECT_TIMEOUT": "4"})
    assert "connect_timeout" not in args
    assert args["keepalives_idle"] == 10


def _parameters(engine: Any) -> dict[str, str]:
    """What libpq connected with: its connection options, as the server connection sees them."""
    with engine.connect() as conn:
        info = conn.connection.driver_connection.pgconn.info
        return {o.keyword.decode(): o.val.decode() for o in info if o.val is not None}


@pytest.mark.postgres
def test_a_postgres_engine_connects_with_the_defaults(postgres_database: Database) -> None:
    engine = make_engine(postgres_database.url)
    try:
        parameters = _parameters(engine)
        assert {key: parameters[key] for key in DEFAULTS} == {key: str(value) for key, value in DEFAULTS.items()}
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_url_connect_args_and_environment_win_on_a_real_connection(
    postgres_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    separator = "&" if "?" in postgres_database.url else "?"
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "7")  # read when the engine is made
    engine = make_engine(
        f"{postgres_database.url}{separator}keepalives_idle=77",
        {"connect_args": {"tcp_user_timeout": 5000}},
    )
    try:
        parameters = _parameters(engine)
        assert parameters["keepalives_idle"] == "77"
        assert parameters["tcp_user_timeout"] == "5000"
        assert parameters["connect_timeout"] == "7"
        assert parameters["keepalives_count"] == "3"
    finally:
        engine.dispose()


# -- idle_in_transaction_session_timeout ---------------------------------------------------------------------


@pytest.mark.postgres
def test_idle_in_transaction_timeout_is_set_when_the_server_has_none(postgres_database: Database) -> None:
    engine = make_engine(postgres_database.url)
    try:
        with engine.connect() as conn:
            server = conn.execute(
                text("SELECT reset_val FROM pg_settings WHERE name = :n"), {"n": "idle_in_transaction_session_timeout"}
            ).scalar()
            shown = conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar()
        assert server == "0", "the test server is expected to leave it off"
        assert shown == "1min"
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_idle_in_transaction_timeout_of_the_server_or_the_url_is_kept(postgres_database: Database) -> None:
    url = make_url(postgres_database.url)
    options = f"{url.query.get('options', '')} -c idle_in_transaction_session_timeout=5s".strip()
    engine = make_engine(url.update_query_dict({"options": options}).render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar() == "5s"
    finally:
        engine.dispose()


# -- the statement watchdog ----------------------------------------------------------------------------------


def _repository(database: Database, proxy: TcpProxy, client_timeout: float | None) -> JobRepository:
    repository = JobRepository(with_port(database.url, proxy.port), client_timeout=client_timeout)
    database.repositories.append(repository)
    return repository


def _heartbeat(repository: JobRepository) -> None:
    """One statement on a kept connection (the worker side: no pre-ping, no transaction)."""
    repository.heartbeat("w1", "worker", "host", 1)


@pytest.mark.postgres
@pytest.mark.slow
def test_a_statement_into_a_black_hole_is_an_outage_within_the_client_timeout(
    postgres_database: Database, pg_proxy: TcpProxy
) -> None:
    postgres_database.migrated_repository()
    repository = _repository(postgres_database, pg_proxy, client_timeout=2.0)
    _heartbeat(repository)  # the connection is now kept: the next statement goes out without a ping
    pg_proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable, match=r"no answer from the database server for 2s") as excinfo:
        _heartbeat(repository)
    took = time.monotonic() - started
    # Within the bound, and not sent again on another connection (that would take another 2 s, or a connect).
    assert 2.0 <= took <= 2.0 + MARGIN, took
    cause = excinfo.value.__cause__
    assert is_client_timeout(getattr(cause, "orig", None)), repr(cause)
    assert pg_proxy.dropped > 0
    pg_proxy.restore()
    _heartbeat(repository)  # a new connection: the cut one was discarded, never reused
    assert len(repository.server_rows(10)[0]) == 1


@pytest.mark.postgres
@pytest.mark.slow
def test_a_transaction_into_a_black_hole_is_an_outage_and_its_connection_is_discarded(
    postgres_database: Database, pg_proxy: TcpProxy
) -> None:
    repository = _repository(postgres_database, pg_proxy, client_timeout=2.0)
    with repository.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        pg_proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(Exception) as excinfo:
            conn.execute(text("SELECT 2"))
        took = time.monotonic() - started
        assert conn.invalidated
    assert 2.0 <= took <= 2.0 + MARGIN, took
    assert is_client_timeout(getattr(excinfo.value, "orig", None)), repr(excinfo.value)
    pg_proxy.restore()
    with repository.engine.connect() as conn:
        assert conn.execute(text("SELECT 3")).scalar() == 3


@pytest.mark.postgres
@pytest.mark.slow
def test_without_the_watchdog_a_statement_waits_on(postgres_database: Database, pg_proxy: TcpProxy) -> None:
    """dbsched_client_timeout = 0: the statement waits past any bound the watchdog would have set; on loopback
    through a proxy that keeps the TCP connection up, the keepalives and tcp_user_timeout see nothing wrong
    either. Only cutting the proxy's connections ends it."""
    postgres_database.migrated_repository()
    repository = _repository(postgres_database, pg_proxy, client_timeout=None)
    _heartbeat(repository)
    pg_proxy.blackhole()
    outcome: list[BaseException | None] = []

    def statement() -> None:
        try:
            _heartbeat(repository)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=statement, daemon=True)
    thread.start()
    thread.join(4.0)
    assert thread.is_alive() and not outcome, "the statement ended without a watchdog"
    pg_proxy.down()
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(outcome[0], DatabaseUnavailable), outcome


@pytest.mark.postgres
def test_migrations_run_without_the_watchdog(postgres_database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    from celery_dbsched import migrate as migrate_module

    seen: list[Any] = []
    upgrade = migrate_module._upgrade

    def recording(conn: Any) -> Any:
        seen.append(conn.connection.driver_connection.dbsched_client_timeout)
        return upgrade(conn)

    monkeypatch.setattr(migrate_module, "_upgrade", recording)
    repository = postgres_database.repository()
    migrate(repository.engine)
    assert seen == [None]
    with repository.engine.connect() as conn:
        assert conn.connection.driver_connection.dbsched_client_timeout == 20.0  # restored


def test_set_client_timeout_leaves_other_drivers_alone() -> None:
    class Plain:
        pass

    driver = Plain()
    with set_client_timeout(driver, None):
        assert not hasattr(driver, "dbsched_client_timeout")


# -- the beat's LISTEN connection ----------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.slow
def test_the_listening_connection_notices_a_black_hole_by_its_round_trip(
    postgres_database: Database, pg_proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(wakeup, "PING_EVERY", 1.0)
    monkeypatch.setattr(wakeup, "PING_TIMEOUT", 1.0)
    monkeypatch.setattr(wakeup, "RECONNECT_AFTER", 0.5)
    postgres_database.migrated_repository()
    repository = _repository(postgres_database, pg_proxy, client_timeout=20.0)
    listener = wakeup.Wakeup(repository.engine)
    try:
        assert listener.wait(1.5) is False  # listening; one round trip made on the way
        pg_proxy.blackhole()
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="celery_dbsched.wakeup"):
            outcome = listener.wait(30.0)
        took = time.monotonic() - started
        assert outcome is None, "the black hole went unnoticed"
        assert took <= 1.0 + 1.0 + MARGIN, took  # the next round trip, and its timeout
        assert "stopped listening for wake-ups" in caplog.text
        pg_proxy.restore()
        time.sleep(0.6)
        assert listener.wait(0.5) is False  # listening again on a new connection
        assert listener._connection is not None
    finally:
        listener.close()


@pytest.mark.postgres
def test_a_creator_of_ones_own_is_left_alone(postgres_database: Database) -> None:
    import psycopg

    dsn = make_url(postgres_database.url).set(drivername="postgresql").render_as_string(hide_password=False)
    engine = make_engine(postgres_database.url, {"creator": lambda: psycopg.connect(dsn.split("?")[0])})
    try:
        with engine.connect() as conn:
            assert not hasattr(conn.connection.driver_connection, "dbsched_client_timeout")
    finally:
        engine.dispose()


# -- MySQL/MariaDB (PyMySQL): the connect arguments (the black hole itself: tests/test_mariadb.py) ---------------

MYSQL_URL = make_url("mysql+pymysql://u@db.example/app")


def test_the_mysql_connection_defaults() -> None:
    defaults = {"connect_timeout": 10, "read_timeout": 20.0, "write_timeout": 20.0}
    assert mysql_connect_args(MYSQL_URL, {}, 20.0) == defaults
    # dbsched_client_timeout off (0): no read or write timeout, as before.
    assert mysql_connect_args(MYSQL_URL, {}, None) == {"connect_timeout": 10}


def test_the_mysql_url_query_and_connect_args_win_over_the_defaults() -> None:
    url = make_url("mysql+pymysql://u@db.example/app?read_timeout=60&connect_timeout=3")
    assert mysql_connect_args(url, {}, 20.0) == {"write_timeout": 20.0}  # PyMySQL reads the others from the URL
    args = mysql_connect_args(MYSQL_URL, {"write_timeout": 90, "ssl": {"ca": "x"}}, 20.0)
    assert args == {"connect_timeout": 10, "read_timeout": 20.0, "write_timeout": 90, "ssl": {"ca": "x"}}


@pytest.mark.parametrize("query", ["read_timeout=abc", "connect_timeout=0", "write_timeout=1.5"])
def test_a_mysql_timeout_in_the_url_that_is_not_whole_seconds_is_one_clear_error(query: str) -> None:
    key, value = query.split("=")
    with pytest.raises(ValueError) as excinfo:
        JobRepository(f"mysql+pymysql://u:secret@db.example/app?{query}")
    message = str(excinfo.value)
    assert message.startswith(f"dbsched_database_url: {key}={value!r} in the URL") and f"?{key}=30" in message
    assert "secret" not in message


# -- the test proxy's trigger (helpers/proxy.py), against a local echo server -------------------------------------


class _Echo:
    """A TCP server on 127.0.0.1 that records what it receives and sends it back."""

    def __init__(self) -> None:
        self.received = b""
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            while data := conn.recv(65536):
                self.received += data
                conn.sendall(data)


def _exchange(client: socket.socket, data: bytes) -> bytes | None:
    client.sendall(data)
    try:
        return client.recv(65536)
    except TimeoutError:
        return None


@pytest.mark.parametrize("forward", [False, True])
def test_the_proxy_black_holes_at_the_chunk_that_carries_the_pattern(forward: bool) -> None:
    echo = _Echo()
    proxy = TcpProxy(("127.0.0.1", echo.port))
    try:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5)
        proxy.blackhole_on(b"CLAIM", forward_trigger=forward)
        assert _exchange(client, b"hello") == b"hello"
        assert not proxy.hole_started.is_set()
        assert _exchange(client, b"a CLAIM b") is None  # the answer never comes, either way
        assert proxy.hole_started.is_set() and proxy.blackholed
        wait_for(lambda: echo.received.endswith(b"CLAIM b") if forward else True, 5)
        assert echo.received == (b"helloa CLAIM b" if forward else b"hello")
        proxy.restore()
        assert _exchange(client, b"after") == b"after"
    finally:
        proxy.close()


def test_the_proxy_trigger_with_then_to_the_client_and_split_across_chunks() -> None:
    echo = _Echo()
    proxy = TcpProxy(("127.0.0.1", echo.port))
    try:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5)
        proxy.blackhole_on(b"INSERT", direction="to_client", forward_trigger=True, then=b"COMMIT")
        assert _exchange(client, b"COMMIT") == b"COMMIT"  # before the pattern: nothing
        assert _exchange(client, b"..INS") == b"..INS"
        assert _exchange(client, b"ERT ..") == b"ERT .."  # the pattern, split across two answers: armed
        assert not proxy.hole_started.is_set()
        assert _exchange(client, b"COMMIT") == b"COMMIT"  # `then`, forwarded: the hole starts after it
        assert proxy.hole_started.is_set()
        assert _exchange(client, b"more") is None
        with pytest.raises(ValueError, match="direction"):
            proxy.blackhole_on(b"x", direction="sideways", forward_trigger=True)
    finally:
        proxy.close()
