-- Evaluation holdout flag per sample (assigned at ingest from a hash of event_id, stable forever).
ALTER TABLE samples ADD COLUMN holdout boolean NOT NULL DEFAULT false;
CREATE INDEX samples_model_window ON samples (model, window_id) WHERE label > 0;
