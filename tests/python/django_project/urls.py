from django.urls import include, path

urlpatterns = [
    path("", include("dolores.django.urls")),
    path("push/", include(("dolores.django.urls", "dolores"), namespace="push")),
]
