"""The blocking Client against the real server: every method and every error it can meet."""

from __future__ import annotations

import importlib.resources
import threading
import time
from pathlib import Path

import dolores
import httpx
import pytest
from dolores import Client, DoloresError, Event
from harness import API_KEY, DoloresServer, free_port, wait_until


def poll(server: DoloresServer, uid: str, last_event_id: str = "", wait: float = 2.0) -> dict:
    """What the listener's queue holds (without moving its cursor): answers as soon as
    there is something, else after ``wait`` seconds. (Not ``timeout=0``: the server may
    answer that before it has read the queue from its store.)"""
    params = {"timeout": str(wait)}
    if last_event_id:
        params["last_event_id"] = last_event_id
    return dict(server.get_json(f"/poll/{uid}", params=params, timeout=wait + 10))


def test_the_installed_package_is_the_one_under_test():
    # run.sh installs clients/python as pip would on a user's machine: the package and
    # its py.typed marker come from site-packages, not from the source tree.
    assert "site-packages" in Path(dolores.__file__).parts
    assert importlib.resources.files("dolores").joinpath("py.typed").is_file()
    assert dolores.__version__ == "0.1.0"


def test_update_returns_growing_ids_and_the_listener_gets_each_message(client, server, uid, track):
    assert client.connect(uid, track) == [track]
    messages = [
        "contact 42 changed",
        7,
        2.5,
        None,
        True,
        ["a", 1],
        {"contact": 42, "nested": {"x": [1, 2]}},
        "é ☃ \u2028",
    ]
    ids = [client.update(track, m) for m in messages]
    assert all(isinstance(i, str) for i in ids)
    assert [int(i) for i in ids] == sorted(int(i) for i in ids)
    events = poll(server, uid)["events"]
    assert [(e["id"], e["track"], e["message"]) for e in events] == [(i, track, m) for i, m in zip(ids, messages)]


def test_update_many_is_all_or_nothing(client, server, uid, track):
    client.connect(uid, track)
    other = track + "/other"
    client.connect(uid, other)
    ids = client.update_many([(track, 1), (other, {"x": 2}), {"track": track, "message": "three"}])
    assert len(ids) == 3 and [int(i) for i in ids] == sorted(int(i) for i in ids)
    assert [(e["track"], e["message"]) for e in poll(server, uid)["events"]] == [
        (track, 1),
        (other, {"x": 2}),
        (track, "three"),
    ]

    with pytest.raises(DoloresError) as caught:
        client.update_many([(track, "stored?"), ("has space", "no")])
    assert (caught.value.status, caught.value.code) == (400, "bad_track")
    assert len(poll(server, uid, ids[-1], wait=0.5)["events"]) == 0, "nothing of a refused batch is stored"

    assert client.update_many([]) == []
    with pytest.raises(DoloresError) as caught:
        client.update_many([(track, i) for i in range(1001)])
    assert (caught.value.status, caught.value.code) == (400, "bad_batch")
    with pytest.raises(TypeError):
        client.update_many([(track,)])  # type: ignore[list-item]


def test_connect_is_idempotent_and_disconnect_removes_tracks_or_the_listener(client, uid):
    tracks = [":data", "rooms/42", ":some/path-that/has-slashes;x", "héllo:world"]
    for t in tracks:
        client.connect(uid, t)
    assert sorted(client.connect(uid, ":data")) == sorted(tracks)
    info = client.listener(uid)
    assert info["uid"] == uid and sorted(info["tracks"]) == sorted(tracks) and "online" in info
    assert sorted(client.disconnect(uid, "rooms/42")) == sorted(set(tracks) - {"rooms/42"})
    assert client.disconnect(uid) == []
    with pytest.raises(DoloresError) as caught:
        client.listener(uid)
    assert (caught.value.status, caught.value.code) == (404, "unknown_listener")
    with pytest.raises(DoloresError) as caught:
        client.disconnect(uid, ":data")
    assert (caught.value.status, caught.value.code) == (404, "unknown_listener")


def test_stats(client):
    stats = client.stats()
    assert {"listeners", "tracks", "messages_stored", "streams"} <= set(stats)


@pytest.mark.parametrize(
    "call, status, code",
    [
        (lambda c: c.update("", "x"), 400, "bad_track"),
        (lambda c: c.update("a b", "x"), 400, "bad_track"),
        (lambda c: c.update("x" * 257, "x"), 400, "bad_track"),
        (lambda c: c.update(":big", "x" * 70_000), 413, "message_too_large"),
        (lambda c: c.connect("short", ":data"), 400, "bad_uid"),
        (lambda c: c.connect("has/slash-123", ":data"), 400, "bad_uid"),
        (lambda c: c.connect("valid-uid-123", "tab\there"), 400, "bad_track"),
        (lambda c: c.disconnect("short"), 400, "bad_uid"),
        (lambda c: c.listener("short"), 400, "bad_uid"),
        (lambda c: c.token("valid-uid-123"), 400, "no_token_secret"),
    ],
)
def test_server_errors_raise_with_status_and_code(client, call, status, code):
    with pytest.raises(DoloresError) as caught:
        call(client)
    error = caught.value
    assert (error.status, error.code) == (status, code)
    assert error.message and code in str(error) and str(status) in str(error)


