"""Settings of the bench project, from the environment (the driver sets them).

DATABASE_URL         the project's database, which is also the ``django://`` broker's
                     (default: PostgreSQL database ``dtq_bench`` on 127.0.0.1)
TASKS_Q_BROKER_URL   django-tasks-q's broker (default ``django://``)
BENCH_DTQ_RESULTS    django-tasks-q's RESULTS, for the ``results-all`` variant (default: unset,
                     i.e. the library's "errors": successes are not stored)
BENCH_APPS           which Django-based systems to load, comma-separated: ``dtq`` (default),
                     ``djtasks`` (django-tasks-db). A worker loads only its own system, so its
                     memory and start-up carry nothing of the other's; the driver, which
                     enqueues to both and empties their tables, loads both.

Everything else is each library's default.
"""
import common
import django
import environ

env = environ.Env()

SECRET_KEY = "bench-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["127.0.0.1"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Django 6 has django.tasks built in; before it, django-tasks-db runs on the backport.
BACKPORT = ["django_tasks"] if django.VERSION < (6,) else []
SYSTEM_APPS = {"dtq": ["django_tasks_q", "dtqbench"], "djtasks": [*BACKPORT, "django_tasks_db"]}
BENCH_APPS = env.list("BENCH_APPS", default=["dtq"])
INSTALLED_APPS = [app for name in BENCH_APPS for app in SYSTEM_APPS[name]]

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
if env.str("BENCH_DTQ_RESULTS", default=""):
    TASKS_Q["RESULTS"] = env.str("BENCH_DTQ_RESULTS")

if "djtasks" in BENCH_APPS:
    TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}

LOGGING = {"version": 1, "disable_existing_loggers": False, "root": {"level": "WARNING"}}
