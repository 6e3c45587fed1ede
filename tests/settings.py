"""Settings for the test suite: the example project's apps on a configurable database."""

import environ

env = environ.Env()

SECRET_KEY = "tests-only"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_tasks_q",
    "testproject.testapp",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": [
            "django.template.context_processors.request",
            "django.contrib.auth.context_processors.auth",
            "django.contrib.messages.context_processors.messages",
        ]},
    }
]
ROOT_URLCONF = "testproject.urls"
STATIC_URL = "/static/"
DATABASES = {"default": env.db("DATABASE_URL", default="sqlite:///:memory:")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
TASKS_Q = {"BROKER_URL": "memory://", "QUEUES": ["default", "high", "low"]}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    import os
    import tempfile

    # A file, not memory: the threads pool and the embedded broker use several connections.
    DATABASES["default"]["TEST"] = {
        "NAME": os.path.join(tempfile.gettempdir(), f"dtq-tests-{os.getpid()}.sqlite3")}
    DATABASES["default"].setdefault("OPTIONS", {}).update({"timeout": 20})
