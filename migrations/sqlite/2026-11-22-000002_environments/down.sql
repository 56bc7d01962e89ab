DROP TABLE templates;
DROP TABLE environment_events;
DROP TABLE environments;
