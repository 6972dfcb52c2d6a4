"""For an app's own tests: record what would be published instead of publishing it.

    from dolores.django.testing import record_updates

    class ContactTests(TestCase):
        def test_saving_publishes(self):
            with record_updates() as dolores, self.captureOnCommitCallbacks(execute=True):
                self.client.post("/api/contacts", {"name": "Ada"}, content_type="application/json")
            self.assertEqual(dolores.updates, [(":rsvp", {"contact": 1, "change": "created"})])

Inside ``record_updates()``, ``dolores.django.client``, ``update_on_commit`` and the
connect/disconnect/token views use the recorder instead of a server. Publishing after a
commit still waits for the commit: in a ``TestCase`` (whose transaction never commits)
run the callbacks with ``captureOnCommitCallbacks(execute=True)`` (pytest-django:
``django_capture_on_commit_callbacks``).
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from .._core import DEFAULT_TOKEN_TTL, DoloresError, check_track, check_uid, encode_body, sign_token, updates_body

__all__ = ["Recorder", "record_updates"]


class Recorder:
    """Stands for the ``Client``: records every call instead of making it.

    ``updates`` lists ``(track, message)`` in publish order; ``connects``,
    ``disconnects`` and ``tokens`` list ``(uid, track)``, ``(uid, track or None)`` and
    ``(uid, tracks)``. Names are checked like the server checks them
    (``DoloresError`` 400), and messages must be JSON.
    """

    def __init__(self, token_secret: Optional[str] = None) -> None:
        self.token_secret = token_secret or "dolores-test-secret"
        self.updates: List[Tuple[str, Any]] = []
        self.connects: List[Tuple[str, str]] = []
        self.disconnects: List[Tuple[str, Optional[str]]] = []
        self.tokens: List[Tuple[str, Optional[List[str]]]] = []
        self._tracks: Dict[str, List[str]] = {}
        self._keys: Dict[str, List[str]] = {}
        self._lock = threading.Lock()

    def messages(self, track: str) -> List[Any]:
        """The messages published to ``track``, in order."""
        return [message for t, message in self.updates if t == track]

    def clear(self) -> None:
        with self._lock:
            self.updates.clear()
            self.connects.clear()
            self.disconnects.clear()
            self.tokens.clear()
            self._tracks.clear()
            self._keys.clear()

    # The Client's surface.

    def update(self, track: str, message: Any, *, idempotency_key: Optional[str] = None) -> str:
        return self.update_many([(track, message)], idempotency_key=idempotency_key)[0]

    def update_many(self, updates: Iterable[Any], *, idempotency_key: Optional[str] = None) -> List[str]:
        items = updates_body(updates)
        for item in items:
            check_track(item["track"])
        with self._lock:
            # As the server: a key sent again answers the first ids and stores nothing.
            if idempotency_key is not None and idempotency_key in self._keys:
                return list(self._keys[idempotency_key])
            ids = []
            for item in items:
                self.updates.append((item["track"], json.loads(encode_body(item["message"]))))
                ids.append(str(len(self.updates)))
            if idempotency_key is not None:
                self._keys[idempotency_key] = ids
            return ids

    def connect(self, uid: str, track: str) -> List[str]:
        check_uid(uid)
        check_track(track)
        with self._lock:
            self.connects.append((uid, track))
            tracks = self._tracks.setdefault(uid, [])
            if track not in tracks:
                tracks.append(track)
            return sorted(tracks)

    def disconnect(self, uid: str, track: Optional[str] = None) -> List[str]:
        check_uid(uid)
        if track is not None:
            check_track(track)
        with self._lock:
            self.disconnects.append((uid, track))
            if uid not in self._tracks:
                raise DoloresError(404, "unknown_listener", "no such listener: connect it to a track first")
            if track is None:
                del self._tracks[uid]
                return []
            tracks = self._tracks[uid]
            if track in tracks:
                tracks.remove(track)
            return sorted(tracks)

    def token(self, uid: str, tracks: Optional[Iterable[str]] = None, ttl: int = DEFAULT_TOKEN_TTL) -> str:
        listed = None if tracks is None else list(tracks)
        signed = sign_token(self.token_secret, uid, listed, ttl)
        with self._lock:
            self.tokens.append((uid, listed))
        return signed

    def listen(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("record_updates() records what is published; it has nothing to listen to")

    def close(self) -> None:
        pass


@contextlib.contextmanager
def record_updates(token_secret: Optional[str] = None) -> Iterator[Recorder]:
    """Within the block, Dolores calls made through ``dolores.django`` are recorded,
    not sent. Yields the ``Recorder``. Nests (the inner one wins)."""
    from django.conf import settings

    import dolores.django as app

    recorder = Recorder(token_secret or getattr(settings, "DOLORES_TOKEN_SECRET", None))
    previous = app._override
    app._override = recorder
    try:
        yield recorder
    finally:
        app._override = previous
