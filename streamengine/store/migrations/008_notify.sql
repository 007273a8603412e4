-- Wake-ups instead of polling (store/notify.py): a NOTIFY is delivered when its transaction commits, so a
-- listener hears of a row only once it can read it.
-- streamengine_jobs: a job may have become claimable: one was queued (created, retried, given back,
-- requeued by hand), or one stopped running (the next job of its model line may start).
CREATE FUNCTION streamengine_notify_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('streamengine_jobs', '');
    ELSIF NEW.state IS DISTINCT FROM OLD.state AND (NEW.state = 'queued' OR OLD.state = 'running') THEN
        PERFORM pg_notify('streamengine_jobs', '');
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE OF state ON jobs
    FOR EACH ROW EXECUTE FUNCTION streamengine_notify_jobs();

-- streamengine_outbox: a row waits to be published.
CREATE FUNCTION streamengine_notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('streamengine_outbox', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION streamengine_notify_outbox();
