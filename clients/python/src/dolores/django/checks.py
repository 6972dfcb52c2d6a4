"""System checks (``manage.py check``, and before ``runserver``/``migrate``): which
setting is missing or wrong.

- ``dolores.E001`` ``DOLORES_SERVER`` is not set (in settings or the environment).
- ``dolores.E002`` ``DOLORES_API_KEY`` is not set (in settings or the environment).
- ``dolores.E003`` ``DOLORES_SERVER`` is not an ``http://`` or ``https://`` URL.
- ``dolores.E004`` ``DOLORES_AUTHORIZE`` cannot be imported or is not callable.
- ``dolores.W001`` ``DOLORES_AUTHORIZE`` is not set outside ``DEBUG``: any page may
  subscribe any listener to any track.
- ``dolores.W002`` ``CsrfViewMiddleware`` is not in ``MIDDLEWARE``: the connect views
  take cross-site requests.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence

from django.apps import AppConfig
from django.conf import settings
from django.core import checks

from . import setting


def _configured(name: str) -> Optional[str]:
    value = setting(name)
    if value is None or value == "":
        return os.environ.get(name) or None
    return str(value)


@checks.register("dolores")
def check_settings(app_configs: Optional[Sequence[AppConfig]] = None, **kwargs: Any) -> List[checks.CheckMessage]:
    messages: List[checks.CheckMessage] = []
    server = _configured("DOLORES_SERVER")
    if server is None:
        messages.append(
            checks.Error(
                "DOLORES_SERVER is not set.",
                hint="Set DOLORES_SERVER (in settings or the environment) to the address of the "
                "Dolores server, e.g. 'http://127.0.0.1:8007'.",
                id="dolores.E001",
            )
        )
    elif not (str(server).startswith("http://") or str(server).startswith("https://")):
        messages.append(
            checks.Error(
                f"DOLORES_SERVER is not an http:// or https:// URL: {server!r}.",
                hint="Write it like 'http://127.0.0.1:8007'.",
                id="dolores.E003",
            )
        )
    if _configured("DOLORES_API_KEY") is None:
        messages.append(
            checks.Error(
                "DOLORES_API_KEY is not set.",
                hint="Set DOLORES_API_KEY (in settings or the environment) to the api key the "
                "Dolores server was started with (--api-key, or the one it printed and keeps in "
                "its data dir).",
                id="dolores.E002",
            )
        )
    hook = setting("DOLORES_AUTHORIZE")
    if hook is None or hook == "":
        if not settings.DEBUG:
            messages.append(
                checks.Warning(
                    "DOLORES_AUTHORIZE is not set: the connect views let any page subscribe any listener to any track.",
                    hint="Set DOLORES_AUTHORIZE = 'yourapp.rules.may_listen', a function "
                    "(request, uid, track) -> bool.",
                    id="dolores.W001",
                )
            )
    else:
        from .views import authorize_function

        try:
            authorize_function()
        except (ImportError, TypeError, ValueError) as e:
            messages.append(
                checks.Error(
                    f"DOLORES_AUTHORIZE = {hook!r} cannot be used: {e}",
                    hint="Name a function (request, uid, track) -> bool by its dotted path.",
                    id="dolores.E004",
                )
            )
    middleware = getattr(settings, "MIDDLEWARE", None) or []
    if "django.middleware.csrf.CsrfViewMiddleware" not in middleware:
        messages.append(
            checks.Warning(
                "CsrfViewMiddleware is not in MIDDLEWARE: the Dolores connect views take cross-site requests.",
                hint="Add 'django.middleware.csrf.CsrfViewMiddleware' to MIDDLEWARE.",
                id="dolores.W002",
            )
        )
    return messages
