from django.apps import AppConfig


class DoloresConfig(AppConfig):
    name = "dolores.django"
    label = "dolores"
    verbose_name = "Dolores"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
