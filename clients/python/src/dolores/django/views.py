"""The views browsers call: subscribe and unsubscribe a listener, and get a listener
token; and ``webhook``, the one Dolores calls (see its doc). Each takes ``POST`` with a JSON body ``{"uid": U}``, checks it, asks
``DOLORES_AUTHORIZE``, then asks Dolores. They are ordinary Django views: CSRF is
enforced by ``CsrfViewMiddleware`` as for any other (the browser client sends the
``X-CSRFToken`` header from the ``csrftoken`` cookie). Errors answer the server's
shape, ``{"error": {"code", "message"}}``."""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from datetime import datetime
from hashlib import sha256
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, JsonResponse
from django.utils.module_loading import import_string
from django.views.decorators.csrf import csrf_exempt

from .._core import DoloresError, check_track, check_uid
from . import get_client, setting

__all__ = ["authorize", "connect", "disconnect", "token", "webhook", "verify_signature"]

#: How far a webhook's signed time may be from now, in seconds: room for clocks that
#: disagree a little, and for a request that waited; a captured request replayed later
#: than this is refused.
SIGNATURE_TOLERANCE = 300

log = logging.getLogger("dolores.django")

Authorize = Callable[[HttpRequest, str, str], bool]


def error(status: int, code: str, message: str) -> JsonResponse:
    """An error in Dolores' shape."""
    return JsonResponse({"error": {"code": code, "message": message}}, status=status)


def authorize_function() -> Optional[Authorize]:
    """``DOLORES_AUTHORIZE``: a dotted path (or a callable), or ``None``."""
    value = setting("DOLORES_AUTHORIZE")
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = import_string(value)
    if not callable(value):
        raise TypeError("DOLORES_AUTHORIZE must name a function (request, uid, track) -> bool")
    return value  # type: ignore[no-any-return]


def authorize(request: HttpRequest, uid: str, track: str) -> bool:
    """What ``DOLORES_AUTHORIZE`` says (everything is allowed without it). A hook that
    raises ``PermissionDenied`` says no."""
    hook = authorize_function()
    if hook is None:
        return True
    try:
        return bool(hook(request, uid, track))
    except PermissionDenied:
        return False


class _Refused(Exception):
    def __init__(self, response: JsonResponse) -> None:
        self.response = response


def _body(request: HttpRequest) -> Dict[str, Any]:
    if request.method != "POST":
        response = error(405, "method_not_allowed", "this endpoint takes POST")
        response["Allow"] = "POST"
        raise _Refused(response)
    try:
        body = json.loads(request.body or b"null")
    except (ValueError, UnicodeDecodeError):
        raise _Refused(error(400, "bad_json", 'the body is not valid JSON: send {"uid": …}')) from None
    if not isinstance(body, dict):
        raise _Refused(error(400, "bad_request", 'the body must be a JSON object {"uid": …}'))
    if "uid" not in body:
        raise _Refused(error(400, "bad_request", '"uid" is missing'))
    return body


def _uid(body: Dict[str, Any]) -> str:
    uid = body["uid"]
    try:
        check_uid(uid)
    except DoloresError as e:
        raise _Refused(error(400, e.code, e.message)) from None
    return uid  # type: ignore[no-any-return]


def _track(track: str) -> str:
    try:
        check_track(track)
    except DoloresError as e:
        raise _Refused(error(400, e.code, e.message)) from None
    return track


def _allowed(request: HttpRequest, uid: str, tracks: List[str]) -> None:
    for track in tracks:
        if not authorize(request, uid, track):
            raise _Refused(error(403, "not_authorized", f"this listener may not use the track {track!r}"))


def _upstream(e: DoloresError) -> JsonResponse:
    """What the browser is told when Dolores said no or could not be reached."""
    if e.status is None:
        log.error("dolores: %s", e)
        return error(503, "dolores_unavailable", "the push server cannot be reached; try again in a moment")
    if e.status == 400 and e.code in ("bad_uid", "bad_track", "bad_ttl"):
        return error(400, e.code, e.message)
    log.error("dolores: the push server answered %s", e)
    return error(502, e.code, f"the push server answered {e.status} {e.code}")


