-- The metering ledger (PostgreSQL). Credits are integer micro-credits (1 credit = 1 000 000)
-- so sums are exact; they are computed once, when a run is recorded, and never updated.

-- One row per agent run: redelivered usage hits the primary key and is ignored.
CREATE TABLE usage_runs (
    run_id               TEXT PRIMARY KEY,
    idempotency_key      TEXT NOT NULL,
    agent                TEXT NOT NULL,
    agent_version        TEXT,
    model                TEXT NOT NULL,
    input_tokens         BIGINT NOT NULL,
    cached_input_tokens  BIGINT NOT NULL,
    output_tokens        BIGINT NOT NULL,
    tool_calls           BIGINT NOT NULL,
    credits_micro        BIGINT NOT NULL,
    -- No price covered the model on the completion date: credits_micro is 0 and an alert went out.
    price_missing        BOOLEAN NOT NULL,
    -- The price entry used, for audit (NULL when price_missing).
    price_effective_from TEXT,
    latency_ms           BIGINT,
    status               TEXT NOT NULL,
    business_process     TEXT,
    department           TEXT,
    cost_center          TEXT,
    environment          TEXT,
    source_system        TEXT,
    source_event_id      TEXT,
    started_at           TIMESTAMPTZ,
    completed_at         TIMESTAMPTZ NOT NULL,
    recorded_at          TIMESTAMPTZ NOT NULL
);
CREATE INDEX usage_runs_completed_at ON usage_runs (completed_at);
CREATE INDEX usage_runs_agent_completed_at ON usage_runs (agent, completed_at);
CREATE INDEX usage_runs_process_completed_at ON usage_runs (business_process, completed_at);
CREATE INDEX usage_runs_idempotency_key ON usage_runs (idempotency_key);
CREATE INDEX usage_runs_source_event_id ON usage_runs (source_event_id);

-- Run lifecycle events from the runs topic, for audit and `agentbridge runs trace`.
CREATE TABLE run_events (
    -- idempotency_key|stage|attempt|at: the same event delivered again is ignored.
    event_key        TEXT PRIMARY KEY,
    idempotency_key  TEXT NOT NULL,
    run_id           TEXT,
    stage            TEXT NOT NULL,
    at               TIMESTAMPTZ NOT NULL,
    agent            TEXT NOT NULL,
    agent_version    TEXT,
    source_system    TEXT,
    source_event_id  TEXT,
    business_process TEXT,
    reason           TEXT,
    detail           TEXT,
    attempt          BIGINT NOT NULL,
    recorded_at      TIMESTAMPTZ NOT NULL
);
CREATE INDEX run_events_idempotency_key ON run_events (idempotency_key, at);
CREATE INDEX run_events_run_id ON run_events (run_id);
CREATE INDEX run_events_source_event_id ON run_events (source_event_id);

-- Alerts metering published (budget thresholds, pauses, missing prices). The key makes each
-- alert exactly-once: it is claimed here, published, then marked sent.
CREATE TABLE alerts (
    alert_key   TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    budget      TEXT,
    period_key  TEXT,
    threshold   BIGINT,
    payload     TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    sent_at     TIMESTAMPTZ
);
CREATE INDEX alerts_budget_period ON alerts (budget, period_key);

-- Operator releases of a hard cap for one budget period: the cap does not pause again until
-- the next period.
CREATE TABLE budget_releases (
    budget      TEXT NOT NULL,
    period_key  TEXT NOT NULL,
    released_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (budget, period_key)
);

-- Running spend per budget scope and period, maintained in the same transaction as the runs
-- (from newly inserted rows only), so a budget check reads one row instead of summing the
-- period. Kept for every agent and business process, not only configured budgets, so a
-- budget added mid-period starts from the true spend. scope: workspace (name ''), agent,
-- business_process; period: day (key YYYY-MM-DD) or month (YYYY-MM), UTC.
CREATE TABLE spend_totals (
    scope       TEXT NOT NULL,
    name        TEXT NOT NULL,
    period      TEXT NOT NULL,
    period_key  TEXT NOT NULL,
    spent_micro BIGINT NOT NULL,
    runs        BIGINT NOT NULL,
    PRIMARY KEY (scope, name, period, period_key)
);
