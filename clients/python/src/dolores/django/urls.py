"""``path("", include("dolores.django.urls"))`` gives:

- ``POST :connect/<track>`` and ``POST :disconnect/<track>`` with ``{"uid"}`` — what the
  browser client's ``connectUrl: "/:connect/"`` and ``disconnectUrl`` call. Tracks may
  hold slashes and colons (``:connect/rooms/42``).
- ``POST :token`` with ``{"uid", "tracks"?}`` — a listener token, for servers with a
  token secret.
- ``POST :webhook`` — where Dolores sends its events (``--webhook-url
  https://app.example/:webhook``): checked, then sent as Django signals
  (``dolores.django.signals``).

Reverse them as ``dolores:connect`` (``args=[track]``), ``dolores:disconnect`` and
``dolores:token``, ``dolores:webhook``.
"""

from django.urls import path

from . import views

app_name = "dolores"

urlpatterns = [
    path(":connect/<path:track>", views.connect, name="connect"),
    path(":disconnect/<path:track>", views.disconnect, name="disconnect"),
    path(":token", views.token, name="token"),
    path(":webhook", views.webhook, name="webhook"),
]
