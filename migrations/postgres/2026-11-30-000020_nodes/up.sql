-- The nodes of a cluster (several `devpocket serve` processes on one PostgreSQL database; on SQLite
-- there is only ever one). Each process registers on start, heartbeats, and removes its row on a
-- graceful shutdown; a node whose heartbeat is older than cluster.dead_after_seconds is dead.
CREATE TABLE nodes (
    id TEXT PRIMARY KEY NOT NULL,               -- stable per data dir (<data_dir>/node.id)
    address TEXT NOT NULL,                      -- for humans: cluster.address, or <hostname>/<bind>
    provider TEXT NOT NULL,                     -- provider.kind: a local-provider node never shares the database
    version TEXT NOT NULL,                      -- the server's version
    started_at TIMESTAMP NOT NULL,
    heartbeat_at TIMESTAMP NOT NULL,
    draining BOOLEAN NOT NULL DEFAULT FALSE,    -- set when a graceful shutdown begins
    jwt_keys TEXT NOT NULL,                     -- fingerprints (SHA-256, never the keys) of the access-token keys, space-separated, current first
    seal_keys TEXT NOT NULL                     -- fingerprints of the sealing keys, likewise
);
CREATE INDEX nodes_heartbeat ON nodes(heartbeat_at);
