"""The track calls of both clients against the real server: ``track()``,
``listeners()`` page by page with who is online, and ``history()`` with ``reset``."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Iterator, List

import httpx
import pytest
from dolores import AsyncClient, Client, DoloresError, Event, History
from harness import API_KEY, DoloresServer


@contextlib.contextmanager
def streams(server: DoloresServer, uids: List[str]) -> Iterator[None]:
    """Opens a stream for each uid: online from the moment its headers arrive."""
    with contextlib.ExitStack() as stack:
        http = stack.enter_context(httpx.Client(timeout=httpx.Timeout(10, read=None)))
        for uid in uids:
            response = stack.enter_context(http.stream("GET", f"{server.url}/listen/{uid}"))
            assert response.status_code == 200
        yield


def test_track_counts_and_listeners_page_by_page(client, server, uid, track):
    uids = [f"{uid}-{n}" for n in range(5)]
    for each in reversed(uids):
        client.connect(each, track)
    assert client.track(track) == {"track": track, "subscribers": 5, "online": 0}
    with streams(server, [uids[1], uids[3]]):
        assert client.track(track) == {"track": track, "subscribers": 5, "online": 2}
        pages = list(client.listeners(track, online=None, limit=2))
        assert [len(page) for page in pages] == [2, 2, 1]
        everyone = [listener for page in pages for listener in page]
        assert [listener["uid"] for listener in everyone] == sorted(uids)
        assert [listener["online"] for listener in everyone] == [False, True, False, True, False]
        assert all(isinstance(listener["last_seen"], str) for listener in everyone)
        online = [listener["uid"] for page in client.listeners(track) for listener in page]
        assert online == [uids[1], uids[3]]
        offline = [listener["uid"] for page in client.listeners(track, online=False) for listener in page]
        assert offline == [uids[0], uids[2], uids[4]]


def test_an_unknown_track_has_zeros_and_bad_names_raise(client):
    assert client.track("nobody/here") == {"track": "nobody/here", "subscribers": 0, "online": 0}
    assert list(client.listeners("nobody/here", online=None)) == []
    assert client.history("nobody/here") == History([], None, False)
    with pytest.raises(DoloresError) as refused:
        client.track("two words")
    assert (refused.value.status, refused.value.code) == (400, "bad_track")
    with pytest.raises(DoloresError) as refused:
        list(client.listeners(":data", limit=0))
    assert (refused.value.status, refused.value.code) == (400, "bad_limit")
    with pytest.raises(DoloresError) as refused:
        client.history(":data", after="yesterday")
    assert (refused.value.status, refused.value.code) == (400, "bad_event_id")


def test_history_pages_and_says_reset_when_after_is_older_than_what_is_kept():
    server = DoloresServer(args=["--max-stored-messages", "4"]).start()
    try:
        with Client(server.url, api_key=API_KEY) as client:
            ids = [client.update("rooms/h" if n % 2 else ":noise", n) for n in range(8)]
            kept = [Event(ids[n], "rooms/h", n) for n in (5, 7)]
            assert client.history("rooms/h") == History(kept, None, False)
            first = client.history("rooms/h", limit=1)
            assert first == History(kept[:1], ids[5], False)
            assert client.history("rooms/h", after=first.next) == History(kept[1:], None, False)
            old = client.history("rooms/h", after=ids[0])
            assert old.reset and old.messages == kept
    finally:
        server.close()


def test_the_async_client_has_the_same_calls(server, uid, track):
    async def main() -> None:
        async with AsyncClient(server.url, api_key=API_KEY) as client:
            await client.connect(uid, track)
            sent = await client.update(track, {"n": 1})
            assert await client.track(track) == {"track": track, "subscribers": 1, "online": 0}
            pages = [page async for page in client.listeners(track, online=None)]
            assert [[listener["uid"] for listener in page] for page in pages] == [[uid]]
            assert [page async for page in client.listeners(track)] == []
            assert await client.history(track) == History([Event(sent, track, {"n": 1})], None, False)

    asyncio.run(asyncio.wait_for(main(), 60))