def test_a_large_message_answer_does_not_spoil_the_pool(client, track):
    # A 413 closes its connection; the next call must not trip over it.
    with pytest.raises(DoloresError):
        client.update(track, "x" * 70_000)
    assert client.update(track, "small")


def test_the_api_key_is_checked(server):
    with Client(server.url, api_key="not-the-key") as wrong, Client(server.url) as missing:
        with pytest.raises(DoloresError) as caught:
            wrong.update(":data", 1)
        assert (caught.value.status, caught.value.code) == (401, "wrong_api_key")
        with pytest.raises(DoloresError) as caught:
            missing.connect("valid-uid-123", ":data")
        assert (caught.value.status, caught.value.code) == (401, "missing_api_key")


def test_settings_default_from_the_environment(server, monkeypatch, uid):
    monkeypatch.setenv("DOLORES_SERVER", server.url)
    monkeypatch.setenv("DOLORES_API_KEY", API_KEY)
    monkeypatch.setenv("DOLORES_TOKEN_SECRET", "from-env")
    with Client() as c:
        assert (c.server, c.api_key, c.token_secret) == (server.url, API_KEY, "from-env")
        assert c.connect(uid, ":env") == [":env"]
    monkeypatch.delenv("DOLORES_SERVER")
    with Client(api_key="k") as c:
        assert c.server == "http://127.0.0.1:8007"
    with Client("127.0.0.1:9/", api_key="k") as c:
        assert c.server == "http://127.0.0.1:9"


def test_an_unreachable_server_raises_unreachable_after_its_retries():
    with Client(f"http://127.0.0.1:{free_port()}", api_key="k", retries=2, backoff=0.01) as c:
        started = time.monotonic()
        with pytest.raises(DoloresError) as caught:
            c.update(":data", 1)
        assert caught.value.status is None and caught.value.code == "unreachable"
        assert isinstance(caught.value.__cause__, httpx.ConnectError)
        assert time.monotonic() - started < 5


def test_calls_come_through_a_restart_by_retrying(own_server, uid, track):
    with Client(own_server.url, api_key=API_KEY, retries=8, backoff=0.1, max_backoff=1.0) as c:
        c.connect(uid, track)
        first = c.update(track, "before")
        own_server.kill()
        restarter = threading.Timer(0.4, own_server.restart)
        restarter.start()
        try:
            second = c.update(track, "while it was down")  # connection refused, then retried
        finally:
            restarter.join()
        assert int(second) > int(first)
        assert [e["message"] for e in poll(own_server, uid)["events"]] == ["before", "while it was down"]


def test_one_client_is_shared_by_threads(client, server, uid, track):
    client.connect(uid, track)
    ids: list = []
    lock = threading.Lock()

    def publish(n: int) -> None:
        for i in range(20):
            got = client.update(track, {"thread": n, "i": i})
            with lock:
                ids.append(got)

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(set(ids)) == 160
    events = poll(server, uid)["events"]
    assert len(events) == 160
    for n in range(8):
        assert [e["message"]["i"] for e in events if e["message"]["thread"] == n] == list(range(20))


# ---- retry rules, with a stand-in server -------------------------------------------


