"""What the sync and the async client share: settings, errors, events, names, tokens,
the Server-Sent Events parser and the retry rules. No I/O happens here."""

from __future__ import annotations

import base64
import codecs
import hashlib
import hmac
import json
import os
import random
import re
import time
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import quote, urlencode

import httpx

__all__ = [
    "DEFAULT_SERVER",
    "DoloresError",
    "Event",
    "TokenSource",
    "check_track",
    "check_uid",
    "sign_token",
]

#: Where the client looks when neither the argument nor ``DOLORES_SERVER`` says: the
#: address ``dolores serve`` listens on by default.
DEFAULT_SERVER = "http://127.0.0.1:8007"
#: Lifetime of a listener token when the caller does not say (as the server's).
DEFAULT_TOKEN_TTL = 3600
#: Longest lifetime the server signs; local signing keeps the same limit.
MAX_TOKEN_TTL = 7 * 24 * 3600
#: Most updates in one ``update_many`` call (the server's limit).
MAX_BATCH = 1000

VERSION = "0.1.0"
USER_AGENT = f"dolores-python/{VERSION}"

#: A listener token, or something that gives one for a uid (called again whenever the
#: server says the token has expired).
TokenSource = Union[str, Callable[[str], str]]
#: One item of ``update_many``: a ``(track, message)`` pair or a ``{"track", "message"}`` dict.
Update = Union[Tuple[str, Any], Sequence[Any], Mapping[str, Any]]

_UID = re.compile(r"[A-Za-z0-9._-]{8,128}", re.ASCII)
_LINE_END = re.compile(r"\r\n|\r|\n")


class DoloresError(Exception):
    """An error answered by Dolores, or the reason it could not be asked.

    ``status`` is the HTTP status (``None`` when no answer came: then ``code`` is
    ``"unreachable"`` or ``"timeout"``); ``code`` is the server's stable snake_case
    error code (``"bad_track"``, ``"wrong_api_key"``, ``"unknown_listener"``…), or
    ``"http_<status>"`` when the answer was not a Dolores error.
    """

    def __init__(self, status: Optional[int], code: str, message: str = "") -> None:
        super().__init__(message or code)
        self.status = status
        self.code = code
        self.message = message or code

    def __str__(self) -> str:
        where = f"{self.status} " if self.status is not None else ""
        return f"{where}{self.code}: {self.message}"

    def __reduce__(self) -> Any:
        return (type(self), (self.status, self.code, self.message))

    def __repr__(self) -> str:
        return f"DoloresError(status={self.status!r}, code={self.code!r}, message={self.message!r})"


@dataclass(frozen=True)
class Event:
    """One delivery of ``listen()``.

    A message: ``id`` (resume after it with ``last_event_id=``), ``track`` and
    ``message`` (any JSON value). A reset (``reset=True``, ``track`` and ``message``
    ``None``): something was too old to replay, so reload your state from the app;
    only messages after ``id`` follow.
    """

    id: str
    track: Optional[str]
    message: Any
    reset: bool = False


@dataclass(frozen=True)
class History:
    """A page of a track's history (``history()``): ``messages``, a list of ``Event``
    in order; ``next``, the id to pass as ``after`` for the next page (``None`` on the
    last); ``reset``, true when ``after`` was older than what the server keeps, so
    messages after it were deleted: reload your state instead of applying a gap."""

    messages: List[Event]
    next: Optional[str] = None
    reset: bool = False


def history_from(answer: Mapping[str, Any]) -> History:
    """The ``History`` of a ``…/messages`` answer."""
    messages = [Event(str(m["id"]), m["track"], m.get("message")) for m in answer.get("messages", [])]
    following = answer.get("next")
    return History(messages, None if following is None else str(following), bool(answer.get("reset", False)))


def track_path(track: str, rest: str = "") -> str:
    """``/api/v1/tracks/{track}{rest}``, the track as one percent-encoded segment."""
    return "/api/v1/tracks/" + quote(track, safe="") + rest


