-- Lines with work take turns at the workers (store/job_queue.py claim): each line's last job start is looked up
-- per line, and each line's head (its oldest unfinished job) by line.
CREATE INDEX jobs_line_started ON jobs (model, started_at);
CREATE INDEX jobs_line_unfinished ON jobs (model, id) WHERE state IN ('queued', 'running');
