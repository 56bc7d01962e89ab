-- Cluster-wide presence (issue 11, items 6 and 8): rows that live as long as something on a node
-- does, so every node can see and count them. Both tables hang off the nodes table: a node that
-- leaves, restarts (its row is written again on join) or is pruned as long dead takes its rows with
-- it. Readers ignore rows of nodes whose heartbeat is older than cluster.dead_after_seconds. Not
-- copied by migrate-store (ephemeral per node).

-- One row per live terminal: written when it starts, updated on attach, detach and resize (never
-- per keystroke), deleted when it ends.
CREATE TABLE terminals (
    id TEXT PRIMARY KEY NOT NULL,               -- the terminal id clients resume with
    node_id TEXT NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
    environment_id TEXT NOT NULL REFERENCES environments(id) ON DELETE CASCADE,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    session_id TEXT NOT NULL,                   -- the login session that holds it
    tmux_session TEXT NOT NULL,                 -- the tmux session its PTY attaches to
    cols INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    attached BOOLEAN NOT NULL,                  -- a WebSocket holds it (else within its grace period)
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE INDEX terminals_environment ON terminals(environment_id);
CREATE INDEX terminals_session ON terminals(session_id);
CREATE INDEX terminals_node ON terminals(node_id);

-- One row per open WebSocket (terminals.max_connections_per_user counts them over every live node).
CREATE TABLE connection_slots (
    id TEXT PRIMARY KEY NOT NULL,
    node_id TEXT NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,                         -- 'terminal' | 'logs' | 'events'
    opened_at TIMESTAMP NOT NULL
);
CREATE INDEX connection_slots_user ON connection_slots(user_id);
CREATE INDEX connection_slots_node ON connection_slots(node_id);
