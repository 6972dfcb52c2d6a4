from django.urls import path

from . import views

urlpatterns = [
    path("", views.index, name="index"),
    path("api/contacts", views.contacts, name="contacts"),
    path("api/contacts/<int:pk>", views.contact, name="contact"),
]