class Script:
    """An httpx transport that answers from a script and counts requests."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def scripted(*answers) -> tuple:
    script = Script(*answers)
    http = httpx.Client(transport=httpx.MockTransport(script))
    return Client("http://dolores.test", api_key="k", retries=3, backoff=0.001, http_client=http), script


def error(status: int, code: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": f"{code}!"}})


def test_an_update_sent_again_with_its_key_is_stored_once(client, server, uid, track):
    client.connect(uid, track)
    first = client.update(track, "once", idempotency_key=f"{uid}-1")
    assert client.update(track, "once", idempotency_key=f"{uid}-1") == first
    ids = client.update_many([(track, "a"), (track, "b")], idempotency_key=f"{uid}-2")
    assert client.update_many([(track, "a"), (track, "b")], idempotency_key=f"{uid}-2") == ids
    with pytest.raises(DoloresError) as caught:
        client.update(track, "other", idempotency_key=f"{uid}-1")
    assert (caught.value.status, caught.value.code) == (422, "idempotency_key_reused")
    queued = poll(server, uid)
    assert [e["message"] for e in queued["events"]] == ["once", "a", "b"]


def test_503_is_retried_and_then_succeeds():
    c, script = scripted(
        error(503, "store_unavailable"), error(503, "shutting_down"), httpx.Response(200, json={"id": "9"})
    )
    assert c.update(":data", 1) == "9"
    assert len(script.requests) == 3
    sent = script.requests[0]
    assert sent.headers["authorization"] == "Bearer k"
    assert sent.headers["content-type"] == "application/json"
    assert sent.content == b'{"track":":data","message":1}'


def test_503_is_retried_at_most_retries_times():
    c, script = scripted(error(503, "store_unavailable"))
    with pytest.raises(DoloresError) as caught:
        c.connect("valid-uid-123", ":data")
    assert (caught.value.status, caught.value.code) == (503, "store_unavailable")
    assert len(script.requests) == 4


@pytest.mark.parametrize(
    "status, code",
    [
        (400, "bad_json"),
        (401, "wrong_api_key"),
        (404, "unknown_listener"),
        (413, "body_too_large"),
        (415, "not_json"),
        (429, "overloaded"),
    ],
)
def test_a_4xx_is_never_retried(status, code):
    c, script = scripted(error(status, code))
    with pytest.raises(DoloresError) as caught:
        c.connect("valid-uid-123", ":data")
    assert (caught.value.status, caught.value.code) == (status, code)
    assert len(script.requests) == 1


def keys_sent(script: Script) -> list:
    return [r.headers.get("idempotency-key") for r in script.requests]


def test_connection_errors_are_retried_an_update_with_the_same_key():
    c, script = scripted(
        httpx.ConnectError("refused"), httpx.ConnectTimeout("slow"), httpx.Response(200, json={"id": "1"})
    )
    assert c.update(":data", 1) == "1"
    assert len(script.requests) == 3

    # A connection lost after the request went out may have published: sent again
    # with its key, the server stores it once.
    c, script = scripted(httpx.ReadError("reset"), httpx.Response(200, json={"id": "2"}))
    assert c.update(":data", 1) == "2"
    keys = keys_sent(script)
    assert len(keys) == 2 and keys[0] and keys[0] == keys[1], keys
    # ... and connect, being idempotent, is sent again.
    c, script = scripted(
        httpx.ReadError("reset"), httpx.Response(200, json={"uid": "valid-uid-123", "tracks": [":data"]})
    )
    assert c.connect("valid-uid-123", ":data") == [":data"]
    assert len(script.requests) == 2


def test_timeouts_raise_timeout():
    c, script = scripted(httpx.ReadTimeout("slow"))
    with pytest.raises(DoloresError) as caught:
        c.update_many([(":data", 1)])
    assert caught.value.status is None and caught.value.code == "timeout"
    keys = keys_sent(script)
    assert len(keys) == 4 and len(set(keys)) == 1 and keys[0], keys


def test_an_update_sends_a_new_key_per_call_and_the_same_on_each_retry():
    # A 503 may hide an update the store committed after all: the retry carries the
    # same key, so the server stores it once.
    ok = httpx.Response(200, json={"id": "9", "ids": ["9"], "tracks": [":data"]})
    c, script = scripted(error(503, "store_unavailable"), error(503, "store_unavailable"), ok)
    assert c.update(":data", 1) == "9"
    first_call = keys_sent(script)
    assert len(first_call) == 3 and len(set(first_call)) == 1, first_call
    assert len(first_call[0]) == 36, "a UUID"
    c.update(":data", 1)
    c.update_many([(":data", 1)])
    keys = keys_sent(script)
    assert len(set(keys)) == 3, f"a new key per call: {keys}"
    # A key of the caller's own goes as it is, for update and update_many.
    c.update(":data", 1, idempotency_key="order-42")
    c.update_many([(":data", 1)], idempotency_key="order-43")
    assert keys_sent(script)[-2:] == ["order-42", "order-43"]
    # Other calls send none.
    c.connect("valid-uid-123", ":data")
    assert keys_sent(script)[-1] is None


def test_answers_that_are_not_dolores_errors():
    c, _ = scripted(httpx.Response(502, text="<html>Bad Gateway</html>"))
    with pytest.raises(DoloresError) as caught:
        c.disconnect("valid-uid-123")
    assert (caught.value.status, caught.value.code) == (502, "http_502")
    assert "Bad Gateway" in caught.value.message
    c, _ = scripted(httpx.Response(200, text="not json"))
    with pytest.raises(DoloresError) as caught:
        c.update(":data", 1)
    assert caught.value.code == "bad_response"


def test_messages_must_be_json():
    c, script = scripted(httpx.Response(200, json={"id": "1"}))
    with pytest.raises(TypeError):
        c.update(":data", object())
    with pytest.raises(ValueError):
        c.update(":data", float("nan"))
    assert script.requests == []


def test_errors_and_events_are_plain_values():
    import pickle

    e = DoloresError(404, "unknown_listener", "no such listener")
    copy = pickle.loads(pickle.dumps(e))
    assert (copy.status, copy.code, copy.message) == (404, "unknown_listener", "no such listener")
    assert Event("1", ":data", "x") == Event("1", ":data", "x", reset=False)
    assert wait_until(lambda: True)
