from django.apps import AppConfig


class ContactsConfig(AppConfig):
    name = "contacts"
    default_auto_field = "django.db.models.AutoField"

    def ready(self):
        # "N people here": the webhooks' signals, connected (see presence.py).
        from . import presence  # noqa: F401
