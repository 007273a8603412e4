-- Fisher jobs: compute and store the online-EWC Fisher of a released version on demand
-- (`streamengine fisher`, POST /fisher/calculate). The registry points at each version's Fisher file.
ALTER TABLE jobs ADD COLUMN kind text NOT NULL DEFAULT 'train' CHECK (kind IN ('train', 'fisher'));
ALTER TABLE jobs ADD COLUMN target_version text;
ALTER TABLE jobs DROP CONSTRAINT jobs_window_id_key;
CREATE UNIQUE INDEX jobs_one_training_per_window ON jobs (window_id) WHERE kind = 'train';
ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_state_check
    CHECK (state IN ('queued', 'running', 'released', 'rejected', 'failed', 'done'));
ALTER TABLE adapters ADD COLUMN fisher_file text;
ALTER TABLE adapters ADD COLUMN fisher_sha256 text;
UPDATE adapters SET fisher_file = 'fisher.safetensors', fisher_sha256 = manifest -> 'files' ->> 'fisher.safetensors'
    WHERE manifest -> 'files' ? 'fisher.safetensors';
