"""The ledger app: one task, no models (the example project's migrations are all it needs)."""

from django.apps import AppConfig


class LedgerConfig(AppConfig):
    """Registers ``tests.fault.ledgerapp.tasks.work`` in the workers."""

    name = "tests.fault.ledgerapp"
    label = "fault_ledger"
    verbose_name = "Fault-injection ledger"
