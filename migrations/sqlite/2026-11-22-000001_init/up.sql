-- Accounts, login sessions, rotating refresh tokens and the audit trail.
CREATE TABLE users (
    id TEXT PRIMARY KEY NOT NULL,
    username TEXT NOT NULL,
    username_key TEXT NOT NULL UNIQUE,          -- lower-cased username: uniqueness ignores case
    email TEXT NOT NULL UNIQUE,                 -- stored lower-cased
    password_hash TEXT,                         -- argon2id PHC string; NULL for Google-only accounts
    full_name TEXT,
    avatar_url TEXT,
    google_id TEXT UNIQUE,
    is_active BOOLEAN NOT NULL DEFAULT 1,
    is_verified BOOLEAN NOT NULL DEFAULT 0,
    subscription_plan TEXT NOT NULL DEFAULT 'free',
    preferred_region TEXT,
    failed_logins INTEGER NOT NULL DEFAULT 0,
    locked_until TIMESTAMP,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    last_login TIMESTAMP
);

CREATE TABLE sessions (
    id TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    user_agent TEXT,
    ip_address TEXT,
    created_at TIMESTAMP NOT NULL,
    last_used_at TIMESTAMP NOT NULL,
    expires_at TIMESTAMP NOT NULL,
    revoked_at TIMESTAMP,
    revoked_reason TEXT
);
CREATE INDEX sessions_user_id ON sessions(user_id);

CREATE TABLE refresh_tokens (
    token_hash TEXT PRIMARY KEY NOT NULL,       -- SHA-256 of the token; the token itself is never stored
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    created_at TIMESTAMP NOT NULL,
    used_at TIMESTAMP                           -- set when rotated; presenting it again is reuse
);
CREATE INDEX refresh_tokens_session_id ON refresh_tokens(session_id);

CREATE TABLE audit_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    occurred_at TIMESTAMP NOT NULL,
    event TEXT NOT NULL,
    user_id TEXT,                               -- no foreign key: the trail outlives deleted accounts
    session_id TEXT,
    ip_address TEXT,
    request_id TEXT,
    detail TEXT                                 -- JSON object
);
CREATE INDEX audit_events_user ON audit_events(user_id, id);
CREATE INDEX audit_events_event ON audit_events(event, id);
