"""Who may listen to what (DOLORES_AUTHORIZE): every visitor may follow the RSVP list,
and nothing else."""

from .views import TRACK


def may_listen(request, uid, track):
    return track == TRACK
