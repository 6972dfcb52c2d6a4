from django.db import models


class Contact(models.Model):
    """Someone who answered the invitation."""

    ATTENDING = [("yes", "Yes"), ("maybe", "Maybe"), ("no", "No")]

    name = models.CharField(max_length=100)
    email = models.EmailField(blank=True)
    attending = models.CharField(max_length=5, choices=ATTENDING, default="yes")
    guests = models.PositiveSmallIntegerField(default=0)
    # Grows with every change: a page that gets two answers for one contact out of
    # order keeps the newer one.
    version = models.PositiveIntegerField(default=1, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.name

    def to_json(self) -> dict:
        return {
            "id": self.pk,
            "name": self.name,
            "email": self.email,
            "attending": self.attending,
            "guests": self.guests,
            "version": self.version,
            "updated_at": self.updated_at.isoformat(),
        }


class Viewer(models.Model):
    """A page viewing the list right now, as Dolores' webhooks say (presence.py): its
    listener came online and has not gone offline."""

    uid = models.CharField(max_length=128, primary_key=True)
    since = models.DateTimeField(auto_now_add=True)
