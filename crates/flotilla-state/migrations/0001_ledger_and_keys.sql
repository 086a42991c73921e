-- Portable between SQLite and PostgreSQL: TEXT, BIGINT, DOUBLE PRECISION only. Booleans are
-- BIGINT 0/1 and a key's revocation is its revoked_ms, so that sqlx's Any driver decodes every
-- column the same way on both backends. NULL means unknown (a cost is never stored as 0 for
-- "don't know").

CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    prefix        TEXT NOT NULL,
    -- SHA-256 hex of the secret; the secret itself is never stored.
    secret_sha256 TEXT NOT NULL UNIQUE,
    created_ms    BIGINT NOT NULL,
    budget_usd    DOUBLE PRECISION,
    -- Kept equal to the sum of this key's ledger costs: the ledger writer adds to it in the
    -- transaction that inserts the rows.
    spent_usd     DOUBLE PRECISION NOT NULL DEFAULT 0,
    rpm           BIGINT,
    tpm           BIGINT,
    admin         BIGINT NOT NULL DEFAULT 0,
    revoked_ms    BIGINT
);

CREATE TABLE requests (
    request_id            TEXT PRIMARY KEY,
    ts_ms                 BIGINT NOT NULL,
    api_key_id            TEXT,
    model                 TEXT NOT NULL,
    endpoint              TEXT NOT NULL,
    stream                BIGINT NOT NULL,
    priority              TEXT NOT NULL,
    ttft_deadline_ms      BIGINT,
    deadline_ms           BIGINT,
    strategy              TEXT,
    reason_code           TEXT,
    reason                TEXT,
    final_target          TEXT,
    status                TEXT NOT NULL,
    http_status           BIGINT NOT NULL,
    error                 TEXT,
    ttft_ms               BIGINT,
    latency_ms            BIGINT NOT NULL,
    prompt_tokens         BIGINT,
    completion_tokens     BIGINT,
    cached_tokens         BIGINT,
    our_prompt_tokens     BIGINT,
    our_completion_tokens BIGINT,
    usage_estimated       BIGINT NOT NULL,
    cost_usd              DOUBLE PRECISION,
    baseline_cost_usd     DOUBLE PRECISION,
    gpu_seconds           DOUBLE PRECISION
);

-- (ts_ms, request_id) serves both time ranges and the keyset pagination order.
CREATE INDEX requests_ts_ms ON requests (ts_ms, request_id);
CREATE INDEX requests_api_key_id ON requests (api_key_id);
CREATE INDEX requests_model ON requests (model);
CREATE INDEX requests_final_target ON requests (final_target);
CREATE INDEX requests_status ON requests (status);

CREATE TABLE request_attempts (
    request_id  TEXT NOT NULL REFERENCES requests (request_id) ON DELETE CASCADE,
    n           BIGINT NOT NULL,
    target      TEXT NOT NULL,
    started_ms  BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    outcome     TEXT NOT NULL,
    http_status BIGINT,
    error       TEXT,
    PRIMARY KEY (request_id, n)
);
