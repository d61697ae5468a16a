-- hmr 0.2.0 → 0.3.0 (ALTER EXTENSION hmr UPDATE TO '0.3.0').
-- A quarantined event that waits for another record names it in two columns instead of in
-- the text of last_error; the worker releases it by those columns (an index, not a scan).
-- tests/tests/upgrade.rs proves that a 0.2.0 database updated by this script has exactly
-- the objects of a fresh 0.3.0 install, and keeps its events.

ALTER TABLE hmr.outbox
    ADD COLUMN waits_for_kind text,
    ADD COLUMN waits_for_key  text,
    ADD CONSTRAINT outbox_waits_for_both CHECK ((waits_for_kind IS NULL) = (waits_for_key IS NULL));
CREATE INDEX outbox_waits_for_idx ON hmr.outbox (waits_for_kind, waits_for_key) WHERE waits_for_kind IS NOT NULL;

-- Events quarantined by a 0.2.0 worker behind a quarantined dependency said so in
-- last_error: 'waiting for quarantined <kind>:<key>'.
UPDATE hmr.outbox
   SET waits_for_kind = split_part(substr(last_error, length('waiting for quarantined ') + 1), ':', 1),
       waits_for_key  = substr(last_error, length('waiting for quarantined ') + 1
                               + length(split_part(substr(last_error, length('waiting for quarantined ') + 1), ':', 1)) + 1)
 WHERE state = 'quarantined'
   AND error_reason = 'dependency-quarantined'
   AND last_error LIKE 'waiting for quarantined %:%';

CREATE OR REPLACE VIEW hmr.quarantine AS
SELECT id, kind, key, error_field, error_reason, last_error, attempts, created_at, failed_at,
       waits_for_kind, waits_for_key
FROM hmr.outbox
WHERE state = 'quarantined';

CREATE OR REPLACE FUNCTION hmr.retry(event_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE hmr.outbox
       SET state = 'pending', plan = NULL, plan_pdf = NULL, step = 0, generation = generation + 1, attempts = 0,
           next_attempt_at = '-infinity', last_error = NULL, error_field = NULL,
           error_reason = NULL, failed_at = NULL, waits_for_kind = NULL, waits_for_key = NULL
     WHERE id = event_id AND state = 'quarantined';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'hmr: event % is not quarantined', event_id USING ERRCODE = 'HM020';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION hmr.retry_kind(kind text) RETURNS bigint
LANGUAGE sql AS $$
    WITH r AS (
        UPDATE hmr.outbox o
           SET state = 'pending', plan = NULL, plan_pdf = NULL, step = 0, generation = generation + 1, attempts = 0,
               next_attempt_at = '-infinity', last_error = NULL, error_field = NULL,
               error_reason = NULL, failed_at = NULL, waits_for_kind = NULL, waits_for_key = NULL
         WHERE o.kind = retry_kind.kind AND o.state = 'quarantined'
        RETURNING 1)
    SELECT count(*) FROM r
$$;

CREATE OR REPLACE VIEW hmr.stuck_records AS
SELECT o.kind, o.key, o.id AS event_id, o.state, o.attempts, o.created_at,
       now() - o.created_at AS waiting, o.last_error, o.error_field, o.error_reason,
       o.waits_for_kind, o.waits_for_key
FROM hmr.outbox o
WHERE NOT EXISTS (SELECT 1 FROM hmr.outbox e WHERE e.kind = o.kind AND e.key = o.key AND e.id < o.id)
  AND (o.state = 'quarantined'
       OR (o.attempts > 0 AND o.last_error IS NOT NULL
           -- pg_settings gives the value in seconds whatever unit it was set in ("10min");
           -- no row while hmr is not loaded in this session: the default.
           AND o.created_at < now() - make_interval(secs => coalesce(
                   (hmr.setting_of('hmr.stuck_after_seconds'))[1]::int, 600))));
