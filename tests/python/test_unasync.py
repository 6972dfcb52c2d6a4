"""The blocking client is written from the asyncio one by clients/python/scripts/unasync.py:
the committed client.py must be what the script makes of aio.py, and the two must stay
the same client, method for method."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dolores import AsyncClient, AsyncListener, Client, Listener
from harness import REPO

SCRIPT = REPO / "clients/python/scripts/unasync.py"
PACKAGE = REPO / "clients/python/src/dolores"


def unasync(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def copies(tmp_path: Path) -> tuple:
    """aio.py and client.py, copied where the test may spoil them."""
    source, target = tmp_path / "aio.py", tmp_path / "client.py"
    shutil.copy(PACKAGE / "aio.py", source)
    shutil.copy(PACKAGE / "client.py", target)
    return source, target


def test_client_py_is_what_the_script_makes_of_aio_py():
    done = unasync("--check")
    assert done.returncode == 0, done.stderr
    generated = (PACKAGE / "client.py").read_text(encoding="utf-8")
    assert generated.startswith("# GENERATED from aio.py by clients/python/scripts/unasync.py: do not edit")
    assert not re.search(r"\b(async|await|asyncio)\b", generated)


def test_the_check_fails_when_either_file_is_changed_alone(copies):
    source, target = copies
    assert unasync("--check", source, target).returncode == 0

    source.write_text(source.read_text().replace("Publishes ``message``", "Publishes (changed) ``message``"))
    stale = unasync("--check", source, target)
    assert stale.returncode == 1
    assert "out of step" in stale.stderr and "+        \"\"\"Publishes (changed)" in stale.stderr
    assert "changed" not in target.read_text(), "--check changes nothing"

    assert unasync(source, target).returncode == 0  # regenerating puts them back in step
    assert "Publishes (changed) ``message``" in target.read_text()
    assert unasync("--check", source, target).returncode == 0

    target.write_text(target.read_text().replace("time.sleep(delay)", "time.sleep(delay * 2)"))
    edited = unasync("--check", source, target)
    assert edited.returncode == 1 and "-            time.sleep(delay * 2)" in edited.stderr


def test_async_code_no_rule_covers_is_refused(copies):
    source, target = copies
    with source.open("a") as f:
        f.write("\n\nasync def _later() -> None:\n    async with asyncio.timeout(1):\n        pass\n")
    refused = unasync(source, target)
    assert refused.returncode == 2
    assert "no rule turns these into blocking code" in refused.stderr and "asyncio.timeout(1)" in refused.stderr
    assert target.read_text() == (PACKAGE / "client.py").read_text(), "nothing is written"


def test_a_docstring_line_the_script_rewrites_must_still_be_there(copies):
    source, target = copies
    source.write_text(source.read_text().replace("from another task too", "from elsewhere"))
    refused = unasync("--check", source, target)
    assert refused.returncode == 2 and "from another task too" in refused.stderr


def parameters(function: object) -> list:
    """Names, kinds and defaults (the annotations name each client's own types)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def public(cls: type) -> dict:
    renamed = {"aclose": "close"}
    return {renamed.get(name, name): getattr(cls, name) for name in dir(cls) if not name.startswith("_")}


@pytest.mark.parametrize("blocking, awaitable", [(Client, AsyncClient), (Listener, AsyncListener)])
def test_the_two_clients_have_the_same_methods_and_docs(blocking, awaitable):
    sync_members, async_members = public(blocking), public(awaitable)
    assert set(sync_members) == set(async_members)
    for name, member in sync_members.items():
        twin = async_members[name]
        if not callable(member):
            continue  # a property
        assert parameters(member) == parameters(twin), name
        assert member.__doc__ and twin.__doc__, f"{name} has no docstring"
        assert not inspect.iscoroutinefunction(member), name
        if name == "listeners":  # an iterator of pages, each fetched as it is reached
            assert inspect.isgeneratorfunction(member) and inspect.isasyncgenfunction(twin), name
        elif name != "listen":  # listen() returns the async iterator at once
            assert inspect.iscoroutinefunction(twin), name
