"""dolores.django's webhook view: signatures checked (constant time, five minutes of
tolerance), each event sent as its Django signal; and end to end, the real server's
webhooks reaching a live Django."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from django.core.handlers.wsgi import WSGIHandler
from django.test import Client as BrowserClient
from dolores import Client
from dolores.django import listener_offline, listener_online, track_occupied, track_vacated
from dolores.django.views import verify_signature
from harness import API_KEY, Collector, DoloresServer, wait_until

SECRET = "django-webhook-secret"


def sign(body: bytes, secret: str = SECRET, t: int | None = None) -> str:
    t = int(time.time()) if t is None else t
    v1 = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={v1}"


def event(kind: str, **data: str) -> bytes:
    return json.dumps(
        {"id": f"evt_{kind}", "type": kind, "time": "2026-11-28T16:00:00.123Z", "data": data}
    ).encode()


class Heard:
    """Connects to the four signals and keeps what they send."""

    def __init__(self) -> None:
        self.calls: list = []
        self.signals = [listener_online, listener_offline, track_occupied, track_vacated]
        for s in self.signals:
            s.connect(self.receive)

    def receive(self, signal, sender, **kwargs):  # noqa: ANN001 - Django's signature
        name = {listener_online: "listener_online", listener_offline: "listener_offline",
                track_occupied: "track_occupied", track_vacated: "track_vacated"}[signal]
        self.calls.append((name, sender, kwargs))

    def close(self) -> None:
        for s in self.signals:
            s.disconnect(self.receive)


@pytest.fixture
def heard():
    h = Heard()
    yield h
    h.close()


@pytest.fixture
def app(settings):
    settings.DOLORES_WEBHOOK_SECRET = SECRET
    # Dolores sends no CSRF token: the view must not need one.
    return BrowserClient(enforce_csrf_checks=True)


def post(app, body: bytes, signature: str | None):
    headers = {} if signature is None else {"HTTP_DOLORES_SIGNATURE": signature}
    return app.post("/:webhook", body, content_type="application/json", **headers)


def test_a_signed_event_sends_its_signal(app, heard):
    body = event("listener.online", uid="abcdefgh1")
    response = post(app, body, sign(body))
    assert response.status_code == 200, response.content
    assert response.json() == {"ok": True}
    [(name, sender, kwargs)] = heard.calls
    assert name == "listener_online" and sender == "dolores"
    assert kwargs["uid"] == "abcdefgh1"
    assert kwargs["event_id"] == "evt_listener.online"
    assert kwargs["time"].year == 2026 and kwargs["time"].tzinfo is not None
    assert kwargs["event"]["data"] == {"uid": "abcdefgh1"}


@pytest.mark.parametrize(
    "kind, signal, field",
    [
        ("listener.offline", "listener_offline", "uid"),
        ("track.occupied", "track_occupied", "track"),
        ("track.vacated", "track_vacated", "track"),
    ],
)
def test_each_type_has_its_signal(app, heard, kind, signal, field):
    body = event(kind, **{field: "rooms/42" if field == "track" else "abcdefgh1"})
    assert post(app, body, sign(body)).status_code == 200
    [(name, _, kwargs)] = heard.calls
    assert name == signal and field in kwargs


def error_of(response):
    return response.status_code, response.json()["error"]["code"]


def test_a_wrong_signature_is_refused_and_sends_nothing(app, heard):
    body = event("listener.online", uid="abcdefgh1")
    assert error_of(post(app, body, sign(body, secret="another"))) == (403, "wrong_signature")
    assert error_of(post(app, body, None)) == (400, "missing_signature")
    assert error_of(post(app, body, "v1=abc")) == (400, "bad_signature")
    # A body changed after signing.
    assert error_of(post(app, event("listener.online", uid="zzzzzzzz9"), sign(body))) == (403, "wrong_signature")
    assert heard.calls == []


def test_a_signature_older_or_newer_than_five_minutes_is_refused(app, heard):
    body = event("listener.online", uid="abcdefgh1")
    now = int(time.time())
    assert error_of(post(app, body, sign(body, t=now - 301))) == (403, "stale_signature")
    assert error_of(post(app, body, sign(body, t=now + 301))) == (403, "stale_signature")
    assert post(app, body, sign(body, t=now - 290)).status_code == 200
    assert len(heard.calls) == 1


def test_verify_signature_takes_any_of_several_v1():
    body = b"{}"
    good = sign(body).split(",v1=")[1]
    verify_signature(f"t={int(time.time())},v1=00ff,v1={good}", body, SECRET)


def test_an_unknown_type_is_taken_and_ignored(app, heard):
    body = event("listener.teleported", uid="abcdefgh1")
    response = post(app, body, sign(body))
    assert response.status_code == 200 and response.json()["ignored"] is True
    assert heard.calls == []


def test_without_a_webhook_secret_the_api_key_checks(app, settings, heard):
    del settings.DOLORES_WEBHOOK_SECRET
    settings.DOLORES_API_KEY = "the-api-key"
    body = event("listener.online", uid="abcdefgh1")
    assert post(app, body, sign(body, secret="the-api-key")).status_code == 200
    assert error_of(post(app, body, sign(body))) == (403, "wrong_signature")


def test_only_post(app):
    response = app.get("/:webhook")
    assert response.status_code == 405 and response["Allow"] == "POST"


def test_a_receiver_that_raises_makes_dolores_retry(app):
    def broken(sender, **kwargs):  # noqa: ANN001
        raise RuntimeError("the database is away")

    listener_online.connect(broken)
    try:
        body = event("listener.online", uid="abcdefgh1")
        app.raise_request_exception = False
        assert post(app, body, sign(body)).status_code == 500
    finally:
        listener_online.disconnect(broken)


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # noqa: ANN002 - no access log in the test output
        pass


class ThreadedWSGIServer(WSGIServer):
    """One thread per request: Dolores sends several lanes at once."""

    daemon_threads = True

    def process_request(self, request, client_address):  # noqa: ANN001
        threading.Thread(target=self._handle, args=(request, client_address), daemon=True).start()

    def _handle(self, request, client_address):  # noqa: ANN001
        try:
            self.finish_request(request, client_address)
        finally:
            self.shutdown_request(request)


@pytest.fixture
def django_app():
    """This Django project served on a loopback port (the app Dolores calls)."""
    httpd = make_server("127.0.0.1", 0, WSGIHandler(), server_class=ThreadedWSGIServer, handler_class=_Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def test_the_real_servers_webhooks_reach_django_as_signals(django_app, settings, heard, uid, track):
    settings.DOLORES_WEBHOOK_SECRET = SECRET
    server = DoloresServer(
        args=[
            "--webhook-url", f"{django_app}/:webhook",
            "--webhook-secret", SECRET,
            "--presence-grace", "300ms",
            "--webhook-max-backoff", "200ms",
        ]
    ).start()
    try:
        with Client(server.url, api_key=API_KEY) as client:
            client.connect(uid, track)
            collector = Collector(client.listen(uid))
            wait_until(lambda: ("listener_online", uid) in [(n, k.get("uid")) for n, _, k in heard.calls],
                       what="listener_online")
            collector.close()
            wait_until(lambda: ("listener_offline", uid) in [(n, k.get("uid")) for n, _, k in heard.calls],
                       what="listener_offline")
            wait_until(lambda: ("track_vacated", track) in [(n, k.get("track")) for n, _, k in heard.calls],
                       what="track_vacated")
        names = [n for n, _, k in heard.calls if k.get("uid") == uid]
        assert names == ["listener_online", "listener_offline"]
    finally:
        server.close()
