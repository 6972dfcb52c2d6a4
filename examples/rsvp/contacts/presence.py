"""Who is here: how many people are viewing the list right now, live on every page.

Dolores POSTs a webhook when a page's listener comes online (its stream opened) and
when it goes offline (its stream closed and did not come back within the server's
grace, so a reload is neither); ``dolores.django`` checks the signature and sends the
signals below. The app keeps the listeners that are online (``Viewer``) and publishes
``{"here": n}`` on the track after each change; every open page shows "n people here".

Why the webhooks' word and not a look at who has a stream open at that instant: a page
has moments without one (its first poll ends before its WebSocket opens; a reconnect),
which the webhooks' grace hides and an instant's look does not. Dolores sends a
listener's events in order and at least once, so adding and removing by uid is exact.
"""

import threading

from django.dispatch import receiver
from dolores.django import client, listener_offline, listener_online

from .models import Viewer
from .views import TRACK

# Count and publish under one lock, so two events handled at once cannot publish their
# counts in the other order (the page keeps the last one). One process, as here; a
# site with several would publish from a single worker or a queue.
_lock = threading.Lock()


@receiver(listener_online, dispatch_uid="rsvp.here.online")
def came(sender, uid, **kwargs):
    Viewer.objects.get_or_create(uid=uid)  # a redelivery changes nothing
    _publish()


@receiver(listener_offline, dispatch_uid="rsvp.here.offline")
def went(sender, uid, **kwargs):
    Viewer.objects.filter(uid=uid).delete()
    _publish()


def _publish():
    # An error (Dolores away) answers the webhook 500: Dolores sends it again later.
    with _lock:
        client.update(TRACK, {"here": Viewer.objects.count()})
