-- Retention (metering.retention): how far each table has been pruned.
--
-- `pruned_before` only moves forward. Rows older than it may be gone, so usage for a run
-- completed before it cannot be checked against the primary key any more and is refused rather
-- than counted a second time. SQLite has one writer at a time and batches take the write lock
-- first (BEGIN IMMEDIATE), so a batch's read of the horizon and its inserts are never split by a
-- prune. Timestamps are RFC 3339 text, as the ledger writes them.
CREATE TABLE ledger_horizons (
    tbl           TEXT PRIMARY KEY,
    pruned_before TIMESTAMPTZ NOT NULL
);
INSERT INTO ledger_horizons (tbl, pruned_before) VALUES
    ('usage_runs', '1970-01-01T00:00:00+00:00'),
    ('run_events', '1970-01-01T00:00:00+00:00');

-- The prune deletes run events by time.
CREATE INDEX run_events_at ON run_events (at);
