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

-- Unmapped items (issue #16): a policy per kind, 'hold' by default: a report whose local item
-- code has no mapping waits for it (quarantined, waits_for_kind 'item_map') and goes by itself
-- once the mapping is added; with 'send' it goes without a code and again with it.
ALTER TABLE hmr.kinds
    ADD COLUMN unmapped text NOT NULL DEFAULT 'hold',
    ADD CONSTRAINT kinds_unmapped_check CHECK (unmapped IN ('hold', 'send'));
CREATE OR REPLACE FUNCTION hmr.kinds_restore() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE hmr.kinds k
       SET source_view = NEW.source_view, key_column = NEW.key_column, item_view = NEW.item_view,
           batched = NEW.batched, changed_column = NEW.changed_column, description = NEW.description,
       unmapped = NEW.unmapped
     WHERE k.kind = NEW.kind;
    IF FOUND THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END
$$;

CREATE TABLE hmr.unmapped_reports (
    kind        text NOT NULL,
    key         text NOT NULL,
    type        text NOT NULL,
    local_code  text NOT NULL,
    local_name  text,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, key)
);
CREATE INDEX unmapped_reports_code_idx ON hmr.unmapped_reports (type, local_code);

-- The 0.2.0 table listed codes with one example report each: keep those still unmapped.
INSERT INTO hmr.unmapped_reports (kind, key, type, local_code, local_name, first_seen, last_seen)
SELECT CASE u.type WHEN 'lab' THEN 'lab_report' ELSE 'exam_report' END, u.example_key, u.type,
       u.local_code, u.local_name, u.first_seen, u.last_seen
  FROM hmr.unmapped_items u
 WHERE u.example_key IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM hmr.item_map m WHERE m.type = u.type AND m.local_code = u.local_code)
ON CONFLICT (kind, key) DO NOTHING;
-- Out of the extension first: that also takes it off the list pg_dump dumps (extconfig); a
-- plain DROP would leave its number there.
ALTER EXTENSION hmr DROP TABLE hmr.unmapped_items;
DROP TABLE hmr.unmapped_items;
SELECT pg_catalog.pg_extension_config_dump('hmr.unmapped_reports', '');

-- What is unmapped now: each local code without a mapping, how many reports met it, how many
-- wait for it (policy hold) and the oldest of those.
CREATE VIEW hmr.unmapped_items AS
SELECT r.type, r.local_code, max(r.local_name) AS local_name, count(*) AS reports,
       count(o.id) AS held, min(o.created_at) AS oldest_held_since,
       (array_agg(r.key ORDER BY o.created_at) FILTER (WHERE o.id IS NOT NULL))[1] AS oldest_held_report,
       min(r.first_seen) AS first_seen, max(r.last_seen) AS last_seen
FROM hmr.unmapped_reports r
LEFT JOIN hmr.outbox o ON o.kind = r.kind AND o.key = r.key AND o.state = 'quarantined'
      AND o.waits_for_kind = 'item_map' AND o.waits_for_key = r.type || ':' || r.local_code
WHERE NOT EXISTS (SELECT 1 FROM hmr.item_map m WHERE m.type = r.type AND m.local_code = r.local_code)
GROUP BY r.type, r.local_code;

-- A mapping added (or changed): the reports held for it go; the ones sent without a code go
-- again (the worker reads them anew, now with the code: the next version).
CREATE FUNCTION hmr.item_mapped() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE hmr.outbox o
       SET state = 'pending', plan = NULL, plan_pdf = NULL, step = 0, generation = o.generation + 1, attempts = 0,
           next_attempt_at = '-infinity', last_error = NULL, error_field = NULL,
           error_reason = NULL, failed_at = NULL, waits_for_kind = NULL, waits_for_key = NULL
     WHERE o.state = 'quarantined' AND o.waits_for_kind = 'item_map'
       AND o.waits_for_key = NEW.type || ':' || NEW.local_code;
    INSERT INTO hmr.outbox (kind, key, op)
    SELECT r.kind, r.key, 'S'
      FROM hmr.unmapped_reports r
      JOIN hmr.delivered d ON d.kind = r.kind AND d.key = r.key AND NOT d.revoked
     WHERE r.type = NEW.type AND r.local_code = NEW.local_code
       AND NOT EXISTS (SELECT 1 FROM hmr.outbox o WHERE o.kind = r.kind AND o.key = r.key);
    DELETE FROM hmr.unmapped_reports r WHERE r.type = NEW.type AND r.local_code = NEW.local_code;
    PERFORM hmr.wake_workers();
    RETURN NULL;
END
$$;
CREATE TRIGGER item_mapped AFTER INSERT OR UPDATE ON hmr.item_map
    FOR EACH ROW EXECUTE FUNCTION hmr.item_mapped();

REVOKE ALL ON hmr.unmapped_reports, hmr.unmapped_items FROM PUBLIC;
REVOKE ALL ON FUNCTION hmr.item_mapped() FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON hmr.unmapped_reports TO hmr_worker, hmr_admin;
GRANT SELECT ON hmr.unmapped_items TO hmr_worker, hmr_admin;
GRANT EXECUTE ON FUNCTION hmr.item_mapped() TO hmr_admin;

CREATE OR REPLACE VIEW hmr.status AS
SELECT (SELECT count(*) FROM hmr.outbox WHERE state = 'pending')
         + (SELECT count(*) FROM hmr.captured)                         AS pending,
       (SELECT count(*) FROM hmr.outbox WHERE state = 'claimed')       AS in_flight,
       (SELECT count(*) FROM hmr.outbox WHERE state = 'quarantined')   AS quarantined,
       now() - least((SELECT min(created_at) FROM hmr.outbox WHERE state <> 'quarantined'),
                     (SELECT min(created_at) FROM hmr.captured))        AS oldest_event_age,
       (SELECT count(*) FROM hmr.stuck_records)                        AS stuck_records,
       (SELECT count(*) FROM hmr.sleepers WHERE until > now())         AS idle_workers,
       (SELECT count(*) FROM hmr.guards WHERE NOT active)              AS guards_off,
       (SELECT max(finished_at) FROM hmr.outbox_history WHERE outcome = 'delivered') AS last_delivery,
       (SELECT n_live_tup FROM pg_stat_user_tables WHERE relid = 'hmr.outbox'::regclass) AS outbox_live_rows,
       (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'hmr.outbox'::regclass) AS outbox_dead_rows,
       (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'hmr.captured'::regclass) AS captured_dead_rows,
       (SELECT count(*) FROM hmr.outbox WHERE state = 'quarantined' AND waits_for_kind = 'item_map') AS held_unmapped;
