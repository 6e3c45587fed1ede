"""Fault injection: real workers, children and brokers killed mid-stream, counted by a ledger."""
