"""Processes: the worker (consumer, pool, children), started by ``manage.py taskworker``."""
