"""The asyncio client: ``AsyncClient``, the awaitable twin of ``Client``."""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, AsyncGenerator, AsyncIterator, Dict, Iterable, List, Optional, Union
from urllib.parse import quote

import httpx

from ._core import (
    DEFAULT_TOKEN_TTL,
    Event,
    ListenState,
    SSEParser,
    TokenSource,
    backoff_delay,
    base_headers,
    encode_body,
    error_from_exception,
    error_from_response,
    event_from_sse,
    listen_params,
    never_sent,
    read_json,
    resolve_settings,
    retry_status,
    sign_token,
    timeout_of,
    token_body,
    updates_body,
)
from .client import Update

__all__ = ["AsyncClient", "AsyncListener"]

log = logging.getLogger("dolores")


class AsyncClient:
    """``Client`` for asyncio: the same arguments and methods, awaitable.

    >>> async with AsyncClient() as client:
    ...     await client.update(":data", "contact 42 changed")
    ...     async for event in client.listen(uid):
    ...         ...
    """

    def __init__(
        self,
        server: Optional[str] = None,
        api_key: Optional[str] = None,
        token_secret: Optional[str] = None,
        *,
        timeout: Union[float, httpx.Timeout, None] = 10.0,
        retries: int = 3,
        backoff: float = 0.25,
        max_backoff: float = 5.0,
        max_connections: int = 100,
        http_client: Optional[httpx.AsyncClient] = None,
    ) -> None:
        self.server, self.api_key, self.token_secret = resolve_settings(server, api_key, token_secret)
        self.timeout = timeout_of(timeout)
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._own_http = http_client is None
        self._http = http_client or httpx.AsyncClient(
            timeout=self.timeout,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=min(20, max_connections)),
        )
        self._headers = base_headers(self.api_key)

    def __repr__(self) -> str:
        return f"AsyncClient({self.server!r})"

    async def aclose(self) -> None:
        """Closes the pooled connections (not an ``http_client`` passed in)."""
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def update(self, track: str, message: Any) -> str:
        """See ``Client.update``."""
        answer = await self._call("POST", "/api/v1/update", {"track": track, "message": message}, idempotent=False)
        return str(answer["id"])

    async def update_many(self, updates: Iterable[Update]) -> List[str]:
        """See ``Client.update_many``."""
        items = updates_body(updates)
        if not items:
            return []
        answer = await self._call("POST", "/api/v1/update", {"updates": items}, idempotent=False)
        return [str(i) for i in answer["ids"]]

    async def connect(self, uid: str, track: str) -> List[str]:
        """See ``Client.connect``."""
        answer = await self._call("POST", "/api/v1/connect", {"uid": uid, "track": track})
        return list(answer["tracks"])

    async def disconnect(self, uid: str, track: Optional[str] = None) -> List[str]:
        """See ``Client.disconnect``."""
        body: Dict[str, Any] = {"uid": uid}
        if track is not None:
            body["track"] = track
        answer = await self._call("POST", "/api/v1/disconnect", body)
        return list(answer["tracks"])

    async def listener(self, uid: str) -> Dict[str, Any]:
        """See ``Client.listener``."""
        return dict(await self._call("GET", f"/api/v1/listeners/{quote(uid, safe='')}"))

    async def stats(self) -> Dict[str, Any]:
        """See ``Client.stats``."""
        return dict(await self._call("GET", "/api/v1/stats"))

    async def token(self, uid: str, tracks: Optional[Iterable[str]] = None, ttl: int = DEFAULT_TOKEN_TTL) -> str:
        """See ``Client.token``."""
        if self.token_secret:
            return sign_token(self.token_secret, uid, tracks, ttl)
        body = token_body(uid, tracks, ttl)
        return str((await self._call("POST", "/api/v1/tokens", body))["token"])

    def listen(
        self,
        uid: str,
        token: Optional[TokenSource] = None,
        last_event_id: Optional[str] = None,
        *,
        idle_timeout: float = 50.0,
    ) -> "AsyncListener":
        """See ``Client.listen``; iterate with ``async for``. ``token`` may also be an
        ``async`` function."""
        state = ListenState(
            uid, token, self.token_secret, last_event_id, ListenState.FIRST_DELAY, ListenState.MOST_DELAY
        )
        return AsyncListener(self, state, idle_timeout)

    async def _call(self, method: str, path: str, body: Any = None, *, idempotent: bool = True) -> Any:
        content = None if body is None else encode_body(body)
        headers = dict(self._headers)
        if content is not None:
            headers["Content-Type"] = "application/json"
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, self.server + path, content=content, headers=headers)
            except httpx.HTTPError as exc:
                error = error_from_exception(exc, self.server)
                retry = idempotent or never_sent(exc)
            else:
                if response.status_code < 400:
                    return read_json(response.status_code, response.content)
                error = error_from_response(response.status_code, response.content, str(response.url))
                retry = retry_status(response.status_code, idempotent)
            if not retry or attempt >= self.retries:
                raise error
            delay = backoff_delay(attempt, self.backoff, self.max_backoff)
            log.info("dolores: %s %s failed (%s); trying again in %.2f s", method, path, error, delay)
            await asyncio.sleep(delay)
            attempt += 1


