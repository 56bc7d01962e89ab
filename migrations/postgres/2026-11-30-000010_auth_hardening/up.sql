-- Failed-login counters move out of the users table into a table keyed by account or by login name
-- (so names without an account are counted and locked exactly like accounts), and a session keeps
-- the successor of its latest refresh-token rotation, sealed, for the reuse grace window.
CREATE TABLE login_attempts (
    subject TEXT PRIMARY KEY NOT NULL,          -- 'user:<account id>' or 'name:<SHA-256 of the lower-cased login name>'
    failures INTEGER NOT NULL,                  -- attempts reserved in this window (capped at threshold + 1)
    expires_at TIMESTAMP NOT NULL,              -- when the counter, or the lock, ends; the row is swept after
    updated_at TIMESTAMP NOT NULL
);
CREATE INDEX login_attempts_expires ON login_attempts(expires_at);
CREATE INDEX login_attempts_updated ON login_attempts(updated_at);

-- Locks in force stay in force.
INSERT INTO login_attempts (subject, failures, expires_at, updated_at)
    SELECT 'user:' || id, failed_logins, locked_until, updated_at FROM users WHERE locked_until IS NOT NULL;
ALTER TABLE users DROP COLUMN failed_logins;
ALTER TABLE users DROP COLUMN locked_until;

ALTER TABLE sessions ADD COLUMN rotated_from TEXT;       -- SHA-256 of the refresh token last rotated away
ALTER TABLE sessions ADD COLUMN rotated_at TIMESTAMP;     -- when
ALTER TABLE sessions ADD COLUMN successor_sealed TEXT;    -- sealed {access_token, refresh_token} of that rotation; cleared after the grace window
