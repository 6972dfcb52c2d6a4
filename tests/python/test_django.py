"""dolores.django: the views (CSRF, uid and track checks, the authorize hook, errors),
the client from settings, update_on_commit, the system checks and the test recorder."""

from __future__ import annotations

import logging

import pytest
from django.core import checks
from django.db import transaction
from django.test import Client as BrowserClient
from django.urls import reverse
from django_project import rules
from django_project.models import Note
from dolores import Client, DoloresError, Event
from dolores.django import client as lazy_client
from dolores.django import get_client, update_on_commit
from dolores.django.testing import record_updates
from harness import API_KEY, TOKEN_SECRET, Collector, free_port, wait_until

CSRF = "abcdefghijklmnopqrstuvwxyz012345"


@pytest.fixture(autouse=True)
def dolores_settings(settings, server):
    settings.DOLORES_SERVER = server.url
    settings.DOLORES_API_KEY = API_KEY
    settings.DOLORES_TOKEN_SECRET = None
    rules.asked.clear()
    return settings


@pytest.fixture
def browser():
    """A browser that has the csrftoken cookie, and sends the header like dolores.js."""
    b = BrowserClient(enforce_csrf_checks=True)
    b.cookies["csrftoken"] = CSRF
    return b


@pytest.fixture
def backend(server):
    with Client(server.url, api_key=API_KEY) as c:
        yield c


def post(browser, url, body, **headers):
    return browser.post(url, body, content_type="application/json", HTTP_X_CSRFTOKEN=CSRF, **headers)