class AsyncListener(AsyncIterator[Event]):
    """What ``AsyncClient.listen()`` returns: an async iterator of ``Event`` that
    reconnects and resumes by itself. Stop it with ``aclose()`` (or by cancelling the
    task that iterates it); ``last_event_id`` is the id of the last event delivered."""

    def __init__(self, client: AsyncClient, state: ListenState, idle_timeout: float) -> None:
        self._client = client
        self._state = state
        self._idle_timeout = idle_timeout
        self._stopped = False
        self._wake: Optional[asyncio.Event] = None
        self._events = self._run()

    @property
    def uid(self) -> str:
        return self._state.uid

    @property
    def last_event_id(self) -> Optional[str]:
        return self._state.cursor

    def __aiter__(self) -> "AsyncListener":
        return self

    async def __anext__(self) -> Event:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        self._stopped = True
        if self._wake is not None:
            self._wake.set()
        try:
            await self._events.aclose()
        except RuntimeError:
            pass  # being iterated by another task, which sees the flag and ends

    async def __aenter__(self) -> "AsyncListener":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def _sleep(self, delay: float) -> None:
        self._wake = asyncio.Event()
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except asyncio.TimeoutError:
            pass

    async def _run(self) -> AsyncGenerator[Event, None]:
        client, state = self._client, self._state
        stream_timeout = httpx.Timeout(
            connect=client.timeout.connect,
            read=self._idle_timeout,
            write=client.timeout.write,
            pool=client.timeout.pool,
        )
        headers = dict(client._headers)
        headers.pop("Authorization", None)
        path = quote(state.uid, safe="")
        while not self._stopped:
            delay = 0.0
            try:
                if state.needs_token_call():
                    token = state.token_source(state.uid)  # type: ignore[operator,misc]
                    state.provide(await token if inspect.isawaitable(token) else token)
                token = state.token()
                if state.cursor is None:
                    response = await client._http.get(
                        f"{client.server}/poll/{path}",
                        params=listen_params(token, None, timeout="0"),
                        headers=headers,
                    )
                    if response.status_code != 200:
                        delay = state.refused(error_from_response(response.status_code, response.content))
                    else:
                        for event in state.poll_events(read_json(200, response.content)):
                            yield event
                else:
                    sse_headers = dict(headers, Accept="text/event-stream")
                    async with client._http.stream(
                        "GET",
                        f"{client.server}/listen/{path}",
                        params=listen_params(token, state.cursor),
                        headers=sse_headers,
                        timeout=stream_timeout,
                    ) as response:
                        if response.status_code != 200:
                            await response.aread()
                            delay = state.refused(error_from_response(response.status_code, response.content))
                        elif not response.headers.get("content-type", "").startswith("text/event-stream"):
                            delay = state.failed()
                        else:
                            parser = SSEParser()
                            opened = False
                            async for chunk in response.aiter_bytes():
                                if self._stopped:
                                    return
                                if not opened:
                                    opened = True
                                    state.opened()
                                for dispatched in parser.feed(chunk):
                                    received = event_from_sse(*dispatched)
                                    if received is not None and state.take(received):
                                        yield received
                                if parser.retry_ms is not None:
                                    state.retry_ms = parser.retry_ms
                            delay = state.ended() if opened else state.failed()
            except httpx.HTTPError as exc:
                delay = state.failed()
                log.info("dolores: listener %s lost its stream (%r); reconnecting in %.2f s", state.uid, exc, delay)
            if delay > 0 and not self._stopped:
                await self._sleep(delay)
