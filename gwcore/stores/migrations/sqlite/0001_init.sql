-- Keys, lookup names, the audit log, daily rollups and spend (SQLite).
-- Timestamps are integer microseconds since the Unix epoch (UTC); money is integer
-- pico-dollars (1e-12 USD); latencies are integer microseconds.

CREATE TABLE api_keys (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    key_hash        TEXT NOT NULL UNIQUE,      -- sha256 hex; the key itself is never stored
    prefix          TEXT NOT NULL,
    models          TEXT,                      -- JSON array; NULL: every model
    rpm             INTEGER,
    tpm             INTEGER,
    max_concurrency INTEGER,
    budget_pico     INTEGER,
    expires_at_us   INTEGER,
    metadata        TEXT NOT NULL DEFAULT '{}',
    created_at_us   INTEGER NOT NULL,
    revoked_at_us   INTEGER
);

-- Every repeated string of an audit row (endpoint, model, provider, error code) is
-- stored once here; kind: 1 endpoint, 2 model, 3 provider, 4 error code.
CREATE TABLE names (
    id   INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    name TEXT NOT NULL,
    UNIQUE (kind, name)
);

-- One row per committed batch: a batch whose id is here is never written again.
CREATE TABLE audit_batches (
    id              TEXT PRIMARY KEY,
    records         INTEGER NOT NULL,
    committed_at_us INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE audit_log (
    ts_us             INTEGER NOT NULL,        -- request start
    request_id        TEXT NOT NULL,
    key_id            TEXT,
    user_name         TEXT,
    client_ip         TEXT,
    endpoint_id       INTEGER NOT NULL,        -- names.id
    model_id          INTEGER,                 -- names.id, as requested
    provider_id       INTEGER,                 -- names.id
    upstream_model_id INTEGER,                 -- names.id
    status            INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens     INTEGER NOT NULL,
    reasoning_tokens  INTEGER NOT NULL,
    cost_pico         INTEGER,                 -- NULL: the model has no price
    latency_us        INTEGER NOT NULL,
    ttft_us           INTEGER,
    cache_hit         INTEGER NOT NULL,
    error_code_id     INTEGER                  -- names.id
);
-- Retention deletes by time.
CREATE INDEX audit_log_ts ON audit_log (ts_us);

-- Daily rollups per key and requested model, added to in each batch's transaction.
-- key_id '' : no key (a 401); model_id 0 : no model.
CREATE TABLE usage_daily (
    day               TEXT NOT NULL,           -- YYYY-MM-DD, UTC
    key_id            TEXT NOT NULL,
    model_id          INTEGER NOT NULL,
    requests          INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_pico         INTEGER NOT NULL,
    PRIMARY KEY (day, key_id, model_id)
) WITHOUT ROWID;

-- A key's total spend, so a budget check reads one row.
CREATE TABLE key_spend (
    key_id    TEXT PRIMARY KEY,
    cost_pico INTEGER NOT NULL
) WITHOUT ROWID;
