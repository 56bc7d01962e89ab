DROP TABLE environment_metrics;
DROP INDEX environments_user_live_name;
ALTER TABLE environment_events DROP COLUMN progress;
