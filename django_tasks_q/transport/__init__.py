"""Adapters: kombu transports shipped with django-tasks-q (the embedded ``django://`` broker)."""
