-- Adapter registry: deleted versions stay as tombstones so their numbers are never reused, and a job
-- can ask for a major version bump (`streamengine train --major`).
ALTER TABLE adapters ADD COLUMN deleted_at timestamptz;
ALTER TABLE jobs ADD COLUMN major boolean NOT NULL DEFAULT false;
