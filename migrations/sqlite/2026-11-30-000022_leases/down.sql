DROP TABLE environment_commands;
DROP TABLE environment_leases;