def _view(handler: Callable[..., Union[Dict[str, Any], Tuple[int, Dict[str, Any]]]]) -> Callable[..., JsonResponse]:
    def view(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
        try:
            return JsonResponse(handler(request, *args, **kwargs))
        except _Refused as refused:
            return refused.response
        except DoloresError as e:
            return _upstream(e)

    view.__name__ = handler.__name__
    view.__doc__ = handler.__doc__
    view.__module__ = handler.__module__
    view.__qualname__ = handler.__qualname__
    return view


@_view
def connect(request: HttpRequest, track: str) -> Dict[str, Any]:
    """``POST :connect/<track>`` ``{"uid"}``: subscribes the listener to ``track``.
    Answers ``{"uid", "tracks"}``."""
    uid = _uid(_body(request))
    track = _track(track)
    _allowed(request, uid, [track])
    return {"uid": uid, "tracks": get_client().connect(uid, track)}


@_view
def disconnect(request: HttpRequest, track: str) -> Dict[str, Any]:
    """``POST :disconnect/<track>`` ``{"uid"}``: unsubscribes the listener from
    ``track``. Answers ``{"uid", "tracks"}``; a listener Dolores does not know has no
    tracks (the answer is the same, not a 404)."""
    uid = _uid(_body(request))
    track = _track(track)
    _allowed(request, uid, [track])
    try:
        tracks = get_client().disconnect(uid, track)
    except DoloresError as e:
        if e.code != "unknown_listener":
            raise
        tracks = []
    return {"uid": uid, "tracks": tracks}


@_view
def token(request: HttpRequest) -> Dict[str, Any]:
    """``POST :token`` ``{"uid", "tracks"?}``: a listener token for ``uid`` (valid
    ``DOLORES_TOKEN_TTL`` seconds), for servers that require them. Each of ``tracks``
    (connected when the stream opens) must pass ``DOLORES_AUTHORIZE``. Answers
    ``{"uid", "token"}``; the browser client's ``token`` option can call it."""
    body = _body(request)
    uid = _uid(body)
    tracks = body.get("tracks")
    if tracks is not None and (not isinstance(tracks, list) or not all(isinstance(t, str) for t in tracks)):
        raise _Refused(error(400, "bad_request", '"tracks" must be a list of track names'))
    unknown = set(body) - {"uid", "tracks"}
    if unknown:
        raise _Refused(error(400, "bad_request", f"unknown field {sorted(unknown)[0]!r}"))
    for track in tracks or []:
        _track(track)
    _allowed(request, uid, tracks or [])
    signed = get_client().token(uid, tracks=tracks, ttl=int(setting("DOLORES_TOKEN_TTL")))
    return {"uid": uid, "token": signed}


class BadSignature(Exception):
    """A webhook whose ``Dolores-Signature`` does not hold: ``status`` and ``code`` say
    how to answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def verify_signature(
    header: Optional[str], body: bytes, secret: str, *, now: Optional[float] = None, tolerance: int = SIGNATURE_TOLERANCE
) -> None:
    """Checks ``Dolores-Signature: t=<unix>,v1=<hex>`` against ``body``: the HMAC-SHA256
    of ``"<t>.<body>"`` under ``secret``, compared in constant time, and ``t`` within
    ``tolerance`` seconds of ``now``. Several ``v1`` may come (any one may match).
    Raises ``BadSignature``."""
    if not header:
        raise BadSignature(400, "missing_signature", "no Dolores-Signature header")
    stamp: Optional[str] = None
    candidates: List[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            stamp = value
        elif key == "v1":
            candidates.append(value)
    if stamp is None or not stamp.isdigit() or not candidates:
        raise BadSignature(400, "bad_signature", "Dolores-Signature is not t=<unix seconds>,v1=<hex>")
    now = time.time() if now is None else now
    if abs(now - int(stamp)) > tolerance:
        raise BadSignature(403, "stale_signature", f"the signature's time is more than {tolerance} s from now")
    signed = stamp.encode() + b"." + body
    expected = hmac.new(secret.encode(), signed, sha256).hexdigest()
    if not any(hmac.compare_digest(expected, candidate.lower()) for candidate in candidates):
        raise BadSignature(403, "wrong_signature", "the signature does not match the body")


def webhook_secret() -> Optional[str]:
    """``DOLORES_WEBHOOK_SECRET``, else the api key (what the server signs with when it
    has no webhook secret); each from settings, else the environment."""
    for name in ("DOLORES_WEBHOOK_SECRET", "DOLORES_API_KEY"):
        value = setting(name) or os.environ.get(name)
        if value:
            return str(value)
    return None


@csrf_exempt
def webhook(request: HttpRequest) -> JsonResponse:
    """``POST :webhook``: an event from Dolores (point ``--webhook-url`` here). Checks
    the signature, then sends the event's signal (``dolores.django.signals``) and
    answers ``{"ok": true}``; Dolores retries any other answer. Exempt from CSRF: no
    browser posts here, and the signature is the proof of origin.

    Answers 400 (``missing_signature``, ``bad_signature``, ``bad_json``) or 403
    (``stale_signature``, ``wrong_signature``); an event of a type this version does
    not know is taken (200) and ignored, so a newer server is not retried forever."""
    from .signals import BY_TYPE

    if request.method != "POST":
        response = error(405, "method_not_allowed", "this endpoint takes POST")
        response["Allow"] = "POST"
        return response
    secret = webhook_secret()
    if secret is None:
        log.error("dolores: a webhook came, and neither DOLORES_WEBHOOK_SECRET nor DOLORES_API_KEY is set to check it")
        return error(503, "no_webhook_secret", "this app cannot check webhooks: set DOLORES_WEBHOOK_SECRET")
    try:
        verify_signature(request.headers.get("Dolores-Signature"), request.body, secret)
    except BadSignature as e:
        log.warning("dolores: webhook refused: %s", e.message)
        return error(e.status, e.code, e.message)
    try:
        event = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        return error(400, "bad_json", "the body is not valid JSON")
    if not isinstance(event, dict) or not isinstance(event.get("data"), dict):
        return error(400, "bad_request", 'the body must be {"id", "type", "time", "data": {…}}')
    known = BY_TYPE.get(event.get("type"))  # type: ignore[arg-type]
    if known is None:
        return JsonResponse({"ok": True, "ignored": True})
    signal, field = known
    try:
        when: Optional[datetime] = datetime.fromisoformat(str(event.get("time", "")).replace("Z", "+00:00"))
    except ValueError:
        when = None
    signal.send(
        sender="dolores",
        event_id=event.get("id"),
        time=when,
        event=event,
        **{field: event["data"].get(field)},
    )
    return JsonResponse({"ok": True})