def error_of(response):
    assert response["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    return response.status_code, error["code"]


def test_connect_subscribes_the_listener_on_the_server(browser, backend, uid):
    response = post(browser, "/:connect/:data", {"uid": uid})
    assert response.status_code == 200
    assert response.json() == {"uid": uid, "tracks": [":data"]}
    assert backend.listener(uid)["tracks"] == [":data"]
    assert rules.asked == [("/:connect/:data", uid, ":data")]


@pytest.mark.parametrize(
    "path, track",
    [
        ("rooms/42/chat:main", "rooms/42/chat:main"),
        (":some/path-that/has-slashes;x", ":some/path-that/has-slashes;x"),
        ("a%3Fb%23c%25d", "a?b#c%d"),
        ("h%C3%A9llo", "héllo"),
    ],
)
def test_tracks_may_hold_slashes_colons_and_escapes(browser, backend, uid, path, track):
    response = post(browser, f"/:connect/{path}", {"uid": uid}, HTTP_X_ROOM_MEMBER="yes")
    assert response.status_code == 200, response.content
    assert response.json()["tracks"] == [track]
    assert backend.listener(uid)["tracks"] == [track]
    assert reverse("dolores:connect", args=[track]).startswith("/:connect/")


def test_disconnect_unsubscribes_and_is_idempotent(browser, backend, uid):
    backend.connect(uid, ":a")
    backend.connect(uid, ":b")
    response = post(browser, "/:disconnect/:a", {"uid": uid})
    assert (response.status_code, response.json()) == (200, {"uid": uid, "tracks": [":b"]})
    assert rules.asked == [("/:disconnect/:a", uid, ":a")]
    never = uid + "-never-connected"
    response = post(browser, "/:disconnect/:a", {"uid": never})
    assert (response.status_code, response.json()) == (200, {"uid": never, "tracks": []})


def test_the_views_can_be_mounted_under_a_prefix(browser, backend, uid):
    assert post(browser, "/push/:connect/:data", {"uid": uid}).status_code == 200
    assert reverse("push:connect", args=[":data"]) == "/push/:connect/:data"
    assert backend.listener(uid)["tracks"] == [":data"]


def test_csrf_is_enforced_like_any_django_view(uid, backend):
    b = BrowserClient(enforce_csrf_checks=True)
    response = b.post("/:connect/:data", {"uid": uid}, content_type="application/json")
    assert response.status_code == 403  # Django's CSRF failure
    b.cookies["csrftoken"] = CSRF
    response = b.post("/:connect/:data", {"uid": uid}, content_type="application/json", HTTP_X_CSRFTOKEN="x" * 32)
    assert response.status_code == 403
    assert rules.asked == [], "the hook is not even asked"
    with pytest.raises(DoloresError):
        backend.listener(uid)
    for url in ("/:disconnect/:data", "/:token"):
        assert (
            BrowserClient(enforce_csrf_checks=True).post(url, {"uid": uid}, content_type="application/json").status_code
            == 403
        )


@pytest.mark.parametrize(
    "body, status, code",
    [
        ('{"uid": "short"}', 400, "bad_uid"),
        ('{"uid": "has space 123"}', 400, "bad_uid"),
        ('{"uid": 12345678}', 400, "bad_uid"),
        ("{}", 400, "bad_request"),
        ("[]", 400, "bad_request"),
        ("not json", 400, "bad_json"),
        ("", 400, "bad_request"),
    ],
)
def test_bad_bodies_answer_errors_in_the_servers_shape(browser, body, status, code):
    for url in ("/:connect/:data", "/:disconnect/:data", "/:token"):
        response = browser.post(url, body, content_type="application/json", HTTP_X_CSRFTOKEN=CSRF)
        assert error_of(response) == (status, code), url


def test_bad_tracks_and_methods(browser, uid):
    assert error_of(post(browser, "/:connect/has%20space", {"uid": uid})) == (400, "bad_track")
    assert error_of(post(browser, "/:connect/" + "x" * 257, {"uid": uid})) == (400, "bad_track")
    response = browser.get("/:connect/:data")
    assert error_of(response) == (405, "method_not_allowed") and response["Allow"] == "POST"


def test_the_authorize_hook_is_asked_for_connect_and_disconnect(browser, backend, uid):
    for url in ("/:connect/:secret/stuff", "/:disconnect/:secret/stuff", "/:connect/:forbidden", "/:connect/rooms/7"):
        assert error_of(post(browser, url, {"uid": uid})) == (403, "not_authorized"), url
    assert [a[2] for a in rules.asked] == [":secret/stuff", ":secret/stuff", ":forbidden", "rooms/7"]
    assert all(a[1] == uid for a in rules.asked)
    with pytest.raises(DoloresError):
        backend.listener(uid)  # never connected
    assert post(browser, "/:connect/rooms/7", {"uid": uid}, HTTP_X_ROOM_MEMBER="yes").status_code == 200


def test_without_a_hook_every_track_is_allowed(browser, settings, uid):
    del settings.DOLORES_AUTHORIZE
    assert post(browser, "/:connect/:secret", {"uid": uid}).status_code == 200
    assert rules.asked == []


def test_a_hook_may_be_a_callable(browser, settings, uid):
    settings.DOLORES_AUTHORIZE = lambda request, u, track: track == ":ok"
    assert post(browser, "/:connect/:ok", {"uid": uid}).status_code == 200
    assert post(browser, "/:connect/:other", {"uid": uid}).status_code == 403


def test_server_trouble_is_told_in_the_same_shape(browser, settings, uid):
    settings.DOLORES_API_KEY = "wrong"
    assert error_of(post(browser, "/:connect/:data", {"uid": uid})) == (502, "wrong_api_key")
    settings.DOLORES_SERVER = f"http://127.0.0.1:{free_port()}"
    assert error_of(post(browser, "/:connect/:data", {"uid": uid})) == (503, "dolores_unavailable")


def test_the_token_view(browser, settings, token_server, uid, track):
    settings.DOLORES_SERVER = token_server.url
    settings.DOLORES_TOKEN_TTL = 600
    # Without the secret in settings the token is minted by the server...
    response = post(browser, "/:token", {"uid": uid})
    assert response.status_code == 200 and response.json()["uid"] == uid
    minted = response.json()["token"]
    # ... with it, signed here. Both are accepted by the server.
    settings.DOLORES_TOKEN_SECRET = TOKEN_SECRET
    response = post(browser, "/:token", {"uid": uid, "tracks": [track]})
    signed = response.json()["token"]
    assert [a[2] for a in rules.asked] == [track]
    with Client(token_server.url, api_key=API_KEY) as c:
        events = Collector(c.listen(uid, token=signed))  # its tracks claim connects
        try:
            wait_until(lambda: _tracks(c, uid) == [track], what="the token's tracks to connect")
            published = c.update(track, "via the token view")
            assert events.next() == Event(published, track, "via the token view")
        finally:
            events.close()
        c.connect(uid, track)
        queued = c.update(track, "queued")
        with c.listen(uid, token=minted, last_event_id=published) as again:
            assert next(again) == Event(queued, track, "queued")

    assert error_of(post(browser, "/:token", {"uid": uid, "tracks": [":secret"]})) == (403, "not_authorized")
    assert error_of(post(browser, "/:token", {"uid": uid, "tracks": ":data"})) == (400, "bad_request")
    assert error_of(post(browser, "/:token", {"uid": uid, "tracks": ["a b"]})) == (400, "bad_track")
    assert error_of(post(browser, "/:token", {"uid": uid, "extra": 1})) == (400, "bad_request")


def _tracks(c, uid):
    try:
        return c.listener(uid)["tracks"]
    except DoloresError:
        return None


def test_the_token_view_on_a_server_without_a_secret(browser, uid):
    assert error_of(post(browser, "/:token", {"uid": uid})) == (502, "no_token_secret")


# ---- the client from settings --------------------------------------------------------


def test_the_client_follows_settings(settings, server, uid):
    assert isinstance(get_client(), Client)
    assert get_client() is get_client()
    assert lazy_client.server == server.url
    assert lazy_client.connect(uid, ":lazy") == [":lazy"]
    settings.DOLORES_SERVER = "http://127.0.0.1:9"
    assert lazy_client.server == "http://127.0.0.1:9"
    assert "127.0.0.1:9" in repr(lazy_client)


def test_the_client_falls_back_to_the_environment(settings, monkeypatch, server):
    del settings.DOLORES_SERVER
    del settings.DOLORES_API_KEY
    monkeypatch.setenv("DOLORES_SERVER", server.url)
    monkeypatch.setenv("DOLORES_API_KEY", API_KEY)
    settings.DOLORES_TIMEOUT = 3  # any DOLORES_* change makes a new client
    assert lazy_client.server == server.url and lazy_client.api_key == API_KEY
    assert lazy_client.update(":env", 1)


# ---- update_on_commit ----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_update_on_commit_publishes_after_the_commit_only(backend, server, uid, track):
    backend.connect(uid, track)
    with backend.listen(uid) as events:
        with transaction.atomic():
            note = Note.objects.create(text="saved")
            update_on_commit(track, {"note": note.pk, "change": "created"})
            queue = server.get_json(f"/poll/{uid}", params={"timeout": "0.5"})
            assert queue["events"] == [], "nothing before the commit"
        event = next(events)
        assert (event.track, event.message) == (track, {"note": note.pk, "change": "created"})

        with pytest.raises(RuntimeError):
            with transaction.atomic():
                Note.objects.create(text="rolled back")
                update_on_commit(track, "never published")
                raise RuntimeError("roll back")
        update_on_commit(track, "outside a transaction: at once")
        assert next(events).message == "outside a transaction: at once"


@pytest.mark.django_db(transaction=True)
def test_update_on_commit_copies_the_message_and_checks_it_is_json(backend, uid, track):
    backend.connect(uid, track)
    with backend.listen(uid) as events:
        with transaction.atomic():
            message = {"list": [1]}
            update_on_commit(track, message)
            message["list"].append(2)
        assert next(events).message == {"list": [1]}
    with pytest.raises(TypeError):
        update_on_commit(track, {"not": object()})


@pytest.mark.django_db(transaction=True)
def test_a_publish_that_fails_after_the_commit_is_logged_not_raised(settings, caplog):
    settings.DOLORES_SERVER = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.ERROR, logger="dolores.django"):
        with transaction.atomic():
            Note.objects.create(text="committed anyway")
            update_on_commit(":data", "lost")
    assert Note.objects.filter(text="committed anyway").exists()
    assert "could not publish" in caplog.text and "unreachable" in caplog.text


