"""AsyncClient, the awaitable twin, against the real server."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from dolores import AsyncClient, DoloresError, Event
from harness import API_KEY, TOKEN_SECRET, free_port

WAIT = 20


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def take(listener, n: int) -> list:
    async def go():
        out = []
        async for event in listener:
            out.append(event)
            if len(out) == n:
                return out
        return out

    return await asyncio.wait_for(go(), WAIT)


def test_every_method(server, uid, track):
    async def main():
        async with AsyncClient(server.url, api_key=API_KEY) as c:
            assert await c.connect(uid, track) == [track]
            assert sorted(await c.connect(uid, track + "/b")) == sorted([track, track + "/b"])
            one = await c.update(track, {"contact": 1})
            many = await c.update_many([(track, 2), {"track": track + "/b", "message": "three"}])
            assert await c.update_many([]) == []
            assert int(one) < int(many[0]) < int(many[1])
            info = await c.listener(uid)
            assert info["uid"] == uid
            assert "listeners" in await c.stats()
            async with c.listen(uid) as events:
                got = await take(events, 3)
                assert [(e.id, e.track, e.message) for e in got] == [
                    (one, track, {"contact": 1}),
                    (many[0], track, 2),
                    (many[1], track + "/b", "three"),
                ]
                live = await c.update(track, "live")
                assert (await take(events, 1))[0] == Event(live, track, "live")
                assert events.last_event_id == live
            assert await c.disconnect(uid, track) == [track + "/b"]
            assert await c.disconnect(uid) == []
            with pytest.raises(DoloresError) as caught:
                await c.disconnect(uid)
            assert (caught.value.status, caught.value.code) == (404, "unknown_listener")

    run(main())


@pytest.mark.parametrize(
    "call, status, code",
    [
        (lambda c: c.update("a b", 1), 400, "bad_track"),
        (lambda c: c.update(":big", "x" * 70_000), 413, "message_too_large"),
        (lambda c: c.update_many([(":t", i) for i in range(1001)]), 400, "bad_batch"),
        (lambda c: c.connect("short", ":t"), 400, "bad_uid"),
        (lambda c: c.token("valid-uid-123"), 400, "no_token_secret"),
    ],
)
def test_errors(server, call, status, code):
    async def main():
        async with AsyncClient(server.url, api_key=API_KEY) as c:
            with pytest.raises(DoloresError) as caught:
                await call(c)
            assert (caught.value.status, caught.value.code) == (status, code)
        async with AsyncClient(server.url, api_key="wrong") as c:
            with pytest.raises(DoloresError) as caught:
                await c.update(":t", 1)
            assert (caught.value.status, caught.value.code) == (401, "wrong_api_key")
        async with AsyncClient(f"http://127.0.0.1:{free_port()}", api_key="k", retries=1, backoff=0.01) as c:
            with pytest.raises(DoloresError) as caught:
                await c.update(":t", 1)
            assert caught.value.status is None and caught.value.code == "unreachable"

    run(main())


def test_retry_rules():
    answers = [
        httpx.Response(503, json={"error": {"code": "store_unavailable", "message": ""}}),
        httpx.Response(200, json={"id": "5"}),
        httpx.Response(404, json={"error": {"code": "unknown_listener", "message": ""}}),
    ]
    seen = []

    def handler(request):
        seen.append(request)
        return answers.pop(0)

    async def main():
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        c = AsyncClient("http://dolores.test", api_key="k", backoff=0.001, http_client=http)
        assert await c.update(":t", 1) == "5"
        with pytest.raises(DoloresError) as caught:
            await c.disconnect("valid-uid-123")
        assert caught.value.status == 404
        await http.aclose()

    run(main())
    assert len(seen) == 3


def test_listen_resumes_after_kill_9_and_restart(own_server, uid, track):
    async def main():
        async with AsyncClient(own_server.url, api_key=API_KEY) as c:
            await c.connect(uid, track)
            events = c.listen(uid)
            first = await c.update(track, "before")
            assert (await take(events, 1))[0].id == first
            own_server.kill()
            await asyncio.get_running_loop().run_in_executor(None, own_server.restart)
            after = await c.update_many([(track, "after 1"), (track, "after 2")])
            got = await take(events, 2)
            assert [(e.id, e.message) for e in got] == [(after[0], "after 1"), (after[1], "after 2")]
            await events.aclose()

    run(main())


def test_listen_can_be_cancelled(server, uid, track):
    async def main():
        async with AsyncClient(server.url, api_key=API_KEY) as c:
            await c.connect(uid, track)

            async def forever():
                async for _ in c.listen(uid):
                    pass

            task = asyncio.create_task(forever())
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main())


def test_tokens_from_an_async_function_are_renewed_when_they_expire(token_server, uid, track):
    from dolores import sign_token

    calls = []

    async def token(for_uid):
        calls.append(for_uid)
        # The first token is long expired (past the server's 60 s leeway).
        return sign_token(TOKEN_SECRET, for_uid, [track], now=0 if len(calls) == 1 else None)

    async def main():
        async with AsyncClient(token_server.url, api_key=API_KEY) as c:
            events = c.listen(uid, token=token)
            waiter = asyncio.create_task(take(events, 1))
            # The token's tracks claim connects the listener when its stream opens.
            for _ in range(200):
                try:
                    if (await c.listener(uid))["tracks"] == [track]:
                        break
                except DoloresError:
                    pass
                await asyncio.sleep(0.05)
            published = await c.update(track, "granted by the token")
            assert (await waiter)[0] == Event(published, track, "granted by the token")
            await events.aclose()

    run(main())
    assert calls[:2] == [uid, uid]
