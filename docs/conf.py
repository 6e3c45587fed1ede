"""Sphinx configuration for the django-tasks-q manual."""

import configparser
from pathlib import Path

_setup = configparser.ConfigParser()
_setup.read(Path(__file__).resolve().parent.parent / "setup.cfg")

project = "django-tasks-q"
author = "the django-tasks-q authors"
copyright = "the django-tasks-q authors"
release = _setup["metadata"]["version"]
version = ".".join(release.split(".")[:2])

extensions: list[str] = []
templates_path: list[str] = []
exclude_patterns = ["_build"]

root_doc = "index"
highlight_language = "python3"
pygments_style = "sphinx"

html_theme = "alabaster"
html_title = f"django-tasks-q {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "A distributed task queue that is a Django app",
    "fixed_sidebar": True,
}
