"""Settings of the Django project the dolores.django tests run in. The DOLORES_* settings
point at the real server by the tests' fixtures (see test_django.py)."""

SECRET_KEY = "dolores-django-tests"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "dolores.django",
    "django_project",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
ROOT_URLCONF = "django_project.urls"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

DOLORES_SERVER = "http://127.0.0.1:9"  # replaced by the tests' fixtures
DOLORES_API_KEY = "set-by-the-tests"
DOLORES_AUTHORIZE = "django_project.rules.may_listen"
