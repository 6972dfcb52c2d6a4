"""The page and the JSON API of the contacts. Every change is published to the track
":rsvp" as {"contact": id, "change": "created" | "updated" | "deleted"} once its
transaction commits; open pages then refetch that contact from this API. (The track
also carries {"here": n}, from presence.py.)"""

import json

from django import forms
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.forms.models import model_to_dict
from django.http import HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie
from dolores.django import update_on_commit

from .models import Contact

TRACK = ":rsvp"
FIELDS = ["name", "email", "attending", "guests"]


class ContactForm(forms.ModelForm):
    guests = forms.IntegerField(min_value=0, max_value=20, required=False)

    class Meta:
        model = Contact
        fields = FIELDS

    def clean_name(self):
        name = self.cleaned_data["name"].strip()
        if not name:
            raise forms.ValidationError("A name is needed.")
        return name

    def clean_guests(self):
        return self.cleaned_data.get("guests") or 0


def error(status, code, message, **extra):
    return JsonResponse({"error": {"code": code, "message": message, **extra}}, status=status)


def not_allowed(allowed):
    response = error(405, "method_not_allowed", f"use {', '.join(allowed)}")
    response["Allow"] = ", ".join(allowed)
    return response


def read_json(request):
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def invalid(form):
    fields = {name: [str(e) for e in errors] for name, errors in form.errors.items()}
    first = next(iter(fields.values()))[0]
    return error(400, "invalid", first, fields=fields)


@ensure_csrf_cookie
def index(request):
    """The page. It sets the csrftoken cookie, which the page's requests (and the
    Dolores client's connect call) send back as X-CSRFToken."""
    return render(
        request,
        "contacts/index.html",
        {
            "dolores_public_url": settings.DOLORES_PUBLIC_URL,
            "config": {"doloresUrl": settings.DOLORES_PUBLIC_URL, "track": TRACK},
        },
    )


def contacts(request):
    """GET: every contact. POST {"name", "email", "attending", "guests"}: a new one."""
    if request.method == "GET":
        return JsonResponse({"contacts": [c.to_json() for c in Contact.objects.all()]})
    if request.method != "POST":
        return not_allowed(["GET", "POST"])
    body = read_json(request)
    if body is None:
        return error(400, "bad_json", "send a JSON object")
    defaults = {name: Contact._meta.get_field(name).get_default() for name in FIELDS}
    form = ContactForm(data={**defaults, **body})
    if not form.is_valid():
        return invalid(form)
    with transaction.atomic():
        contact = form.save()
        update_on_commit(TRACK, {"contact": contact.pk, "change": "created"})
    return JsonResponse(contact.to_json(), status=201)


def contact(request, pk):
    """GET one contact; PUT/PATCH some of its fields; DELETE it."""
    if request.method not in ("GET", "PUT", "PATCH", "DELETE"):
        return not_allowed(["GET", "PUT", "PATCH", "DELETE"])
    found = Contact.objects.filter(pk=pk).first()
    if found is None:
        return error(404, "not_found", f"there is no contact {pk}")
    if request.method == "GET":
        return JsonResponse(found.to_json())
    if request.method == "DELETE":
        with transaction.atomic():
            found.delete()
            update_on_commit(TRACK, {"contact": pk, "change": "deleted"})
        return HttpResponse(status=204)
    body = read_json(request)
    if body is None:
        return error(400, "bad_json", "send a JSON object")
    data = {**model_to_dict(found, FIELDS), **body}
    form = ContactForm(data=data, instance=found)
    if not form.is_valid():
        return invalid(form)
    with transaction.atomic():
        changed = form.save(commit=False)
        changed.version = F("version") + 1
        changed.save()
        update_on_commit(TRACK, {"contact": pk, "change": "updated"})
    changed.refresh_from_db()
    return JsonResponse(changed.to_json())
