-- Retention (metering.retention): how far each table has been pruned.
--
-- `pruned_before` only moves forward. Rows older than it may be gone, so usage for a run
-- completed before it cannot be checked against the primary key any more and is refused rather
-- than counted a second time. The rows exist from the start so a batch can lock its table's row
-- (SELECT ... FOR SHARE) before the first prune ever runs: the prune's UPDATE then waits for
-- every batch that read the old horizon, and only deletes after they committed.
CREATE TABLE ledger_horizons (
    tbl           TEXT PRIMARY KEY,
    pruned_before TIMESTAMPTZ NOT NULL
);
INSERT INTO ledger_horizons (tbl, pruned_before) VALUES
    ('usage_runs', TIMESTAMPTZ '1970-01-01 00:00:00+00'),
    ('run_events', TIMESTAMPTZ '1970-01-01 00:00:00+00');
