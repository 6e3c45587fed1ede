"""Settings of the example project, read from the environment (or a ``.env`` file beside manage.py).

Every value has a development default, so ``python manage.py demo`` works on a fresh checkout:
SQLite in ``db.sqlite3`` as the database and the embedded ``django://`` broker on that same
database.  Point ``DATABASE_URL`` and ``TASKS_Q_BROKER_URL`` elsewhere for anything else, e.g.::

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/test
    TASKS_Q_BROKER_URL=redis://127.0.0.1:6379/0
"""

from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env")

SECRET_KEY = env.str("SECRET_KEY", default="django-insecure-example-project-only")
DEBUG = env.bool("DEBUG", default=True)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])

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
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "testproject.urls"
WSGI_APPLICATION = "testproject.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web process and the worker write to one SQLite file: take the write lock when a
    # transaction begins and wait for it, rather than failing with "database is locked".
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

TASKS_Q = {
    "BROKER_URL": env.str("TASKS_Q_BROKER_URL", default="django://"),
    # JSON, e.g. TASKS_Q_BROKER_OPTIONS='{"visibility_timeout": 300}'
    "BROKER_OPTIONS": env.json("TASKS_Q_BROKER_OPTIONS", default={}),
    # Sent by `manage.py taskbeat` (or `taskworker -B`, as `manage.py demo` runs it).
    "BEAT_SCHEDULE": {
        "sales-report": {"task": "testproject.testapp.tasks.sales_report", "schedule": 60,
                         "description": "Totals of the orders so far, every minute."},
    },
    # Run by every taskworker (docs/extending.rst); the app's ready() registers another one.
    "WORKER_EXTENSIONS": ["testproject.testapp.extensions.OrderFeed"],
    # Any other TASKS_Q key, as JSON, e.g. TASKS_Q_EXTRA='{"RESULTS": "all"}'
    **env.json("TASKS_Q_EXTRA", default={}),
}

# Django's own tasks framework (Django 6.0 and newer; 5.2 ignores this setting) on the same
# workers: see testapp/django_tasks.py. Without a QUEUES list, the backends take TASKS_Q's queues.
TASKS = {
    "default": {
        "BACKEND": "django_tasks_q.backend.TasksQBackend",
        # Every result is kept, so Task.get_result() and TaskResult.refresh() find them.
        "OPTIONS": {"results": "all"},
    },
    # Our options for every task of this alias (@task(backend="retrying")); on Django 6.1 a
    # task can also take them as @task() arguments.
    "retrying": {
        "BACKEND": "django_tasks_q.backend.TasksQBackend",
        "OPTIONS": {"results": "all", "autoretry_for": (ConnectionError,), "max_retries": 3,
                    "default_retry_delay": 0},
    },
}

# Receipts are printed by the worker unless EMAIL_BACKEND says otherwise.
EMAIL_BACKEND = env.str("EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend")
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="shop@example.com")

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "static"
