"""The Python client's name rules against tests/vectors/names.json, the cases the Rust
server and the JS client are held to as well. No server needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dolores import DoloresError
from dolores._core import check_track, check_uid

VECTORS = json.loads((Path(__file__).resolve().parent.parent / "vectors" / "names.json").read_text("utf-8"))


def _verdict(check, name: str) -> bool:
    try:
        check(name)
    except DoloresError:
        return False
    return True


@pytest.mark.parametrize("case", VECTORS["tracks"], ids=lambda case: case["why"])
def test_track_names_follow_the_shared_vectors(case: dict) -> None:
    assert _verdict(check_track, case["name"]) == case["valid"], case["name"]


@pytest.mark.parametrize("case", VECTORS["uids"], ids=lambda case: case["why"])
def test_uids_follow_the_shared_vectors(case: dict) -> None:
    assert _verdict(check_uid, case["name"]) == case["valid"], case["name"]


def test_a_lone_surrogate_is_refused() -> None:
    """Python strings can hold one; it has no UTF-8 form, so no server could take it."""
    assert not _verdict(check_track, "a\ud800b")
