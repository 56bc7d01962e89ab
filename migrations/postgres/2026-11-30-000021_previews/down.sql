DROP TABLE preview_grants;
DROP TABLE preview_ports;
