-- Environment leases (issue 11): an environment's actor runs only on the node named by
-- owner_node, and every write of that actor first checks, in its own transaction, that the lease
-- row still names this node and the epoch it holds (locking the row); a claim by another node
-- bumps the epoch in the same row, so the database orders the two and a write of the old owner
-- is refused (fencing). NULL owner: unowned (an upgraded store, or handed back by a draining
-- node); any live node may claim it. Every environment has one row.
CREATE TABLE environment_leases (
    environment_id TEXT PRIMARY KEY NOT NULL REFERENCES environments(id) ON DELETE CASCADE,
    owner_node TEXT,
    epoch BIGINT NOT NULL
);
CREATE INDEX environment_leases_owner ON environment_leases(owner_node);
INSERT INTO environment_leases (environment_id, owner_node, epoch) SELECT id, NULL, 0 FROM environments;

-- Commands carried to an environment's owner from another node: written by the node the request
-- reached, signalled with NOTIFY, taken at most once by the owner (pending -> running) and never
-- after expires_at, answered in reply (JSON). Rows are kept for an hour after their answer so a
-- caller whose wait ran out can look the outcome up by id.
CREATE TABLE environment_commands (
    id TEXT PRIMARY KEY NOT NULL,
    environment_id TEXT NOT NULL REFERENCES environments(id) ON DELETE CASCADE,
    user_id TEXT NOT NULL,
    target_node TEXT NOT NULL,
    command TEXT NOT NULL,
    state TEXT NOT NULL,
    reply TEXT,
    created_at TIMESTAMP NOT NULL,
    expires_at TIMESTAMP NOT NULL,
    answered_at TIMESTAMP
);
CREATE INDEX environment_commands_target ON environment_commands(target_node, state);
CREATE INDEX environment_commands_environment ON environment_commands(environment_id);