def page_params(limit: Optional[int], after: Optional[str], online: Optional[bool] = None) -> str:
    """The query string of a paged track call (``""`` when there is nothing to say)."""
    params: Dict[str, str] = {}
    if online is not None:
        params["online"] = "true" if online else "false"
    if limit is not None:
        params["limit"] = str(limit)
    if after:
        params["after"] = after
    return "?" + urlencode(params) if params else ""


# ---- settings ----------------------------------------------------------------------


def resolve_settings(
    server: Optional[str], api_key: Optional[str], token_secret: Optional[str]
) -> Tuple[str, Optional[str], Optional[str]]:
    """The arguments, each defaulting from its ``DOLORES_*`` environment variable."""
    server = server or os.environ.get("DOLORES_SERVER") or DEFAULT_SERVER
    api_key = api_key if api_key is not None else (os.environ.get("DOLORES_API_KEY") or None)
    if token_secret is None:
        token_secret = os.environ.get("DOLORES_TOKEN_SECRET") or None
    if "://" not in server:
        # `127.0.0.1:8007`, the way `--listen` is written, means plain HTTP.
        server = f"http://{server}"
    return server.rstrip("/"), api_key, token_secret


def base_headers(api_key: Optional[str]) -> Dict[str, str]:
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def timeout_of(timeout: Union[float, httpx.Timeout, None]) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    if timeout is None:
        return httpx.Timeout(None)
    return httpx.Timeout(timeout, connect=min(timeout, 5.0))


def stream_timeout(timeout: httpx.Timeout, idle_timeout: float) -> httpx.Timeout:
    """The client's timeouts for a listener's stream, but for reading: a read waits at
    most ``idle_timeout`` (heartbeats keep a live stream under it)."""
    return httpx.Timeout(connect=timeout.connect, read=idle_timeout, write=timeout.write, pool=timeout.pool)


def listener_headers() -> Dict[str, str]:
    """The headers of a listener's requests: a listener shows its token, never the api key."""
    return base_headers(None)


# ---- names and tokens --------------------------------------------------------------


def check_uid(uid: Any) -> None:
    """Raises ``DoloresError(400, "bad_uid")`` unless ``uid`` is a valid listener uid:
    8–128 characters of ``A-Z a-z 0-9 - _ .`` (the server's rule)."""
    if not isinstance(uid, str) or not _UID.fullmatch(uid):
        raise DoloresError(400, "bad_uid", f"a uid is 8 to 128 characters of A-Z a-z 0-9 - _ . (got {uid!r})")


def check_track(track: Any) -> None:
    """Raises ``DoloresError(400, "bad_track")`` unless ``track`` is a valid track
    name: 1–256 bytes of UTF-8, no whitespace, no control characters."""
    if not isinstance(track, str):
        raise DoloresError(400, "bad_track", f"a track is a string (got {track!r})")
    size = len(track.encode("utf-8", "surrogatepass"))
    if size == 0 or size > 256:
        raise DoloresError(400, "bad_track", f"a track is 1 to 256 bytes, this one is {size}")
    for c in track:
        if c.isspace() or unicodedata.category(c) in ("Cc", "Cs"):
            raise DoloresError(
                400,
                "bad_track",
                f"a track may not contain whitespace or control characters (found {c!r})",
            )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def check_token_request(uid: str, tracks: Optional[Iterable[str]], ttl: Any) -> Optional[List[str]]:
    """The checks ``POST /api/v1/tokens`` makes, for tokens signed here."""
    check_uid(uid)
    if isinstance(tracks, str):
        raise DoloresError(400, "bad_request", '"tracks" must be a list of track names')
    listed = None if tracks is None else list(tracks)
    for track in listed or ():
        check_track(track)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_TOKEN_TTL:
        raise DoloresError(400, "bad_ttl", f"ttl is a whole number of seconds from 1 to {MAX_TOKEN_TTL} (got {ttl!r})")
    return listed


