#!/usr/bin/env python
"""manage.py of the bench Django project (``dtqbench``); runs this checkout's django_tasks_q."""
import os
import sys

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]  # bench/ (common, dtqbench) and the repository
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dtqbench.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
