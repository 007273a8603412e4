-- Tombstones of forgotten users (privacy.forget_user, in the transaction that deletes their samples): ingest
-- drops a user's events made before the forget, so events still in Kafka, in flight or sent again do not
-- bring the user back. Kept for good: an old event may be sent again at any time.
CREATE TABLE forgotten_users (
    user_id      text PRIMARY KEY,
    forgotten_at timestamptz NOT NULL
);
