"""Who is here: how many people are viewing the list right now, live on every page.

Dolores POSTs a webhook when a page's listener comes online (its stream opened) and
when it goes offline (its stream closed and did not come back within the server's
grace, so a reload is neither); ``dolores.django`` checks the signature and sends the
signals below. On each, the app asks Dolores how many of the track's listeners are
online — the count is Dolores', so it stays right across restarts and lost events —
and publishes ``{"here": n}`` on the track; every open page shows "n people here".
"""

import threading

from django.dispatch import receiver
from dolores.django import client, listener_offline, listener_online

from .views import TRACK

# Read and publish under one lock, so two events handled at once cannot publish their
# counts in the other order (the page keeps the last one). One process, as here; a
# site with several would publish from a single worker or a queue.
_lock = threading.Lock()


@receiver(listener_online, dispatch_uid="rsvp.here.online")
@receiver(listener_offline, dispatch_uid="rsvp.here.offline")
def viewers_changed(sender, **kwargs):
    # An error (Dolores away) answers the webhook 500: Dolores sends it again later.
    with _lock:
        here = client.track(TRACK)["online"]
        client.update(TRACK, {"here": here})
