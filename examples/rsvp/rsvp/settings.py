"""Settings of the RSVP sample. Everything that differs between machines comes from the
environment (run.sh sets it): where Dolores is, its api key, the database file."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("RSVP_SECRET_KEY", "rsvp-sample-not-secret")
DEBUG = os.environ.get("RSVP_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]", "testserver"]

INSTALLED_APPS = [
    "django.contrib.staticfiles",
    "dolores.django",
    "contacts",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "rsvp.urls"
WSGI_APPLICATION = "rsvp.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("RSVP_DB", str(BASE_DIR / "db.sqlite3")),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = True
STATIC_URL = "static/"

# Dolores. The app talks to DOLORES_SERVER; browsers load the client from, and stream
# from, DOLORES_PUBLIC_URL (the same address here; behind a proxy it may differ).
DOLORES_SERVER = os.environ.get("DOLORES_SERVER", "http://127.0.0.1:8007")
DOLORES_PUBLIC_URL = os.environ.get("DOLORES_PUBLIC_URL", DOLORES_SERVER).rstrip("/")
DOLORES_API_KEY = os.environ.get("DOLORES_API_KEY", "rsvp-dev-key")
DOLORES_AUTHORIZE = "contacts.rules.may_listen"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"dolores": {"handlers": ["console"], "level": "WARNING"}},
}
