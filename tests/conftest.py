"""Fixtures that start real processes. Session-scoped where tests can share them safely."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.harness import UPSTREAM_KEYS, MockUpstream, PostgresServer, ProxyServer, RedisServer, proxy_config


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("procs")


@pytest.fixture(scope="session")
def redis_server(session_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(session_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The shared redis-server, emptied before each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture(scope="session")
def postgres_server(session_dir: Path) -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster; tests take a fresh database or schema of it."""
    server = PostgresServer(session_dir)
    server.start()
    yield server
    server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty store on each back-end: a SQLite file, or a new PostgreSQL schema.

    A schema (the URL sets search_path to it) costs a few ms; a new database costs ~0.2 s.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    # Looked up here, so a run of the SQLite cases alone never starts PostgreSQL.
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = server.create_schema(name)
    yield url
    server.drop_schema(name)


@pytest.fixture(scope="session")
def upstreams(session_dir: Path) -> Iterator[tuple[MockUpstream, MockUpstream]]:
    """Two mock upstreams that demand their own keys, so tests prove the proxy injects them."""
    base = MockUpstream("base", session_dir, api_key=UPSTREAM_KEYS["base"], tokens_per_s=0)
    finetuned = MockUpstream("finetuned", session_dir, api_key=UPSTREAM_KEYS["finetuned"], tokens_per_s=0)
    base.start()
    finetuned.start()
    yield base, finetuned
    base.stop()
    finetuned.stop()


@pytest.fixture(scope="module")
def module_proxy(
    upstreams: tuple[MockUpstream, MockUpstream], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyServer]:
    """One proxy process shared by a module's tests (they must tolerate each other's state)."""
    server = ProxyServer(proxy_config(*upstreams), tmp_path_factory.mktemp("proxy"), redis_server.url)
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def proxy(upstreams: tuple[MockUpstream, MockUpstream], redis_url: str, tmp_path: Path) -> Iterator[ProxyServer]:
    """A proxy process in front of the mock upstreams, on a freshly emptied Redis."""
    server = ProxyServer(proxy_config(*upstreams), tmp_path, redis_url)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def closed_port() -> Iterator[int]:
    """A port bound but never listening: connecting is refused, and no other test can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
