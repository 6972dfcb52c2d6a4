"""Dolores for Django.

Add ``"dolores.django"`` to ``INSTALLED_APPS``, set ``DOLORES_SERVER``,
``DOLORES_API_KEY`` (and ``DOLORES_TOKEN_SECRET`` when the server has one,
``DOLORES_AUTHORIZE`` to decide who may listen to what), and
``path("", include("dolores.django.urls"))`` for the views browsers call and the
one Dolores' webhooks call (``:webhook``, which sends the signals of
``dolores.django.signals``: ``listener_online``, ``listener_offline``,
``track_occupied``, ``track_vacated``).

>>> from dolores.django import client, update_on_commit
>>> client.update(":data", "contact 42 changed")         # a Client configured from settings
>>> update_on_commit(":data", {"contact": 42, "change": "updated"})  # after the commit
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional, cast

from django.conf import settings
from django.core.signals import setting_changed
from django.db import transaction

from .._core import DoloresError, encode_body
from ..client import Client
from .signals import listener_offline, listener_online, track_occupied, track_vacated

if TYPE_CHECKING:
    from .testing import Recorder

__all__ = [
    "client",
    "get_client",
    "listener_offline",
    "listener_online",
    "setting",
    "track_occupied",
    "track_vacated",
    "update_on_commit",
]

log = logging.getLogger("dolores.django")

#: The settings this app reads, with their defaults. ``None`` for the first three
#: means: from the ``DOLORES_*`` environment variable of the same name.
DEFAULTS = {
    "DOLORES_SERVER": None,
    "DOLORES_API_KEY": None,
    "DOLORES_TOKEN_SECRET": None,
    "DOLORES_AUTHORIZE": None,
    "DOLORES_TIMEOUT": 10.0,
    "DOLORES_TOKEN_TTL": 3600,
    "DOLORES_WEBHOOK_SECRET": None,
}

_lock = threading.Lock()
_client: Optional[Client] = None
#: Set by ``dolores.django.testing.record_updates()``: what ``client`` stands for then.
_override: Optional["Recorder"] = None


def setting(name: str) -> Any:
    """A ``DOLORES_*`` setting, or its default."""
    return getattr(settings, name, DEFAULTS[name])


def get_client() -> Client:
    """The ``Client`` configured from settings, made on first use and shared (it is
    thread-safe and pools its connections). Inside ``record_updates()``, the
    recorder."""
    global _client
    if _override is not None:
        return cast(Client, _override)
    with _lock:
        if _client is None:
            _client = Client(
                setting("DOLORES_SERVER"),
                api_key=setting("DOLORES_API_KEY"),
                token_secret=setting("DOLORES_TOKEN_SECRET"),
                timeout=setting("DOLORES_TIMEOUT"),
            )
        return _client


class _LazyClient:
    """Stands for ``get_client()``: importable before settings are ready, and it
    follows ``override_settings`` and ``record_updates()``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(get_client(), name)

    def __repr__(self) -> str:
        return f"<dolores.django.client for {get_client()!r}>"


#: A ``Client`` configured from settings, made on first use.
client: Client = cast(Client, _LazyClient())


def _reset_client(*, setting: str, **kwargs: Any) -> None:
    global _client
    if setting.startswith("DOLORES_"):
        with _lock:
            old, _client = _client, None
        if old is not None:
            old.close()


setting_changed.connect(_reset_client, dispatch_uid="dolores.django.reset_client")


def update_on_commit(track: str, message: Any, *, using: Optional[str] = None) -> None:
    """Publishes ``message`` to ``track`` once the current database transaction
    commits (at once outside a transaction), and never if it rolls back: browsers are
    told about a change only when refetching it shows it.

    The message is copied now (it must be JSON). A publish that fails after the commit
    cannot undo it: it is logged on the ``dolores.django`` logger, not raised.
    """
    snapshot = json.loads(encode_body(message))
    target = get_client()
    transaction.on_commit(_publisher(target, track, snapshot), using=using)


def _publisher(target: Client, track: str, message: Any) -> Callable[[], None]:
    def publish() -> None:
        try:
            target.update(track, message)
        except DoloresError:
            log.exception("dolores: could not publish to %r after the commit", track)

    return publish
