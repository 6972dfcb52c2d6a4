"""Listener tokens: signed here or minted by the server, and checked by the server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest
from dolores import Client, DoloresError, Event, sign_token
from harness import API_KEY, TOKEN_SECRET, Collector, wait_until


def decode(token: str, secret: str) -> dict:
    head, body, signature = token.split(".")
    expected = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(signature + "==") == expected, "signature"
    assert json.loads(base64.urlsafe_b64decode(head + "==")) == {"alg": "HS256", "typ": "JWT"}
    return json.loads(base64.urlsafe_b64decode(body + "=="))


@pytest.fixture
def signer(token_server):
    """Knows the secret: signs locally."""
    with Client(token_server.url, api_key=API_KEY, token_secret=TOKEN_SECRET) as c:
        yield c


@pytest.fixture
def minter(token_server):
    """Does not know the secret: asks the server."""
    with Client(token_server.url, api_key=API_KEY) as c:
        yield c


@pytest.mark.parametrize("who", ["signer", "minter"])
def test_tokens_carry_uid_expiry_and_tracks(who, request, uid):
    c = request.getfixturevalue(who)
    now = time.time()
    claims = decode(c.token(uid, tracks=[":a", "rooms/1"], ttl=120), TOKEN_SECRET)
    assert claims["sub"] == uid and claims["tracks"] == [":a", "rooms/1"]
    assert now + 110 <= claims["exp"] <= now + 130
    claims = decode(c.token(uid), TOKEN_SECRET)
    assert "tracks" not in claims and now + 3500 <= claims["exp"] <= now + 3700


@pytest.mark.parametrize("who", ["signer", "minter"])
@pytest.mark.parametrize(
    "args, code",
    [
        (("short",), "bad_uid"),
        (("valid-uid-123", ["has space"]), "bad_track"),
        (("valid-uid-123", None, 0), "bad_ttl"),
        (("valid-uid-123", None, 8 * 24 * 3600), "bad_ttl"),
    ],
)
def test_signing_here_refuses_what_the_server_refuses(who, args, code, request):
    c = request.getfixturevalue(who)
    with pytest.raises(DoloresError) as caught:
        c.token(*args)
    assert (caught.value.status, caught.value.code) == (400, code)


@pytest.mark.parametrize("who", ["signer", "minter"])
def test_the_server_accepts_the_token_and_its_tracks_claim_connects(who, request, uid, track):
    c = request.getfixturevalue(who)
    events = Collector(c.listen(uid, token=c.token(uid, tracks=[track])))
    try:
        wait_until(lambda: _tracks(c, uid) == [track], what="the token's tracks to connect the listener")
        published = c.update(track, "hello")
        assert events.next() == Event(published, track, "hello")
    finally:
        events.close()


def _tracks(c: Client, uid: str):
    try:
        return c.listener(uid)["tracks"]
    except DoloresError:
        return None


def test_listen_signs_its_own_tokens_when_it_knows_the_secret(signer, uid, track):
    signer.connect(uid, track)
    published = signer.update(track, "queued")
    events = Collector(signer.listen(uid))
    try:
        assert events.next() == Event(published, track, "queued")
    finally:
        events.close()


@pytest.mark.parametrize(
    "make_token, code",
    [
        (lambda uid: None, "token_required"),
        (lambda uid: sign_token("another secret", uid), "bad_token"),
        (lambda uid: sign_token(TOKEN_SECRET, "someone-else-123"), "token_wrong_listener"),
        (lambda uid: "garbage", "bad_token"),
    ],
)
def test_the_server_refuses_bad_tokens(minter, uid, track, make_token, code):
    minter.connect(uid, track)
    with pytest.raises(DoloresError) as caught:
        next(iter(minter.listen(uid, token=make_token(uid))))
    assert (caught.value.status, caught.value.code) == (401, code)


def test_an_expired_token_raises_unless_it_can_be_renewed(minter, uid, track):
    minter.connect(uid, track)
    expired = sign_token(TOKEN_SECRET, uid, now=time.time() - 3 * 3600)
    with pytest.raises(DoloresError) as caught:
        next(iter(minter.listen(uid, token=expired)))
    assert (caught.value.status, caught.value.code) == (401, "token_expired")

    calls = []

    def renew(for_uid: str) -> str:
        calls.append(for_uid)
        return expired if len(calls) == 1 else minter.token(for_uid)

    published = minter.update(track, "after renewal")
    events = Collector(minter.listen(uid, token=renew))
    try:
        assert events.next() == Event(published, track, "after renewal")
        assert calls == [uid, uid]
    finally:
        events.close()

    # A function that keeps giving expired tokens is given up on.
    with pytest.raises(DoloresError) as caught:
        next(iter(minter.listen(uid, token=lambda u: expired)))
    assert caught.value.code == "token_expired"


def test_a_revoked_token_raises_token_revoked_and_is_not_renewed(minter, uid, track):
    calls = []

    def renew(for_uid: str) -> str:
        calls.append(for_uid)
        return minter.token(for_uid, tracks=[track])

    events = Collector(minter.listen(uid, token=renew))
    try:
        wait_until(lambda: _tracks(minter, uid) == [track], what="the token's tracks to connect the listener")
        published = minter.update(track, "before")
        assert events.next() == Event(published, track, "before")
        # The app forgets the listener: its open stream ends, and the token it holds
        # is refused when it comes back. It raises, without asking for another.
        minter.disconnect(uid)
        error = events.failure()
        assert isinstance(error, DoloresError)
        assert (error.status, error.code) == (401, "token_revoked")
        assert "token_revoked" in str(error) and "disconnected" in error.message
        assert calls == [uid]
    finally:
        events.close()
    with pytest.raises(DoloresError) as caught:
        minter.listener(uid)
    assert caught.value.code == "unknown_listener", "the revoked token did not re-create it"