def sign_token(
    secret: str,
    uid: str,
    tracks: Optional[Iterable[str]] = None,
    ttl: int = DEFAULT_TOKEN_TTL,
    *,
    now: Optional[float] = None,
) -> str:
    """A listener token (an HS256 JWT: ``sub`` = uid, ``iat``, ``exp``, optional
    ``tracks``) signed with the server's token secret, exactly like
    ``POST /api/v1/tokens``."""
    listed = check_token_request(uid, tracks, ttl)
    issued = int(now if now is not None else time.time())
    claims: Dict[str, Any] = {"sub": uid, "iat": issued, "exp": issued + ttl}
    if listed is not None:
        claims["tracks"] = listed
    signing_input = _b64(_compact({"alg": "HS256", "typ": "JWT"})) + "." + _b64(_compact(claims))
    signature = hmac.new(secret.encode("utf-8"), signing_input.encode("ascii"), hashlib.sha256)
    return signing_input + "." + _b64(signature.digest())


# ---- requests and answers ----------------------------------------------------------


def token_body(uid: str, tracks: Optional[Iterable[str]], ttl: int) -> Dict[str, Any]:
    """The body of ``POST /api/v1/tokens``."""
    body: Dict[str, Any] = {"uid": uid, "ttl_seconds": ttl}
    if tracks is not None:
        body["tracks"] = [tracks] if isinstance(tracks, str) else list(tracks)
    return body


def encode_body(body: Any) -> bytes:
    """JSON as the server reads it (NaN and infinities are not JSON)."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def updates_body(updates: Iterable[Update]) -> List[Dict[str, Any]]:
    items: List[Dict[str, Any]] = []
    for i, update in enumerate(updates):
        if isinstance(update, Mapping):
            if set(update) != {"track", "message"}:
                raise TypeError(f"updates[{i}] must have exactly the keys 'track' and 'message'")
            items.append({"track": update["track"], "message": update["message"]})
        else:
            try:
                track, message = update
            except (TypeError, ValueError):
                raise TypeError(f"updates[{i}] must be a (track, message) pair") from None
            items.append({"track": track, "message": message})
    return items


def error_from_response(status: int, content: bytes, url: str = "") -> DoloresError:
    """The server's ``{"error": {"code", "message"}}``, or ``http_<status>``."""
    try:
        error = json.loads(content)["error"]
        code, message = error["code"], error.get("message", "")
        if isinstance(code, str) and code:
            return DoloresError(status, code, str(message))
    except (ValueError, KeyError, TypeError):
        pass
    text = content[:200].decode("utf-8", "replace").strip()
    return DoloresError(status, f"http_{status}", f"{url} answered {status}: {text}".strip())


def read_json(status: int, content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        raise DoloresError(status, "bad_response", "the answer is not JSON") from None


def error_from_exception(exc: httpx.HTTPError, server: str) -> DoloresError:
    if isinstance(exc, httpx.TimeoutException):
        error = DoloresError(None, "timeout", f"{server} did not answer in time ({type(exc).__name__})")
    else:
        error = DoloresError(None, "unreachable", f"cannot reach {server}: {exc or type(exc).__name__}")
    error.__cause__ = exc
    return error


def never_sent(exc: httpx.HTTPError) -> bool:
    """True when the request cannot have reached the server: safe to send again even
    when sending it twice would publish twice."""
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))


def retry_status(status: int, idempotent: bool) -> bool:
    """503 (store unavailable, shutting down) means nothing was done; a 502 or 504 from
    something in between may hide a request that was. A 4xx is never retried."""
    return status == 503 or (idempotent and status in (502, 504))


def backoff_delay(attempt: int, first: float, most: float) -> float:
    """``first``, doubling per attempt up to ``most``, each randomly between half and all
    of that (so many clients do not come back at the same instant)."""
    delay: float = min(most, first * float(2 ** min(attempt, 30)))
    return delay * (0.5 + random.random() / 2)


