"""Settings of the bench project, from the environment (the driver sets them).

DATABASE_URL         the project's database, which is also the ``django://`` broker's
                     (default: PostgreSQL database ``dtq_bench`` on 127.0.0.1)
TASKS_Q_BROKER_URL   django-tasks-q's broker (default ``django://``)

Everything else is django-tasks-q's default (RESULTS "errors": successes are not stored).
"""
import common
import environ

env = environ.Env()

SECRET_KEY = "bench-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["127.0.0.1"]
INSTALLED_APPS = ["django_tasks_q", "dtqbench"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {"default": env.db("DATABASE_URL", default=common.PG_DATABASE_URL)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # As the example project recommends for a web process and workers sharing one file.
    DATABASES["default"].setdefault("OPTIONS", {}).update({
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    })
else:
    common.require_loopback(env.str("DATABASE_URL", default=common.PG_DATABASE_URL))

TASKS_Q = {
    "BROKER_URL": common.require_loopback(env.str("TASKS_Q_BROKER_URL", default="django://")),
    "QUEUES": [common.DTQ_QUEUE],
    "DEFAULT_QUEUE": common.DTQ_QUEUE,
}

LOGGING = {"version": 1, "disable_existing_loggers": False, "root": {"level": "WARNING"}}
