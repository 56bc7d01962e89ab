-- One live name per user, enforced by the store: names already duplicated among a user's live
-- environments are resolved first (the oldest keeps its name, later ones become `name-2`,
-- `name-3`, ... or, where that name is already someone's, `name-<id prefix>`; each rename is
-- recorded as an event), then a partial unique index makes a second live environment with the
-- same name impossible, whatever races above it.
CREATE TEMPORARY TABLE environment_renames AS
SELECT id, old_name,
       CASE WHEN EXISTS (
                SELECT 1 FROM environments taken
                WHERE taken.user_id = ranked.user_id
                  AND taken.name = ranked.old_name || '-' || ranked.rn
                  AND taken.status <> 'terminated')
            THEN old_name || '-' || substr(id, 1, 8)
            ELSE old_name || '-' || rn
       END AS new_name
FROM (
    SELECT id, user_id, name AS old_name,
           ROW_NUMBER() OVER (PARTITION BY user_id, name ORDER BY created_at, id) AS rn
    FROM environments
    WHERE status <> 'terminated'
) AS ranked
WHERE rn > 1;

UPDATE environments
SET name = (SELECT new_name FROM environment_renames r WHERE r.id = environments.id)
WHERE id IN (SELECT id FROM environment_renames);

INSERT INTO environment_events (environment_id, occurred_at, kind, level, source, message)
SELECT id, (now() AT TIME ZONE 'utc'), 'info', 'warning', 'server',
       'Renamed from ''' || old_name || ''' to ''' || new_name || ''': names are unique per user'
FROM environment_renames;

DROP TABLE environment_renames;

CREATE UNIQUE INDEX environments_user_live_name ON environments(user_id, name)
WHERE status <> 'terminated';

-- Status events carry the progress they were recorded at, so the history has the live shape.
ALTER TABLE environment_events ADD COLUMN progress INTEGER;

-- Metrics samples, written by the environment's sampler and read by any node's front end.
CREATE TABLE environment_metrics (
    id BIGSERIAL PRIMARY KEY,
    environment_id TEXT NOT NULL REFERENCES environments(id) ON DELETE CASCADE,
    sampled_at TIMESTAMP NOT NULL,
    cpu_usage DOUBLE PRECISION NOT NULL,      -- percent busy over the sampling second
    memory_usage DOUBLE PRECISION NOT NULL,   -- percent in use
    disk_usage DOUBLE PRECISION NOT NULL,     -- percent in use
    network_in BIGINT NOT NULL,               -- bytes received since boot
    network_out BIGINT NOT NULL,              -- bytes sent since boot
    uptime BIGINT NOT NULL                    -- seconds since boot
);
CREATE INDEX environment_metrics_env ON environment_metrics(environment_id, sampled_at);
