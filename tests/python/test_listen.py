"""Client.listen() against the real server: the queue, resume, reset, drops, restarts."""

from __future__ import annotations

import time

import httpx
import pytest
from dolores import Client, DoloresError, Event
from harness import API_KEY, Collector, free_port, wait_until


def test_the_queue_comes_first_then_live_messages_in_order(client, uid, track):
    client.connect(uid, track)
    queued = [client.update(track, f"queued {i}") for i in range(3)]
    events = Collector(client.listen(uid))
    try:
        got = events.take(3)
        assert [(e.id, e.track, e.message, e.reset) for e in got] == [
            (i, track, f"queued {n}", False) for n, i in enumerate(queued)
        ]
        live = [client.update(track, {"live": n}) for n in range(5)]
        assert [(e.id, e.message) for e in events.take(5)] == [(i, {"live": n}) for n, i in enumerate(live)]
        assert events.listener.last_event_id == live[-1]
        events.quiet(0.3)
    finally:
        events.close()


def test_every_track_of_the_listener_comes_on_one_stream(client, uid, track):
    a, b, c = track + "/a", track + "/b", track + "/c"
    client.connect(uid, a)
    client.connect(uid, b)
    events = Collector(client.listen(uid))
    try:
        client.update_many([(a, 1), (c, "not subscribed"), (b, 2)])
        assert [(e.track, e.message) for e in events.take(2)] == [(a, 1), (b, 2)]
        events.quiet(0.3)
    finally:
        events.close()


def test_last_event_id_resumes_exactly_after_it(client, uid, track):
    client.connect(uid, track)
    ids = client.update_many([(track, n) for n in range(5)])
    events = Collector(client.listen(uid, last_event_id=ids[1]))
    try:
        assert [e.message for e in events.take(3)] == [2, 3, 4]
        events.quiet(0.3)
    finally:
        events.close()


def test_a_cursor_newer_than_the_log_gets_a_reset_then_live_messages(client, uid, track):
    client.connect(uid, track)
    head = client.update(track, "before")
    events = Collector(client.listen(uid, last_event_id=str(int(head) + 10_000)))
    try:
        reset = events.next()
        assert reset.reset and reset.track is None and reset.message is None and reset.id
        later = client.update(track, "after the reset")
        assert events.next() == Event(later, track, "after the reset")
    finally:
        events.close()


def test_a_cursor_the_server_cannot_read_becomes_a_reset(client, uid, track):
    client.connect(uid, track)
    client.update(track, "old")
    events = Collector(client.listen(uid, last_event_id="not-an-id"))
    try:
        reset = events.next()
        assert reset.reset
        fresh = client.update(track, "fresh")
        # Only messages after the reset's id follow ("old" may be one of them: the
        # reset's id is where the server's own cursor for this listener stood).
        got = [events.next()]
        while got[-1].id != fresh:
            got.append(events.next())
        assert all(int(e.id) > int(reset.id) for e in got)
        assert got[-1] == Event(fresh, track, "fresh")
    finally:
        events.close()


def test_an_unknown_listener_raises(client, uid):
    with pytest.raises(DoloresError) as caught:
        next(iter(client.listen(uid)))
    assert (caught.value.status, caught.value.code) == (404, "unknown_listener")
    with pytest.raises(DoloresError) as caught:
        client.listen("bad uid")
    assert caught.value.code == "bad_uid"


def test_close_from_another_thread_ends_the_iteration(client, uid, track):
    client.connect(uid, track)
    events = Collector(client.listen(uid))
    client.update(track, 1)
    events.next()
    started = time.monotonic()
    events.close()  # the server's heartbeat (1 s here) wakes the reader at the latest
    assert time.monotonic() - started < 5
    assert client.listener(uid)["online"] == 0 or wait_until(lambda: client.listener(uid)["online"] == 0)


def test_a_with_block_closes_the_stream(client, uid, track):
    import threading

    client.connect(uid, track)
    client.update(track, "one")
    with client.listen(uid) as events:
        assert next(events).message == "one"  # from the queue, by poll
        threading.Timer(0.2, client.update, (track, "two")).start()
        assert next(events).message == "two"  # on the stream
        assert client.listener(uid)["online"] == 1
    assert wait_until(lambda: client.listener(uid)["online"] == 0, what="the stream to close")


def test_resumes_after_kill_9_and_restart_with_nothing_lost_or_doubled(own_server, uid, track):
    with Client(own_server.url, api_key=API_KEY) as c:
        c.connect(uid, track)
        first = c.update_many([(track, n) for n in range(3)])
        events = Collector(c.listen(uid))
        try:
            assert [e.id for e in events.take(3)] == first
            own_server.kill()
            own_server.restart()
            # Published while the listener is still away (its reconnect backs off):
            # the queue on disk brings them when it comes back.
            after = c.update_many([(track, n) for n in range(3, 6)])
            got = events.take(3)
            assert [(e.id, e.message) for e in got] == list(zip(after, range(3, 6)))
            live = c.update(track, "live again")
            assert events.next().id == live
            events.quiet(0.5)
        finally:
            events.close()


def test_resumes_after_a_clean_shutdown_and_restart(own_server, uid, track):
    with Client(own_server.url, api_key=API_KEY) as c:
        c.connect(uid, track)
        events = Collector(c.listen(uid))
        try:
            one = c.update(track, "one")
            assert events.next().id == one
            assert own_server.stop() == 0  # ends the stream on purpose
            own_server.restart()
            two = c.update(track, "two")
            assert events.next() == Event(two, track, "two")
            events.quiet(0.5)
        finally:
            events.close()


