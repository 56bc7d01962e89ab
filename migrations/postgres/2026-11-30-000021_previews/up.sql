-- Port previews (issue 13): the visibility an owner chose for a port of an environment (no row =
-- private), and the one-time codes and cookies that let the owner's browser in, each tied to the
-- login session that asked for it (logout or revocation of that session ends it).
CREATE TABLE preview_ports (
    environment_id TEXT NOT NULL REFERENCES environments(id) ON DELETE CASCADE,
    port INTEGER NOT NULL,                      -- 1-65535
    visibility TEXT NOT NULL,                   -- 'private' | 'public'
    updated_at TIMESTAMP NOT NULL,
    PRIMARY KEY (environment_id, port)
);

CREATE TABLE preview_grants (
    token_hash TEXT PRIMARY KEY NOT NULL,       -- SHA-256 (hex) of the code or cookie value; never the value
    kind TEXT NOT NULL,                         -- 'code' (one-time, short-lived) | 'cookie'
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    user_id TEXT NOT NULL,
    environment_id TEXT NOT NULL REFERENCES environments(id) ON DELETE CASCADE,
    port INTEGER NOT NULL,
    expires_at TIMESTAMP NOT NULL,
    created_at TIMESTAMP NOT NULL
);
CREATE INDEX preview_grants_expires ON preview_grants(expires_at);
CREATE INDEX preview_grants_session ON preview_grants(session_id);
