from __future__ import annotations

import itertools
import os
from typing import Iterator

import pytest
from harness import API_KEY, TOKEN_SECRET, DoloresServer

_uids = itertools.count(1)


@pytest.fixture(autouse=True)
def _no_dolores_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests say what they mean: no DOLORES_* from the caller's environment."""
    for key in list(os.environ):
        if key.startswith("DOLORES_") and key != "DOLORES_BIN":
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DoloresServer]:
    """A shared server (embedded store, no token secret) for tests that do not restart it."""
    s = DoloresServer(data=tmp_path_factory.mktemp("shared-data")).start()
    yield s
    s.close()


@pytest.fixture(scope="session")
def token_server() -> Iterator[DoloresServer]:
    """A shared server that requires listener tokens."""
    s = DoloresServer(token_secret=TOKEN_SECRET).start()
    yield s
    s.close()


@pytest.fixture
def own_server(tmp_path) -> Iterator[DoloresServer]:
    """A server of this test's own (to restart or kill), on a data dir."""
    s = DoloresServer(data=tmp_path / "data").start()
    yield s
    s.close()


@pytest.fixture
def uid(request: pytest.FixtureRequest) -> str:
    """A fresh listener uid."""
    return f"py-{next(_uids)}-{os.getpid()}-{abs(hash(request.node.nodeid)) % 10**8}"


@pytest.fixture
def track(request: pytest.FixtureRequest) -> str:
    """A track no other test uses."""
    return f":t/{abs(hash(request.node.nodeid)) % 10**10}/{next(_uids)}"


@pytest.fixture
def client(server: DoloresServer):
    from dolores import Client

    with Client(server.url, api_key=API_KEY) as c:
        yield c
