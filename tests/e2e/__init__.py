"""End-to-end tests: real ``taskworker`` processes on real brokers and databases."""
