"""Python client of Dolores, the realtime push server.

>>> from dolores import Client
>>> client = Client("http://127.0.0.1:8007", api_key="…")   # or from DOLORES_* variables
>>> client.connect("browser-42-abcdef", ":data")             # subscribe a listener
[':data']
>>> client.update(":data", {"contact": 42})                   # publish: returns the event id
'1'
>>> for event in client.listen("browser-42-abcdef"):          # receive, resuming by itself
...     print(event.id, event.track, event.message)

``AsyncClient`` has the same methods, awaitable. Errors raise ``DoloresError`` with
``.status`` and ``.code``. The Django app is ``dolores.django``.
"""

from ._core import DEFAULT_SERVER, VERSION, DoloresError, Event, History, check_track, check_uid, sign_token
from .aio import AsyncClient, AsyncListener
from .client import Client, Listener

__version__ = VERSION

# Shown as dolores.X in tracebacks and reprs: where users import them from.
for _public in (AsyncClient, AsyncListener, Client, DoloresError, Event, History, Listener):
    _public.__module__ = "dolores"
del _public

__all__ = [
    "DEFAULT_SERVER",
    "AsyncClient",
    "AsyncListener",
    "Client",
    "DoloresError",
    "Event",
    "History",
    "Listener",
    "check_track",
    "check_uid",
    "sign_token",
]
