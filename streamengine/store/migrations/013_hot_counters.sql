-- Ingest rewrites each written line's open window row and its outcome count rows in every batch (with many
-- lines, one row each per line per batch). Free room on each page lets PostgreSQL write the new row version on
-- the same page without touching the indexes (a HOT update: their indexed columns do not change); about a fifth
-- less PostgreSQL CPU per event with 1000 lines (bench/ingest.py --lines). Pages written from now on keep it.
ALTER TABLE windows SET (fillfactor = 50);
ALTER TABLE rollout_outcomes SET (fillfactor = 50);
