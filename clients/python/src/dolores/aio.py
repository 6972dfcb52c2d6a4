"""The asyncio client: ``AsyncClient`` and the ``AsyncListener`` its ``listen()`` returns."""
# The source of client.py too: clients/python/scripts/unasync.py writes it from this file.

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncGenerator, AsyncIterator, Dict, Iterable, List, Optional, Union
from urllib.parse import quote

import httpx

from ._concurrency import AsyncStop, acall_token
from ._core import (
    DEFAULT_TOKEN_TTL,
    Event,
    History,
    ListenState,
    SSEParser,
    TokenSource,
    Update,
    backoff_delay,
    base_headers,
    encode_body,
    error_from_exception,
    error_from_response,
    event_from_sse,
    history_from,
    listen_params,
    listener_headers,
    never_sent,
    page_params,
    read_json,
    resolve_settings,
    retry_status,
    sign_token,
    stream_timeout,
    timeout_of,
    token_body,
    track_path,
    updates_body,
)

__all__ = ["AsyncClient", "AsyncListener"]

log = logging.getLogger("dolores")


class AsyncClient:
    """A connection to a Dolores server's backend API, for the tasks of one event loop;
    keeps a pool of connections, so make one and share it (or use it as a context
    manager).

    ``server``, ``api_key`` and ``token_secret`` default from ``DOLORES_SERVER``,
    ``DOLORES_API_KEY`` and ``DOLORES_TOKEN_SECRET`` (``server`` finally from
    ``http://127.0.0.1:8007``). ``timeout`` bounds each request, in seconds (or an
    ``httpx.Timeout``). A request that cannot get through (connection refused, 503
    while the server restarts or its store is busy) is tried again ``retries`` times,
    after ``backoff`` seconds doubling each time; a 4xx never is. ``update`` and
    ``update_many`` are only sent again when the first try cannot have reached the
    server, so a retry never publishes twice.

    >>> async with AsyncClient("http://127.0.0.1:8007", api_key="…") as client:
    ...     await client.update(":data", {"contact": 42})
    '17'
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

    # ---- lifecycle -----------------------------------------------------------------

    async def aclose(self) -> None:
        """Closes the pooled connections (not an ``http_client`` passed in)."""
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    # ---- the backend API -----------------------------------------------------------

    async def update(self, track: str, message: Any) -> str:
        """Publishes ``message`` (any JSON value) to ``track``; returns its event id once
        the server has stored it."""
        answer = await self._call("POST", "/api/v1/update", {"track": track, "message": message}, idempotent=False)
        return str(answer["id"])

    async def update_many(self, updates: Iterable[Update]) -> List[str]:
        """Publishes several messages at once, all or nothing: ``[(track, message), …]``
        (or ``{"track", "message"}`` dicts), at most 1000. Returns their ids in order."""
        items = updates_body(updates)
        if not items:
            return []
        answer = await self._call("POST", "/api/v1/update", {"updates": items}, idempotent=False)
        return [str(i) for i in answer["ids"]]

    async def connect(self, uid: str, track: str) -> List[str]:
        """Subscribes listener ``uid`` to ``track`` (creating the listener if new) and
        returns its tracks. Messages published from now on reach it."""
        answer = await self._call("POST", "/api/v1/connect", {"uid": uid, "track": track})
        return list(answer["tracks"])

    async def disconnect(self, uid: str, track: Optional[str] = None) -> List[str]:
        """Unsubscribes ``uid`` from ``track`` and returns its tracks; without ``track``
        forgets the listener. Raises ``DoloresError`` 404 ``unknown_listener`` for a
        uid the server does not know."""
        body: Dict[str, Any] = {"uid": uid}
        if track is not None:
            body["track"] = track
        answer = await self._call("POST", "/api/v1/disconnect", body)
        return list(answer["tracks"])

    async def listener(self, uid: str) -> Dict[str, Any]:
        """What the server knows of a listener: ``uid``, ``tracks``, ``online`` (open
        streams), ``last_seen``."""
        return dict(await self._call("GET", f"/api/v1/listeners/{quote(uid, safe='')}"))

    async def stats(self) -> Dict[str, Any]:
        """The server's counts (listeners, streams by transport, messages…)."""
        return dict(await self._call("GET", "/api/v1/stats"))

    async def track(self, track: str) -> Dict[str, Any]:
        """A track's counts: ``track``, ``subscribers`` (listeners subscribed) and
        ``online`` (those of them with an open stream on any node). An unknown track has
        zeros: a track exists for as long as anyone is subscribed to it."""
        return dict(await self._call("GET", track_path(track)))

    async def listeners(
        self, track: str, online: Optional[bool] = True, *, limit: Optional[int] = None
    ) -> AsyncIterator[List[Dict[str, Any]]]:
        """The listeners of ``track`` in uid order, a page (a list of ``{"uid",
        "online", "last_seen"}``) at a time, each page asked for when the one before
        is used up. ``online=True`` (the default) lists those online, ``False`` those
        offline, ``None`` everyone; ``limit`` is the most per page (1 to 1000, default
        100). With ``online``, a page may be shorter than ``limit``; none is empty.

        >>> async for page in client.listeners("rooms/42"):
        ...     print([listener["uid"] for listener in page])
        """
        after: Optional[str] = None
        while True:
            answer = await self._call("GET", track_path(track, "/listeners" + page_params(limit, after, online)))
            if answer["listeners"]:
                yield list(answer["listeners"])
            after = answer.get("next")
            if after is None:
                return

    async def history(self, track: str, after: Optional[str] = None, *, limit: Optional[int] = None) -> History:
        """What the server still keeps of ``track``, after event id ``after`` (from the
        oldest kept without it), in order: a ``History`` of at most ``limit`` messages
        (1 to 1000, default 100) with ``next`` for the page after and ``reset`` when
        ``after`` is older than what is kept."""
        return history_from(await self._call("GET", track_path(track, "/messages" + page_params(limit, after))))

    async def token(self, uid: str, tracks: Optional[Iterable[str]] = None, ttl: int = DEFAULT_TOKEN_TTL) -> str:
        """A listener token for ``uid``, valid ``ttl`` seconds, connecting the listener
        to ``tracks`` when it opens its stream. Signed here when the token secret is
        known (no request), else minted by the server."""
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
        """The events of listener ``uid``, as an async iterator of ``Event``, forever.

        It resumes by itself after drops and server restarts, naming the last id it
        delivered, so nothing is lost or doubled. ``token`` is a listener token or a
        function ``(uid) -> token``, plain or ``async`` (asked again when one expires);
        without it, tokens are signed here when the secret is known. ``last_event_id``
        resumes after an id you kept. A stream silent for ``idle_timeout`` seconds (the
        server sends a heartbeat every 20 s) is taken as dead and reopened. A reset
        comes as an ``Event`` with ``reset=True``. Errors that retrying cannot fix (401
        bad token, 404 unknown listener) raise ``DoloresError``; so does a revoked token
        (401 ``token_revoked``: the app disconnected the whole listener after the token
        was issued), which is not renewed.

        >>> async with client.listen(uid) as events:
        ...     async for event in events:
        ...         print(event.track, event.message)
        """
        state = ListenState(
            uid, token, self.token_secret, last_event_id, ListenState.FIRST_DELAY, ListenState.MOST_DELAY
        )
        return AsyncListener(self._http, self.server, state, stream_timeout(self.timeout, idle_timeout))

    # ---- plumbing ------------------------------------------------------------------

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
    reconnects and resumes by itself. ``last_event_id`` is the id of the last event
    delivered (keep it to resume later); ``aclose()`` stops it (from another task too:
    the iterator then ends at the next heartbeat or event at the latest).
    Cancelling the task that iterates it stops it at once.
    """

    def __init__(self, http: httpx.AsyncClient, server: str, state: ListenState, timeout: httpx.Timeout) -> None:
        # What it needs of the client is handed to it, and nothing else: it never
        # reaches into the client (and never sends the api key).
        self._http = http
        self._server = server
        self._state = state
        self._timeout = timeout
        self._headers = listener_headers()
        self._stop = AsyncStop()
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
        """Stops listening: the iteration ends and the stream is closed."""
        self._stop.set()
        try:
            await self._events.aclose()
        except (RuntimeError, ValueError):
            pass  # being iterated elsewhere (a thread, a task), which sees the flag and ends

    async def __aenter__(self) -> "AsyncListener":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def _run(self) -> AsyncGenerator[Event, None]:
        state = self._state
        path = quote(state.uid, safe="")
        while not self._stop.is_set():
            delay = 0.0
            try:
                if state.needs_token_call():
                    state.provide(await acall_token(state.token_source, state.uid))  # type: ignore[arg-type]
                token = state.token()
                if state.cursor is None:
                    # A listener without a cursor of its own would resume from the
                    # server's, which counts what was written to a stream, not what
                    # arrived: one immediate poll takes the queue so far and its cursor.
                    response = await self._http.get(
                        f"{self._server}/poll/{path}",
                        params=listen_params(token, None, timeout="0"),
                        headers=self._headers,
                    )
                    if response.status_code != 200:
                        delay = state.refused(error_from_response(response.status_code, response.content))
                    else:
                        for event in state.poll_events(read_json(200, response.content)):
                            yield event
                else:
                    async with self._http.stream(
                        "GET",
                        f"{self._server}/listen/{path}",
                        params=listen_params(token, state.cursor),
                        headers=dict(self._headers, Accept="text/event-stream"),
                        timeout=self._timeout,
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
                                if self._stop.is_set():
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
            if delay > 0 and await self._stop.wait(delay):
                return
