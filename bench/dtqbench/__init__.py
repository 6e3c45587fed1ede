"""The bench Django project: settings from the environment and the one benchmark task."""
