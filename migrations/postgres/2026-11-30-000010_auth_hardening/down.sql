ALTER TABLE sessions DROP COLUMN successor_sealed;
ALTER TABLE sessions DROP COLUMN rotated_at;
ALTER TABLE sessions DROP COLUMN rotated_from;

ALTER TABLE users ADD COLUMN failed_logins INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN locked_until TIMESTAMP;
-- Accounts at the default threshold (5) keep their lock; lower counters are forgotten.
UPDATE users SET
    failed_logins = (SELECT failures FROM login_attempts WHERE subject = 'user:' || users.id),
    locked_until = (SELECT expires_at FROM login_attempts WHERE subject = 'user:' || users.id)
    WHERE EXISTS (SELECT 1 FROM login_attempts WHERE subject = 'user:' || users.id AND failures >= 5);
DROP TABLE login_attempts;
