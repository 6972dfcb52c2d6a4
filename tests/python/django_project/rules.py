"""The DOLORES_AUTHORIZE hook of the test project: records every question; says no to
tracks under ":secret", and to "rooms/…" unless the request carries X-Room-Member."""

from django.core.exceptions import PermissionDenied

asked: list = []


def may_listen(request, uid, track):
    asked.append((request.path, uid, track))
    if track.startswith(":secret"):
        return False
    if track.startswith(":forbidden"):
        raise PermissionDenied("no")
    if track.startswith("rooms/"):
        return request.headers.get("X-Room-Member") == "yes"
    return True


def not_callable():
    pass


NOT_A_FUNCTION = 42
