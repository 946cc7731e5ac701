"""Served state: the store of named layers, idempotency keys, and the change log that
makes changes durable (the embedded journal and snapshots)."""
