"""The engine: validation, per-key locks, idempotency, the durable store, rollback."""
