-- Columns that history filters search in SQL (filled from each request's body by the
-- migration's backfill), votes as rows (one person, one vote, enforced by the key), indexes
-- for filters and pages, the policy in force for every replica, and notification channels'
-- cursors and leases.
ALTER TABLE requests ADD COLUMN hostname TEXT NOT NULL DEFAULT '';
ALTER TABLE requests ADD COLUMN rule TEXT NOT NULL DEFAULT '';
ALTER TABLE requests ADD COLUMN received_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE requests ADD COLUMN decided_ms INTEGER NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX requests_seq ON requests (seq);
-- Pending requests (state 1) are few: partial indexes hold only them, for expiry and the caps.
DROP INDEX IF EXISTS requests_state;
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
    verdict INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (request_id, person)
);
CREATE INDEX votes_approver ON votes (approver, request_id);
ALTER TABLE grants ADD COLUMN created_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE agents ADD COLUMN replica TEXT NOT NULL DEFAULT '';
ALTER TABLE agents ADD COLUMN connected INTEGER NOT NULL DEFAULT 0;
CREATE INDEX audit_request ON audit (request_id, seq);
CREATE INDEX audit_actor ON audit (actor, seq);
CREATE INDEX audit_action ON audit (action, seq);
CREATE INDEX sessions_name ON sessions (name);
CREATE TABLE policies (
    version INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    replica TEXT NOT NULL,
    file_mtime_ms INTEGER NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE TABLE notify_channels (
    name TEXT PRIMARY KEY,
    cursor_seq INTEGER NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    lease_until_ms INTEGER NOT NULL DEFAULT 0
);