# ---- listening ---------------------------------------------------------------------


def listen_params(token: Optional[str], cursor: Optional[str], **extra: str) -> Dict[str, str]:
    params: Dict[str, str] = {}
    if token:
        params["token"] = token
    if cursor is not None:
        params["last_event_id"] = cursor
    params.update(extra)
    return params


def not_after(event_id: str, last: Optional[str]) -> bool:
    """True when ``event_id`` is not after ``last``. Ids are opaque, but this server's
    are decimal and grow in publish order: a guard against a duplicate."""
    if last is None or not event_id.isdigit() or not last.isdigit():
        return False
    a, b = event_id.lstrip("0") or "0", last.lstrip("0") or "0"
    return (len(a), a) <= (len(b), b)


class SSEParser:
    """The ``text/event-stream`` format, fed the body's bytes as they come.

    Lines end at CRLF, LF or CR only (a JSON message may hold U+2028 and friends, which
    ``str.splitlines`` would also split on). ``feed`` returns the events dispatched by
    blank lines as ``(id, event, data)``; ``id`` is the last event id seen so far.
    """

    def __init__(self) -> None:
        self.last_id: Optional[str] = None
        self.retry_ms: Optional[int] = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._after_cr = False
        self._first = True
        self._event = ""
        self._data: List[str] = []
        self._has_data = False

    def feed(self, chunk: bytes) -> List[Tuple[Optional[str], str, str]]:
        text = self._decoder.decode(chunk)
        if not text:
            return []
        if self._first:
            self._first = False
            text = text[1:] if text.startswith("\ufeff") else text
        if self._after_cr and text.startswith("\n"):
            text = text[1:]
        self._after_cr = text.endswith("\r")
        lines = _LINE_END.split(self._buffer + text)
        self._buffer = lines.pop()
        out = []
        for line in lines:
            dispatched = self.line(line)
            if dispatched is not None:
                out.append(dispatched)
        return out

    def line(self, line: str) -> Optional[Tuple[Optional[str], str, str]]:
        """One line without its line ending."""
        if line == "":
            if not self._has_data:
                self._event = ""
                return None
            dispatched = (self.last_id, self._event or "message", "\n".join(self._data))
            self._event, self._data, self._has_data = "", [], False
            return dispatched
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
        elif name == "retry":
            if value.isdigit():
                self.retry_ms = int(value)
        return None


def event_from_sse(event_id: Optional[str], kind: str, data: str) -> Optional[Event]:
    """The ``Event`` an SSE event carries, or ``None`` for one this client ignores."""
    if event_id is None:
        return None
    if kind == "reset":
        return Event(event_id, None, None, reset=True)
    if kind != "message":
        return None
    try:
        payload = json.loads(data)
        return Event(event_id, payload["track"], payload.get("message"))
    except (ValueError, KeyError, TypeError):
        return None


def events_from_poll(answer: Any) -> Tuple[List[Event], str, bool]:
    """A ``/poll`` answer: its events, the cursor after them, and whether it is a reset."""
    try:
        events = [Event(str(e["id"]), e["track"], e.get("message")) for e in answer["events"]]
        return events, str(answer["last_event_id"]), bool(answer.get("reset"))
    except (KeyError, TypeError):
        raise DoloresError(200, "bad_response", "the poll answer is not what Dolores sends") from None


