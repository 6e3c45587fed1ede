"""Settings of the fault-injection workers: the example project plus the ledger app.

Workers and the producer helper are started with ``DJANGO_SETTINGS_MODULE=tests.fault.settings``;
everything else (database, broker, broker options) still comes from the environment. The app
has no models, so a database migrated with the example project's settings serves as it is.
"""

from testproject.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "tests.fault.ledgerapp"]  # noqa: F405
