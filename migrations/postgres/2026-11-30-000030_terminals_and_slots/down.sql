DROP TABLE connection_slots;
DROP TABLE terminals;