class ListenState:
    """The decisions of a listening loop, shared by the sync and the async one: the
    cursor, the token, and how long to wait before the next attempt. The loop reports
    each outcome (``opened``, ``failed``, ``ended``, ``refused``); those that return
    answer with the delay (0 to go on at once), and ``refused`` raises what retrying
    cannot fix."""

    #: Reconnect delays grow from the first to the most, doubling, each with jitter
    #: (the browser client's numbers).
    FIRST_DELAY = 0.5
    MOST_DELAY = 30.0
    #: Expired tokens in a row before giving up.
    MAX_TOKEN_REFRESHES = 3

    def __init__(
        self,
        uid: str,
        token: Optional[TokenSource],
        token_secret: Optional[str],
        last_event_id: Optional[str],
        first_delay: float,
        most_delay: float,
    ) -> None:
        check_uid(uid)
        self.uid = uid
        self.token_source = token
        self.token_secret = token_secret
        self.cursor = last_event_id if last_event_id else None
        self.first_delay = first_delay
        self.most_delay = most_delay
        self.failures = 0
        self.refreshes = 0
        self.retry_ms = 2000
        self.reset_pending = False
        self._token: Optional[str] = None

    def token(self) -> Optional[str]:
        """The token for the next request: the given one, a fresh one from the given
        function, or one signed here when the secret is known."""
        if self._token is not None:
            return self._token
        source = self.token_source
        if isinstance(source, str):
            self._token = source
        elif source is not None:
            self.provide(source(self.uid))
        elif self.token_secret:
            self._token = sign_token(self.token_secret, self.uid)
        return self._token

    def needs_token_call(self) -> bool:
        """True when the next token must come from the caller's function. The listening
        loop calls it itself (``_concurrency.call_token`` / ``acall_token``: for the
        async client it may be a coroutine function) and hands the answer to ``provide``."""
        return self._token is None and callable(self.token_source)

    def provide(self, token: Any) -> None:
        if not isinstance(token, str) or not token:
            raise TypeError("token(uid) must return a non-empty string")
        self._token = token

    def take(self, event: Event) -> bool:
        """Whether to deliver ``event`` (a duplicate is dropped); moves the cursor."""
        if not event.reset and not_after(event.id, self.cursor):
            return False
        self.cursor = event.id
        return True

    def poll_events(self, answer: Any) -> Iterator[Event]:
        """The events of a ``/poll`` answer to deliver, in order (a reset comes as one
        event). The cursor moves with each one taken, and to the answer's own cursor
        once all are."""
        events, cursor, reset = events_from_poll(answer)
        self.opened()
        if reset or self.reset_pending:
            self.reset_pending = False
            self.cursor = cursor
            yield Event(cursor, None, None, reset=True)
            return
        for event in events:
            if self.take(event):
                yield event
        self.cursor = cursor

    def opened(self) -> None:
        self.failures = 0
        self.refreshes = 0

    def failed(self) -> float:
        delay = backoff_delay(self.failures, self.first_delay, self.most_delay)
        self.failures += 1
        return delay

    def ended(self) -> float:
        """The server ended the stream on purpose (shutdown): come back after its
        ``retry`` time, spread out so a restart is not met by every client at once."""
        return self.retry_ms / 1000 * (0.5 + random.random())

    def refused(self, error: DoloresError) -> float:
        """What an error answer of a listener endpoint means: a delay, or raise."""
        if error.status == 401 and error.code == "token_expired":
            self._token = None
            renewable = callable(self.token_source) or (self.token_source is None and self.token_secret)
            self.refreshes += 1
            if not renewable or self.refreshes > self.MAX_TOKEN_REFRESHES:
                raise error
            return 0.0 if self.refreshes == 1 else self.failed()
        if error.status == 401 and error.code == "token_revoked":
            # Not renewed, not even with a token function or the secret at hand: the
            # app disconnected this listener after the token was issued, on purpose;
            # whether it may listen again is the app's call (listen() with a new token).
            raise DoloresError(
                401,
                "token_revoked",
                f"the token of listener {self.uid} was revoked: the app disconnected the listener "
                "after the token was issued; listen again with a token issued after that if it may listen",
            )
        if error.status == 400 and error.code == "bad_event_id":
            # A cursor this server cannot read: start from its own, and say that
            # something may have been missed.
            self.cursor = None
            self.reset_pending = True
            return 0.0
        if error.status is not None and (error.status == 429 or error.status >= 500):
            return self.failed()
        raise error
