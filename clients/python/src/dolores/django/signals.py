"""The signals the webhook view (``dolores.django.views.webhook``) sends, one per event
Dolores POSTs. Each is sent with ``sender="dolores"`` and keyword arguments:

- ``listener_online`` / ``listener_offline``: ``uid``;
- ``track_occupied`` / ``track_vacated``: ``track``;

and, for all four, ``event_id`` (the same on a redelivery: deduplicate by it),
``time`` (a ``datetime``, when it happened) and ``event`` (the event as sent).

Delivery is at least once, in order per listener. A receiver that raises makes the
view answer 500, and Dolores sends the event again later.

>>> from django.dispatch import receiver
>>> from dolores.django.signals import listener_online
>>> @receiver(listener_online)
... def hello(sender, uid, **kwargs): ...
"""

from django.dispatch import Signal

__all__ = ["listener_online", "listener_offline", "track_occupied", "track_vacated", "BY_TYPE"]

#: A listener's first stream opened (on any node).
listener_online = Signal()
#: A listener's last stream closed, and it did not come back within the grace.
listener_offline = Signal()
#: A track's first subscriber came online.
track_occupied = Signal()
#: A track's last online subscriber went.
track_vacated = Signal()

#: The signal for each event ``type``, and the ``data`` field that names its subject.
BY_TYPE = {
    "listener.online": (listener_online, "uid"),
    "listener.offline": (listener_offline, "uid"),
    "track.occupied": (track_occupied, "track"),
    "track.vacated": (track_vacated, "track"),
}
