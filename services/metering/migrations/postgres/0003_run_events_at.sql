-- no-transaction
-- The retention prune deletes run events by time. Built CONCURRENTLY (so outside a transaction,
-- and alone in its file): on an existing large ledger the build takes a while, and metering keeps
-- writing run events meanwhile. Should a build be interrupted, PostgreSQL leaves an invalid
-- index behind that this statement then skips: `DROP INDEX CONCURRENTLY run_events_at` and
-- restart the service to build it again.
CREATE INDEX CONCURRENTLY IF NOT EXISTS run_events_at ON run_events (at);
