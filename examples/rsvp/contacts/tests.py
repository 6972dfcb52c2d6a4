"""The app's own tests: its API, and what it publishes, with no Dolores server running
(dolores.django.testing records what would be published)."""

import json

from django.test import TestCase
from dolores.django.testing import record_updates

from .models import Contact


class ContactsApiTests(TestCase):
    def setUp(self):
        recording = record_updates()
        self.dolores = recording.__enter__()
        self.addCleanup(recording.__exit__, None, None, None)

    def send(self, method, url, body=None):
        # Publishing waits for the commit, which a TestCase never does: run the
        # on-commit callbacks at the end of the request.
        with self.captureOnCommitCallbacks(execute=True):
            return getattr(self.client, method)(
                url, json.dumps(body) if body is not None else None, content_type="application/json"
            )

    def test_create_update_delete_each_publish_one_change(self):
        response = self.send("post", "/api/contacts", {"name": "Ada", "email": "ada@example.com", "guests": 1})
        self.assertEqual(response.status_code, 201)
        created = response.json()
        pk = created["id"]
        self.assertEqual(
            (created["name"], created["attending"], created["guests"], created["version"]), ("Ada", "yes", 1, 1)
        )

        response = self.send("patch", f"/api/contacts/{pk}", {"attending": "maybe"})
        self.assertEqual(response.status_code, 200)
        self.assertEqual((response.json()["attending"], response.json()["version"]), ("maybe", 2))
        self.assertEqual(self.client.get(f"/api/contacts/{pk}").json()["attending"], "maybe")

        self.assertEqual(self.send("delete", f"/api/contacts/{pk}").status_code, 204)
        self.assertEqual(self.client.get(f"/api/contacts/{pk}").status_code, 404)

        self.assertEqual(
            self.dolores.updates,
            [
                (":rsvp", {"contact": pk, "change": "created"}),
                (":rsvp", {"contact": pk, "change": "updated"}),
                (":rsvp", {"contact": pk, "change": "deleted"}),
            ],
        )

    def test_invalid_input_publishes_nothing(self):
        response = self.send("post", "/api/contacts", {"name": "  ", "email": "not an email"})
        self.assertEqual(response.status_code, 400)
        error = response.json()["error"]
        self.assertEqual(error["code"], "invalid")
        self.assertEqual(set(error["fields"]), {"name", "email"})
        contact = Contact.objects.create(name="Grace")
        self.assertEqual(self.send("put", f"/api/contacts/{contact.pk}", {"guests": 99}).status_code, 400)
        self.assertEqual(self.dolores.updates, [])

    def test_the_list_and_the_page(self):
        Contact.objects.create(name="Grace")
        Contact.objects.create(name="Ada")
        names = [c["name"] for c in self.client.get("/api/contacts").json()["contacts"]]
        self.assertEqual(names, ["Grace", "Ada"])
        page = self.client.get("/")
        self.assertContains(page, '/dolores.js"')
        self.assertIn("csrftoken", page.cookies)

    def test_pages_may_listen_to_the_rsvp_track_only(self):
        uid = "page-listener-0001"
        self.assertEqual(self.send("post", "/:connect/:rsvp", {"uid": uid}).json(), {"uid": uid, "tracks": [":rsvp"]})
        self.assertEqual(self.send("post", "/:connect/:admin", {"uid": uid}).status_code, 403)
        self.assertEqual(self.dolores.connects, [(uid, ":rsvp")])


class WhoIsHereTests(TestCase):
    """presence.py: Dolores' webhooks, signed with the api key, keep the count."""

    def setUp(self):
        recording = record_updates()
        self.dolores = recording.__enter__()
        self.addCleanup(recording.__exit__, None, None, None)

    def webhook(self, kind, uid):
        import hashlib
        import hmac
        import time

        from django.conf import settings

        body = json.dumps({"id": f"evt_{kind}_{uid}", "type": kind, "time": "2026-11-28T16:00:00Z", "data": {"uid": uid}})
        t = int(time.time())
        v1 = hmac.new(settings.DOLORES_API_KEY.encode(), f"{t}.{body}".encode(), hashlib.sha256).hexdigest()
        response = self.client.post("/:webhook", body, content_type="application/json", HTTP_DOLORES_SIGNATURE=f"t={t},v1={v1}")
        self.assertEqual(response.status_code, 200, response.content)

    def test_each_coming_and_going_publishes_the_count(self):
        self.webhook("listener.online", "page-one-uid")
        self.webhook("listener.online", "page-two-uid")
        self.webhook("listener.online", "page-two-uid")  # delivered twice: counted once
        self.webhook("listener.offline", "page-one-uid")
        self.assertEqual(
            [message for track, message in self.dolores.updates if track == ":rsvp"],
            [{"here": 1}, {"here": 2}, {"here": 2}, {"here": 1}],
        )
