-- Environments, their event log (status changes and installation output) and the template catalogue.
CREATE TABLE environments (
    id TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    template TEXT NOT NULL,
    provider TEXT NOT NULL,                     -- local | contabo
    status TEXT NOT NULL,
    status_version BIGINT NOT NULL DEFAULT 0,   -- +1 on every persisted transition
    progress INTEGER NOT NULL DEFAULT 0,        -- 0-100 within the current phase
    phase TEXT,                                 -- error: the phase it failed in; snapshotting: where it returns
    message TEXT,
    error_message TEXT,
    region TEXT NOT NULL,
    size TEXT NOT NULL,
    resources TEXT NOT NULL,                    -- JSON {cpu, memory, storage}
    environment_variables TEXT NOT NULL,        -- JSON object
    display_name TEXT NOT NULL,                 -- devpocket-<id>: how the provider's instance is found again
    operation_id TEXT,                          -- request id of the pending/last create, stored before the call
    create_attempts INTEGER NOT NULL DEFAULT 0,
    instance_id TEXT,
    ip_address TEXT,
    ssh_port INTEGER,
    ssh_user TEXT NOT NULL,
    ssh_public_key TEXT NOT NULL,
    ssh_private_key TEXT NOT NULL,              -- sealed (AEAD, bound to the environment id)
    host_public_key TEXT NOT NULL,              -- pinned: the only host key we accept
    host_private_key TEXT,                      -- sealed; handed to the instance through cloud-init
    dev_password_hash TEXT,                     -- SHA-512 crypt, only ever placed in user-data
    installation_completed BOOLEAN NOT NULL DEFAULT 0,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    last_accessed TIMESTAMP
);
CREATE INDEX environments_user ON environments(user_id, created_at);
CREATE INDEX environments_status ON environments(status);

CREATE TABLE environment_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    environment_id TEXT NOT NULL REFERENCES environments(id) ON DELETE CASCADE,
    occurred_at TIMESTAMP NOT NULL,
    kind TEXT NOT NULL,                         -- status | installation_log | installation_complete | installation_error | info
    level TEXT NOT NULL,                        -- info | warning | error
    source TEXT NOT NULL,                       -- server | provider | cloud-init | local-setup ...
    message TEXT NOT NULL,
    status TEXT,
    status_version BIGINT
);
CREATE INDEX environment_events_env ON environment_events(environment_id, id);

CREATE TABLE templates (
    id TEXT PRIMARY KEY NOT NULL,
    definition TEXT NOT NULL,                   -- the template as JSON (metadata and user-data template)
    builtin BOOLEAN NOT NULL DEFAULT 1,
    updated_at TIMESTAMP NOT NULL
);
