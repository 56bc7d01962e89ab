DROP TABLE environment_metrics;
DROP INDEX environments_user_live_name;