def test_keeps_trying_while_the_server_is_down(tmp_path, uid, track):
    from harness import DoloresServer

    server = DoloresServer(data=tmp_path / "data", port=free_port()).start()
    try:
        with Client(server.url, api_key=API_KEY) as c:
            c.connect(uid, track)
            server.kill()
            events = Collector(c.listen(uid))  # starts while nothing listens on the port
            time.sleep(1.0)
            assert events.error is None and events.events == []
            server.restart()
            queued = c.update(track, "there you are")
            assert events.next() == Event(queued, track, "there you are")
            events.close()
    finally:
        server.close()


def test_a_silent_stream_is_reopened(tmp_path, uid, track):
    """A stream that says nothing for idle_timeout (a half-open connection) is dropped
    and reopened from the last id. The requests are counted on the wire, by a proxy
    in front of the server: the reopen must come within a few idle timeouts (well
    before the client's 10 s request timeout could cause one)."""
    from harness import DoloresServer, Forwarder

    server = DoloresServer(data=tmp_path / "data", heartbeat="60s").start()
    proxy = Forwarder(server.port, record_requests=True)

    def listens() -> list:
        return [line for line in list(proxy.requests) if line.startswith(f"GET /listen/{uid}?")]

    try:
        with Client(f"http://127.0.0.1:{proxy.port}", api_key=API_KEY) as c:
            c.connect(uid, track)
            events = Collector(c.listen(uid, idle_timeout=0.5))
            first = c.update(track, 1)
            assert events.next().id == first
            opened = len(wait_until(listens, what="the first /listen"))
            # Nothing is said on the stream now (the heartbeat is a minute away): after
            # 0.5 s of silence the client gives up on it and opens another.
            wait_until(lambda: len(listens()) > opened, timeout=5, what=f"a reopened /listen (saw {proxy.requests})")
            assert f"last_event_id={first}" in listens()[-1].split(" ")[1], listens()
            second = c.update(track, 2)
            assert events.next() == Event(second, track, 2)
            events.quiet(0.3)
            events.listener.close()
            c.update(track, 3)  # ends the reader blocked on the silent stream
            events.close()
    finally:
        proxy.close()
        server.close()


def test_a_brand_new_listener_takes_its_queue_by_poll_before_streaming(client, server, uid, track):
    """Without a cursor, listen() first asks /poll?timeout=0 for the queue and the
    cursor, so every stream it opens names a cursor (a stream cut before its first
    bytes would otherwise count its messages as delivered)."""
    client.connect(uid, track)
    queued = client.update(track, "queued")
    seen = []

    def record(request):
        seen.append(request.url.path)

    http = httpx.Client(event_hooks={"request": [record]})
    with Client(server.url, api_key=API_KEY, http_client=http) as c:
        events = Collector(c.listen(uid))
        try:
            assert events.next() == Event(queued, track, "queued")
            live = client.update(track, "live")
            assert events.next().id == live
            assert seen[0] == f"/poll/{uid}" and seen[1] == f"/listen/{uid}"
        finally:
            events.close()
            http.close()


def test_a_listener_shows_its_token_and_never_the_api_key():
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.startswith("/poll/"):
            return httpx.Response(200, json={"events": [], "last_event_id": "7"})
        return httpx.Response(404, json={"error": {"code": "unknown_listener", "message": "gone"}})

    http = httpx.Client(transport=httpx.MockTransport(answer))
    with Client("http://dolores.test", api_key="the-api-key", http_client=http) as c:
        with pytest.raises(DoloresError) as caught:
            for _ in c.listen("valid-uid-123", token="the-token"):
                pass
    http.close()
    assert caught.value.code == "unknown_listener"
    assert [r.url.path for r in seen] == ["/poll/valid-uid-123", "/listen/valid-uid-123"]
    assert [r.url.params.get("token") for r in seen] == ["the-token", "the-token"]
    assert seen[1].url.params.get("last_event_id") == "7"
    assert not [r for r in seen if "authorization" in r.headers]


def test_a_server_url_with_a_path_reaches_a_server_under_a_base_path(uid, track):
    # Behind a reverse proxy, Dolores lives at https://app.example/dolores: the clients
    # take that URL as the server and append to it.
    from harness import DoloresServer

    server = DoloresServer(args=["--base-path", "/dolores"]).start()
    try:
        assert server.url.endswith("/dolores")
        with Client(server.url + "/", api_key=API_KEY) as client:
            assert client.connect(uid, track) == [track]
            queued = client.update(track, "under a prefix")
            events = Collector(client.listen(uid))
            try:
                assert [(e.id, e.message) for e in events.take(1)] == [(queued, "under a prefix")]
                live = client.update(track, {"live": True})
                assert [(e.id, e.message) for e in events.take(1)] == [(live, {"live": True})]
            finally:
                events.close()
        # The root is not the server any more.
        root = f"http://127.0.0.1:{server.port}"
        with pytest.raises(DoloresError) as refused:
            Client(root, api_key=API_KEY, retries=0).stats()
        assert (refused.value.status, refused.value.code) == (404, "not_found")
    finally:
        server.close()
