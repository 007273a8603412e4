-- Every announcement on adapter.released (release, deploy, rollback) takes its model line's next number
-- in the same transaction and carries it signed (`sequence`): serving nodes refuse a record older than the
-- one they serve, so a replayed old record cannot move them back (see job_queue.next_sequence).
ALTER TABLE model_lines ADD COLUMN release_sequence bigint NOT NULL DEFAULT 0;
