-- The whole schema, as of SQLite's 0002 (PostgreSQL support starts there). Integers are
-- BIGINT and booleans 0/1 so that rows read the same on both backends.
CREATE TABLE requests (
    id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL UNIQUE,
    state BIGINT NOT NULL,
    deadline_ms BIGINT NOT NULL,
    host_id TEXT NOT NULL,
    account TEXT NOT NULL,
    body BYTEA NOT NULL,
    hostname TEXT NOT NULL DEFAULT '',
    rule TEXT NOT NULL DEFAULT '',
    received_ms BIGINT NOT NULL DEFAULT 0,
    decided_ms BIGINT NOT NULL DEFAULT 0
);
-- Pending requests (state 1) are few: partial indexes hold only them, for expiry and the caps.
CREATE INDEX requests_pending ON requests (deadline_ms) WHERE state = 1;
CREATE INDEX requests_pending_host ON requests (host_id) WHERE state = 1;
CREATE INDEX requests_pending_account ON requests (account) WHERE state = 1;
-- History filters, newest first.
CREATE INDEX requests_host ON requests (host_id, seq);
CREATE INDEX requests_account ON requests (account, seq);
CREATE INDEX requests_rule ON requests (rule, seq);
CREATE TABLE votes (
    request_id TEXT NOT NULL,
    person TEXT NOT NULL,
    approver TEXT NOT NULL,
    verdict BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (request_id, person)
);
CREATE INDEX votes_approver ON votes (approver, request_id);
CREATE TABLE grants (
    id TEXT PRIMARY KEY,
    host_id TEXT NOT NULL,
    account TEXT NOT NULL,
    action TEXT NOT NULL,
    body BYTEA NOT NULL,
    expires_ms BIGINT NOT NULL,
    revoked_ms BIGINT,
    created_ms BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX grants_match ON grants (host_id, account, action);
CREATE TABLE agents (
    host_id TEXT PRIMARY KEY,
    body BYTEA NOT NULL,
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    replica TEXT NOT NULL DEFAULT '',
    connected BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    scope TEXT NOT NULL,
    hash TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    revoked_ms BIGINT
);
CREATE TABLE audit (
    seq BIGINT PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    request_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    digest TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_request ON audit (request_id, seq);
CREATE INDEX audit_actor ON audit (actor, seq);
CREATE INDEX audit_action ON audit (action, seq);
CREATE TABLE accounts (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    groups TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE enrollment_tokens (
    id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    host_id TEXT,
    hash TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    used_ms BIGINT,
    used_by TEXT
);
CREATE TABLE deliveries (
    id TEXT NOT NULL,
    channel TEXT NOT NULL,
    event TEXT NOT NULL,
    request_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    ok BIGINT NOT NULL,
    status BIGINT,
    error TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (id, attempt)
);
CREATE INDEX deliveries_at ON deliveries (at_ms);
CREATE TABLE slack_messages (
    request_id TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    ts TEXT NOT NULL,
    posted_ms BIGINT NOT NULL
);
CREATE TABLE sessions (
    id_hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    groups TEXT NOT NULL,
    via TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX sessions_name ON sessions (name);
CREATE TABLE policies (
    version BIGINT PRIMARY KEY,
    source TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    replica TEXT NOT NULL,
    file_mtime_ms BIGINT NOT NULL,
    at_ms BIGINT NOT NULL
);
CREATE TABLE notify_channels (
    name TEXT PRIMARY KEY,
    cursor_seq BIGINT NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    lease_until_ms BIGINT NOT NULL DEFAULT 0
);