# ---- the recorder, for apps' own tests -------------------------------------------------


@pytest.mark.django_db
def test_record_updates_records_instead_of_publishing(
    browser, backend, server, django_capture_on_commit_callbacks, uid
):
    with record_updates() as recorded:
        with django_capture_on_commit_callbacks(execute=True):
            with transaction.atomic():
                Note.objects.create(text="x")
                update_on_commit(":notes", {"note": 1})
                update_on_commit(":other", "two")
        lazy_client.update(":notes", "direct")
        assert lazy_client.update_many([(":notes", 3)]) == ["4"]
        assert recorded.updates == [(":notes", {"note": 1}), (":other", "two"), (":notes", "direct"), (":notes", 3)]
        assert recorded.messages(":notes") == [{"note": 1}, "direct", 3]

        # The views use it too: apps can test their pages' subscriptions offline.
        assert post(browser, "/:connect/:notes", {"uid": uid}).json() == {"uid": uid, "tracks": [":notes"]}
        assert post(browser, "/:disconnect/:notes", {"uid": uid}).json() == {"uid": uid, "tracks": []}
        assert recorded.connects == [(uid, ":notes")] and recorded.disconnects == [(uid, ":notes")]
        token = post(browser, "/:token", {"uid": uid}).json()["token"]
        assert token.count(".") == 2 and recorded.tokens == [(uid, None)]

        with pytest.raises(DoloresError) as caught:
            lazy_client.update("bad track", 1)
        assert caught.value.code == "bad_track"
        recorded.clear()
        assert recorded.updates == []

    with pytest.raises(DoloresError):
        backend.listener(uid)  # nothing reached the server
    assert not isinstance(get_client(), type(recorded))


