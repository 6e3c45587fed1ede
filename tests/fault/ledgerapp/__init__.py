"""A test-only app whose task writes its starts and finishes to the crash-safe ledger."""
