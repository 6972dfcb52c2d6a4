from django.urls import include, path

urlpatterns = [
    # POST /:connect/<track> and /:disconnect/<track>, for the page's Dolores client.
    path("", include("dolores.django.urls")),
    path("", include("contacts.urls")),
]