@pytest.mark.django_db
def test_a_rolled_back_transaction_records_nothing(django_capture_on_commit_callbacks):
    with record_updates() as recorded:
        with django_capture_on_commit_callbacks(execute=True):
            try:
                with transaction.atomic():
                    update_on_commit(":notes", 1)
                    raise ValueError
            except ValueError:
                pass
    assert recorded.updates == []


# ---- system checks ---------------------------------------------------------------------


def ids(**kwargs) -> list:
    return sorted(m.id for m in checks.run_checks(tags=["dolores"]) if m.id.startswith("dolores."))


def test_checks_pass_when_everything_is_set(settings):
    settings.DEBUG = False
    assert ids() == []


def test_checks_say_which_setting_is_missing(settings, monkeypatch):
    del settings.DOLORES_SERVER
    del settings.DOLORES_API_KEY
    messages = {m.id: m for m in checks.run_checks(tags=["dolores"])}
    assert "DOLORES_SERVER" in messages["dolores.E001"].msg
    assert "DOLORES_API_KEY" in messages["dolores.E002"].msg
    assert messages["dolores.E001"].level == checks.ERROR
    # The environment counts, as it does for the client.
    monkeypatch.setenv("DOLORES_SERVER", "http://127.0.0.1:8007")
    monkeypatch.setenv("DOLORES_API_KEY", "k")
    assert ids() == []


def test_checks_catch_wrong_values(settings):
    settings.DOLORES_SERVER = "127.0.0.1:8007"
    settings.DOLORES_AUTHORIZE = "django_project.rules.no_such_function"
    assert ids() == ["dolores.E003", "dolores.E004"]
    settings.DOLORES_AUTHORIZE = "django_project.rules.NOT_A_FUNCTION"
    assert "dolores.E004" in ids()


def test_checks_warn_without_a_hook_outside_debug(settings):
    del settings.DOLORES_AUTHORIZE
    settings.DEBUG = False
    [warning] = [m for m in checks.run_checks(tags=["dolores"]) if m.id == "dolores.W001"]
    assert warning.level == checks.WARNING and "DOLORES_AUTHORIZE" in warning.msg
    settings.DEBUG = True
    assert ids() == []


def test_checks_warn_without_csrf_middleware(settings):
    settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if "csrf" not in m]
    assert ids() == ["dolores.W002"]
