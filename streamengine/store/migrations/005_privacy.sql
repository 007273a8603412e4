-- Privacy: the retention loop deletes the oldest samples first (privacy.retention_days), in batches.
-- (Forget requests find a user's samples through samples_user, from 001.)
CREATE INDEX samples_stored_at ON samples (stored_at);
