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

-- Several named polled sources per kind (issue #16): one per exam system, each with its own
-- view, time column, delay, lookback, watermark and enabled flag. The existing source keeps
-- the kind's name.
-- A source without a time column (a dictionary in another database) is compared in full by
-- content hash every compare_every.
ALTER TABLE hmr.polled_sources
    ADD COLUMN name text,
    ADD COLUMN source_view text,
    ADD COLUMN compare_every interval,
    ADD COLUMN time_zone text NOT NULL DEFAULT 'Asia/Shanghai',
    ALTER COLUMN time_column DROP NOT NULL,
    ADD CONSTRAINT compare_every_is_for_sources_without_time_column CHECK (compare_every IS NULL OR time_column IS NULL);
CREATE TABLE hmr.polled_hashes (
    source      text NOT NULL,
    key         text NOT NULL,
    hash        text NOT NULL,
    -- when a comparison first saw this content: the record's change time (hmr.changed_at)
    changed_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT polled_hashes_pkey PRIMARY KEY (source, key)
);
SELECT pg_catalog.pg_extension_config_dump('hmr.polled_hashes', '');
REVOKE ALL ON hmr.polled_hashes FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON hmr.polled_hashes TO hmr_worker, hmr_admin;
GRANT SELECT ON hmr.polled_hashes TO hmr_his;
CREATE FUNCTION hmr.changed_at(source text, key text) RETURNS timestamptz
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce((SELECT h.changed_at FROM hmr.polled_hashes h WHERE h.source = changed_at.source AND h.key = changed_at.key),
                    now())
$$;
REVOKE ALL ON FUNCTION hmr.changed_at(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION hmr.changed_at(text, text) TO hmr_his, hmr_worker, hmr_admin;
UPDATE hmr.polled_sources SET name = kind;
ALTER TABLE hmr.polled_sources
    ALTER COLUMN name SET NOT NULL,
    DROP CONSTRAINT polled_sources_pkey,
    ADD CONSTRAINT polled_sources_pkey PRIMARY KEY (name);
CREATE FUNCTION hmr.polled_source_named() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.name := coalesce(NEW.name, NEW.kind);
    RETURN NEW;
END
$$;
CREATE TRIGGER polled_source_named BEFORE INSERT ON hmr.polled_sources
    FOR EACH ROW EXECUTE FUNCTION hmr.polled_source_named();

ALTER TABLE hmr.polled_seen ADD COLUMN source text;
UPDATE hmr.polled_seen SET source = kind;
ALTER TABLE hmr.polled_seen
    ALTER COLUMN source SET NOT NULL,
    DROP CONSTRAINT polled_seen_pkey,
    ADD CONSTRAINT polled_seen_pkey PRIMARY KEY (source, key, seen_time);

-- The argument is now the source's name (a kind's single source is named after it).
DROP FUNCTION hmr.poll_source(text);
CREATE FUNCTION hmr.poll_source(source_name text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    p hmr.polled_sources;
    k hmr.kinds;
    polled regclass;
    since timestamptz;
    newest timestamptz;
    added integer;
    gone integer;
    time_type text;
    recent text[];
    present text[];
BEGIN
    SELECT * INTO p FROM hmr.polled_sources WHERE name = source_name AND enabled FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    SELECT * INTO k FROM hmr.kinds WHERE kind = p.kind;
    polled := coalesce(p.source_view, k.source_view)::regclass;
    IF p.time_column IS NULL THEN
        -- No time column: compare every row's content hash (without the kind's change-time
        -- column, which a view may take from hmr.changed_at) with the last comparison's;
        -- new, changed and vanished rows are enqueued.
        IF p.polled_at > now() - coalesce(p.compare_every, interval '15 minutes') THEN
            RETURN 0;
        END IF;
        EXECUTE format(
            'WITH cur AS (
                SELECT DISTINCT ON (key) key, h
                  FROM (SELECT v.%1$I::text AS key, md5((to_jsonb(v) - %3$L)::text) AS h FROM %2$s v) x
                 WHERE key IS NOT NULL ORDER BY key, h),
             changed AS (
                INSERT INTO hmr.polled_hashes AS ph (source, key, hash) SELECT $1, key, h FROM cur
                ON CONFLICT (source, key) DO UPDATE SET hash = EXCLUDED.hash, changed_at = now()
                 WHERE ph.hash <> EXCLUDED.hash
                RETURNING key),
             gone AS (
                DELETE FROM hmr.polled_hashes ph
                 WHERE ph.source = $1 AND NOT EXISTS (SELECT 1 FROM cur WHERE cur.key = ph.key)
                RETURNING key),
             ins AS (
                INSERT INTO hmr.outbox (kind, key, op)
                SELECT $2, key, ''P'' FROM (SELECT key FROM changed UNION SELECT key FROM gone) c ORDER BY key
                RETURNING 1)
             SELECT count(*)::int FROM ins',
            k.key_column, polled, coalesce(k.changed_column, ''))
          INTO added USING p.name, p.kind;
        UPDATE hmr.polled_sources SET polled_at = now() WHERE name = p.name;
        RETURN added;
    END IF;
    since := coalesce(p.watermark - p.lookback, '-infinity');
    SELECT format_type(a.atttypid, a.atttypmod) INTO time_type
      FROM pg_attribute a WHERE a.attrelid = polled AND a.attname = p.time_column AND NOT a.attisdropped;
    IF time_type = 'timestamp without time zone' THEN
        -- A wall-clock column (a vendor's DATETIME, a foreign table's raw column): compared with
        -- bounds turned into that clock here, so the comparison is column against constant and
        -- a foreign data wrapper sends it to the remote server (each poll reads the changes,
        -- not the table). The times found are turned back with the source's zone.
        EXECUTE format(
            'WITH cand AS (
                SELECT v.%1$I::text AS key, v.%2$I AT TIME ZONE $6 AS t FROM %3$s v
                 WHERE v.%2$I > $1 AND v.%2$I <= $5),
             new AS (
                INSERT INTO hmr.polled_seen (kind, key, seen_time, source) SELECT $3, key, t, $4 FROM cand
                ON CONFLICT DO NOTHING RETURNING key, seen_time),
             ins AS (
                INSERT INTO hmr.outbox (kind, key, op) SELECT $3, key, ''P'' FROM new ORDER BY seen_time, key
                RETURNING 1)
             SELECT (SELECT count(*)::int FROM ins), (SELECT max(t) FROM cand)',
            k.key_column, p.time_column, polled)
          INTO added, newest
          USING greatest(since, '1900-01-01 00:00:00+08'::timestamptz) AT TIME ZONE p.time_zone, p.delay, p.kind,
                p.name, (now() - p.delay) AT TIME ZONE p.time_zone, p.time_zone;
    ELSE
        EXECUTE format(
            'WITH cand AS (
                SELECT v.%1$I::text AS key, v.%2$I AS t FROM %3$s v
                 WHERE v.%2$I > $1 AND v.%2$I <= now() - $2),
             new AS (
                INSERT INTO hmr.polled_seen (kind, key, seen_time, source) SELECT $3, key, t, $4 FROM cand
                ON CONFLICT DO NOTHING RETURNING key, seen_time),
             ins AS (
                INSERT INTO hmr.outbox (kind, key, op) SELECT $3, key, ''P'' FROM new ORDER BY seen_time, key
                RETURNING 1)
             SELECT (SELECT count(*)::int FROM ins), (SELECT max(t) FROM cand)',
            k.key_column, p.time_column, polled)
          INTO added, newest USING since, p.delay, p.kind, p.name;
    END IF;
    -- Withdrawn (a report un-audited leaves the view without a new change time): held by the
    -- platform, recently delivered, no longer in the view (a source with a view of its own:
    -- among the reports this source found). The view is asked for those keys by name, a list
    -- a foreign data wrapper sends to the remote server: joined, the planner read every key
    -- of the view at each poll (#31). Records other than reports are not withdrawn.
    gone := 0;
    IF k.kind IN ('lab_report', 'exam_report') THEN
        SELECT coalesce(array_agg(d.key ORDER BY d.key), '{}') INTO recent FROM hmr.delivered d
         WHERE d.kind = p.kind AND d.kind IN ('lab_report', 'exam_report')   -- delivered_reports_recent_idx
           AND NOT d.revoked AND d.delivered_at > now() - p.lookback
           AND (p.source_view IS NULL OR EXISTS (SELECT 1 FROM hmr.polled_seen s WHERE s.source = p.name AND s.key = d.key))
           AND NOT EXISTS (SELECT 1 FROM hmr.outbox o WHERE o.kind = d.kind AND o.key = d.key);
        IF cardinality(recent) > 0 THEN
            EXECUTE format('SELECT coalesce(array_agg(DISTINCT v.%2$I::text), ''{}'') FROM %1$s v WHERE v.%2$I::text = ANY($1)',
                           polled, k.key_column)
              INTO present USING recent;
            INSERT INTO hmr.outbox (kind, key, op)
            SELECT p.kind, g.key, 'P'
              FROM (SELECT unnest(recent) AS key EXCEPT SELECT unnest(present)) g ORDER BY g.key;
            GET DIAGNOSTICS gone = ROW_COUNT;
        END IF;
    END IF;
    UPDATE hmr.polled_sources
       SET watermark = greatest(watermark, newest), polled_at = now()
     WHERE name = p.name;
    DELETE FROM hmr.polled_seen
     WHERE source = p.name AND seen_time < greatest(p.watermark, newest) - p.lookback;
    RETURN added + gone;
END
$$;

CREATE OR REPLACE FUNCTION hmr.poll_sources() RETURNS integer
LANGUAGE sql AS $$
    SELECT coalesce(sum(hmr.poll_source(name)), 0)::int FROM hmr.polled_sources WHERE enabled
$$;

REVOKE ALL ON FUNCTION hmr.poll_source(text), hmr.polled_source_named() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION hmr.poll_source(text) TO hmr_worker, hmr_admin;
GRANT EXECUTE ON FUNCTION hmr.poll_source(text), hmr.polled_source_named() TO hmr_admin;

-- On a hot standby, calls that record stop with HM016 (issue #20); reads work.
CREATE FUNCTION hmr.need_primary(what text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF pg_is_in_recovery() THEN
        RAISE EXCEPTION '当前连接的是只读备库，%需要连接主库', what
            USING ERRCODE = 'HM016',
                  HINT = '请将此调用连接到主库：使用 target_session_attrs=read-write 的多主机连接串，或 HIS 的读写数据源。';
    END IF;
END
$$;
REVOKE ALL ON FUNCTION hmr.need_primary(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION hmr.need_primary(text) TO hmr_admin;

CREATE OR REPLACE FUNCTION public.hmr_check_order(visit jsonb, orders jsonb)
RETURNS jsonb LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT hmr.need_primary('互认校验');
    SELECT hmr.order_check_json(visit, orders)
$$;

-- The check the gate runs on every save. PL/pgSQL keeps its plans for the session (an SQL
-- function would parse and plan its statements on every call); a standby refuses with HM016
-- before anything is asked.
CREATE OR REPLACE FUNCTION public.hmr_check_prescription(visit jsonb, orders jsonb)
RETURNS jsonb LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF pg_is_in_recovery() THEN
        PERFORM hmr.need_primary('互认校验');
    END IF;
    RETURN hmr.check_prescription_json(visit, orders);
END
$$;

-- 0.3.0: decisions keep the terminal they were taken at (a new last argument, workstation).
ALTER TABLE hmr.decisions ADD COLUMN workstation text;
CREATE OR REPLACE VIEW hmr.current_decisions AS
SELECT DISTINCT ON (check_id, order_id) *
FROM hmr.decisions
ORDER BY check_id, order_id, id DESC;
-- hmr_record_decision learns the check's page decisions first (HM017 for a different choice).
CREATE FUNCTION hmr."learn_check_decisions"(
	"check_id" TEXT /* & str */
) RETURNS bigint /* i64 */
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'learn_check_decisions_wrapper';
REVOKE ALL ON FUNCTION hmr.learn_check_decisions(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION hmr.learn_check_decisions(text) TO hmr_admin;

DROP FUNCTION public.hmr_record_decision(text, text, boolean, text, text, text, text, text);
CREATE FUNCTION public.hmr_record_decision(check_id text, order_id text, recognise boolean,
                                           reason_code text DEFAULT NULL, reason_text text DEFAULT NULL,
                                           report_id text DEFAULT NULL, doctor_no text DEFAULT NULL,
                                           dept_code text DEFAULT NULL, workstation text DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c hmr.checks;
    m jsonb;
    rid text;
    problem text;
    matched integer;
    decided integer;
    new_id bigint;
    page_recognise boolean;
    page_reason text;
    page_report text;
    who text;
    who_dept text;
    p_check alias FOR $1;
    p_order alias FOR $2;
BEGIN
    PERFORM hmr.need_primary('记录互认结果');
    IF NOT hmr.ensure_check(p_check) THEN
        RAISE EXCEPTION '找不到互认校验记录 %，请重新保存处方以重新校验', p_check
            USING ERRCODE = 'HM003', HINT = '请重新保存处方以重新校验（check_id 来自 hmr_check_prescription() 或 HM001 的 DETAIL）。';
    END IF;
    -- One decision of a check at a time (several doctors' sessions, a pool): the last one
    -- to complete the check sees every other and queues the upload exactly once.
    SELECT * INTO c FROM hmr.checks k WHERE k.check_id = p_check FOR UPDATE;
    IF c.refused_at IS NOT NULL THEN
        RAISE EXCEPTION '互认平台拒绝了该处方的互认结果（%），请重新保存处方以重新校验', c.refused_reason
            USING ERRCODE = 'HM015', HINT = '请重新保存处方：新的校验会列出当前可互认的结果。';
    END IF;
    SELECT x INTO m FROM jsonb_array_elements(c.matches) x WHERE x->>'order_id' = p_order;
    IF m IS NULL THEN
        RAISE EXCEPTION '医嘱 % 没有可互认的报告，无需选择', p_order USING ERRCODE = 'HM003';
    END IF;
    rid := coalesce(report_id, m->'reports'->0->>'report_id');
    IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements(m->'reports') x WHERE x->>'report_id' = rid) THEN
        RAISE EXCEPTION '报告 % 不在医嘱 % 的可互认报告中', rid, p_order USING ERRCODE = 'HM003';
    END IF;
    -- 互认 of a report whose validity has passed since the check: the platform would refuse
    -- it (409); say so now, in the doctor's words (不互认 of it stays possible).
    IF recognise AND EXISTS (SELECT 1 FROM jsonb_array_elements(m->'reports') x
                              WHERE x->>'report_id' = rid
                                AND CASE WHEN x->>'valid_until' ~ '^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d'
                                         THEN (x->>'valid_until')::timestamptz <= now() ELSE false END) THEN
        RAISE EXCEPTION '报告 % 已超过互认有效期，不能互认，请重新保存处方以重新校验', rid
            USING ERRCODE = 'HM015', HINT = '请重新保存处方：新的校验只列出仍在有效期内的结果。';
    END IF;
    problem := hmr.decision_problem(recognise, reason_code, reason_text);
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION '%', problem
            USING ERRCODE = 'HM004',
                  HINT = '01 病情变化，原结果难以反映当前病情; 02 结果在疾病发展中变化较快; 03 手术、输血等重大医疗措施前; '
                         '04 急诊、急救; 05 司法、伤残、病退等鉴定; 06 其他情形确需复查（须填写具体说明）';
    END IF;
    -- Who decided: the check's doctor, or another member of staff deciding for them (a senior
    -- for a junior) in that one's department; a decision is never credited to anyone else
    -- (the hospital is assessed on each doctor's figures).
    who := coalesce(nullif(trim(hmr_record_decision.doctor_no), ''), c.doctor_no);
    who_dept := c.dept_code;
    IF who IS DISTINCT FROM c.doctor_no THEN
        IF to_regclass('hmr_src.staff') IS NULL THEN
            RAISE EXCEPTION '医生工号 % 不是本次校验的开单医生，且无法核对本院人员字典', who
                USING ERRCODE = 'HM018', HINT = '不传 doctor_no 即记为开单医生；代为选择须在 hmr_src.staff 中。';
        END IF;
        SELECT s.dept_code INTO who_dept FROM hmr_src.staff s WHERE s.staff_no = who LIMIT 1;
        IF NOT FOUND THEN
            RAISE EXCEPTION '医生工号 % 不在本院人员字典中，不能记为其互认选择', who
                USING ERRCODE = 'HM018', HINT = '不传 doctor_no 即记为开单医生；代为选择须为本院人员（hmr_src.staff）。';
        END IF;
    END IF;
    IF nullif(trim(hmr_record_decision.dept_code), '') IS NOT NULL
       AND trim(hmr_record_decision.dept_code) IS DISTINCT FROM who_dept THEN
        RAISE EXCEPTION '科室 % 与医生 % 的科室（%）不符', trim(hmr_record_decision.dept_code), who, who_dept
            USING ERRCODE = 'HM018', HINT = '不传 dept_code 即取医生所在科室。';
    END IF;
    -- A decision taken on the platform's page counts as uploaded (contract §6): learn the
    -- check's page decisions first (bounded by the platform timeout; an unreachable platform
    -- only means none learnt now, and the worker reads the check again before it uploads).
    -- A different choice for an order decided on the page is refused, naming the page's.
    PERFORM hmr.learn_check_decisions(p_check);
    SELECT d.recognise, d.reason_code, d.report_id INTO page_recognise, page_reason, page_report
      FROM hmr.current_decisions d WHERE d.check_id = p_check AND d.order_id = p_order AND d.source = 'page';
    IF FOUND THEN
        IF page_report = rid AND page_recognise = hmr_record_decision.recognise
           AND page_reason IS NOT DISTINCT FROM nullif(trim(hmr_record_decision.reason_code), '') THEN
            SELECT count(DISTINCT d.order_id) INTO decided FROM hmr.decisions d WHERE d.check_id = p_check;
            RETURN jsonb_build_object('check_id', p_check, 'order_id', p_order, 'report_id', rid,
                                      'recognise', recognise, 'complete', decided >= jsonb_array_length(c.matches),
                                      'already_sent', true);
        END IF;
        RAISE EXCEPTION '医嘱 % 已在互认平台页面选择了“%”，不能在本系统改为“%”', p_order,
            CASE WHEN page_recognise THEN '互认' ELSE '不互认（原因 ' || page_reason || '）' END,
            CASE WHEN recognise THEN '互认' ELSE '不互认' END
            USING ERRCODE = 'HM017',
                  DETAIL = jsonb_build_object('order_id', p_order, 'report_id', page_report,
                                              'recognise', page_recognise, 'reason_code', page_reason,
                                              'source', 'page')::text,
                  HINT = '以互认平台页面上的选择为准；如需更改，请在互认平台页面操作。';
    END IF;
    IF EXISTS (SELECT 1 FROM hmr.delivered d WHERE d.kind = 'decision' AND d.key = p_check)
       OR EXISTS (SELECT 1 FROM hmr.outbox o WHERE o.kind = 'decision' AND o.key = p_check AND o.plan IS NOT NULL) THEN
        IF EXISTS (SELECT 1 FROM hmr.current_decisions d
                    WHERE d.check_id = p_check AND d.order_id = p_order AND d.report_id = rid
                      AND d.recognise = hmr_record_decision.recognise
                      AND d.reason_code IS NOT DISTINCT FROM hmr_record_decision.reason_code) THEN
            RETURN jsonb_build_object('check_id', p_check, 'order_id', p_order, 'report_id', rid,
                                      'recognise', recognise, 'complete', true, 'already_sent', true);
        END IF;
        RAISE EXCEPTION '该处方的互认结果已上传，不能更改' USING ERRCODE = 'HM005';
    END IF;
    INSERT INTO hmr.decisions (check_id, order_id, report_id, recognise, reason_code, reason_text, doctor_no, dept_code,
                               workstation)
    VALUES (p_check, p_order, rid, recognise, nullif(trim(reason_code), ''), nullif(trim(reason_text), ''),
            who, coalesce(who_dept, ''),
            left(nullif(trim(hmr_record_decision.workstation), ''), 32))
    RETURNING id INTO new_id;
    SELECT jsonb_array_length(c.matches) INTO matched;
    SELECT count(DISTINCT d.order_id) INTO decided FROM hmr.decisions d WHERE d.check_id = p_check;
    IF decided >= matched AND NOT EXISTS (SELECT 1 FROM hmr.outbox o WHERE o.kind = 'decision' AND o.key = p_check) THEN
        INSERT INTO hmr.outbox (kind, key, op) VALUES ('decision', p_check, 'I');
        PERFORM hmr.wake_workers();
    END IF;
    RETURN jsonb_build_object('decision_id', new_id, 'check_id', p_check, 'order_id', p_order, 'report_id', rid,
                              'recognise', recognise, 'complete', decided >= matched);
END
$$;
REVOKE ALL ON FUNCTION public.hmr_record_decision(text, text, boolean, text, text, text, text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.hmr_record_decision(text, text, boolean, text, text, text, text, text, text)
      TO hmr_his, hmr_admin;
-- hmr-worker serve logs in as a HIS role and finds the patient and staff views here.
GRANT SELECT ON hmr.kinds TO hmr_his;

CREATE OR REPLACE FUNCTION public.hmr_page_decisions(check_id text)
RETURNS jsonb LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT hmr.need_primary('记录互认结果');
    SELECT hmr.page_decisions_json(check_id)
$$;

CREATE OR REPLACE FUNCTION public.hmr_download_report(report_id text, format text DEFAULT 'pdf')
RETURNS bytea LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    kept bytea;
    revoked timestamptz;
    note text;
    chk text;
    p_report alias FOR $1;
    p_format alias FOR $2;
BEGIN
    -- Every read is logged: a standby cannot.
    PERFORM hmr.need_primary('下载互认报告');
    IF p_format NOT IN ('pdf', 'json') THEN
        RAISE EXCEPTION 'hmr: format must be pdf or json' USING ERRCODE = '22023';
    END IF;
    SELECT r.bytes, r.revoked_at, r.revoked_note INTO kept, revoked, note
      FROM hmr.retained_reports r WHERE r.report_id = p_report AND r.format = p_format;
    IF revoked IS NOT NULL THEN
        INSERT INTO hmr.download_log (report_id, format, source) VALUES (p_report, p_format, 'refused: revoked');
        RAISE EXCEPTION '报告 % 已被出具医院撤销（%），不能再作为互认依据', p_report,
                        to_char(revoked AT TIME ZONE 'Asia/Shanghai', 'YYYY-MM-DD HH24:MI')
            USING ERRCODE = 'HM009', DETAIL = format('revoked_at %s; %s', revoked, note),
                  HINT = '请重新开具该检查检验，或选择其他可互认的报告。';
    END IF;
    IF FOUND THEN
        INSERT INTO hmr.download_log (report_id, format, source) VALUES (p_report, p_format, 'kept');
        RETURN kept;
    END IF;
    SELECT d.check_id INTO chk FROM hmr.order_recognitions d WHERE d.report_id = p_report AND d.recognised LIMIT 1;
    IF chk IS NULL THEN
        RAISE EXCEPTION '报告 % 未被本院互认，不能下载', p_report USING ERRCODE = 'HM006';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM hmr.delivered d WHERE d.kind = 'decision' AND d.key = chk) THEN
        RAISE EXCEPTION '互认结果尚在上传途中，报告暂不能下载，请稍后再试' USING ERRCODE = 'HM007',
            DETAIL = format('check %s: the decision is in the outbox; the worker keeps the report once it is delivered', chk);
    END IF;
    kept := hmr.fetch_report(p_report, p_format);
    IF kept IS NULL THEN
        RAISE EXCEPTION '互认平台暂不可用，报告暂不能下载' USING ERRCODE = 'HM008';
    END IF;
    INSERT INTO hmr.download_log (report_id, format, source) VALUES (p_report, p_format, 'platform');
    RETURN kept;
END
$$;

-- ===================================================================== statistics (互认统计)

-- Every call of the recognition list (the badge: 调阅 and 提醒): who looked, for which patient
-- (masked), what it showed. Not written on a hot standby or in a read-only transaction.
CREATE SEQUENCE hmr.list_log_id_seq;
CREATE TABLE hmr.list_log (
    id            bigint PRIMARY KEY DEFAULT nextval('hmr.list_log_id_seq'),
    called_at     timestamptz NOT NULL DEFAULT now(),
    doctor_no     text,
    dept_code     text,
    visit_no      text,
    id_no_masked  text,
    kind          text NOT NULL,
    -- status ok: how many recognisable reports the badge showed; unavailable: NULL
    shown         integer,
    status        text NOT NULL,
    cached        boolean NOT NULL DEFAULT false,
    called_by     text NOT NULL DEFAULT session_user,
    -- the calling workstation as the HIS names it (outpatient, inpatient, emergency, …)
    workstation   text
);
CREATE INDEX list_log_called_idx ON hmr.list_log (called_at);

-- The hospital's price per catalog item (optional), to estimate what recognition saved.
CREATE TABLE hmr.item_prices (
    data_code  text PRIMARY KEY REFERENCES hmr.catalog,
    price      numeric(12, 2) NOT NULL CHECK (price >= 0)
);

-- 互认 by month (Beijing time) × department × doctor × catalog item: how often doctors were
-- warned of a duplicate (prompts: one per order a refused save left undecided), what they
-- decided (the decision that counts; decisions of a check the platform refused do not),
-- the 互认率, the 不互认 reasons (01–06), the repeat tests avoided and, with a price in
-- hmr.item_prices, what they would have cost. Totals: hmr.recognition_totals.
CREATE VIEW hmr.recognition_stats AS
WITH prompted AS (
    SELECT date_trunc('month', p.prompted_at AT TIME ZONE 'Asia/Shanghai')::date AS month,
           c.dept_code, c.doctor_no, m->>'data_code' AS data_code, count(*) AS prompts
      FROM hmr.prompts p
      JOIN hmr.checks c USING (check_id)
     CROSS JOIN LATERAL jsonb_array_elements(p.undecided) m
     GROUP BY 1, 2, 3, 4),
decided AS (
    SELECT date_trunc('month', d.decided_at AT TIME ZONE 'Asia/Shanghai')::date AS month,
           d.dept_code, d.doctor_no,
           (SELECT m->>'data_code' FROM jsonb_array_elements(c.matches) m
             WHERE m->>'order_id' = d.order_id LIMIT 1) AS data_code,
           d.recognise, d.reason_code
      FROM hmr.current_decisions d
      JOIN hmr.checks c ON c.check_id = d.check_id AND c.refused_at IS NULL),
counted AS (
    SELECT month, dept_code, doctor_no, data_code,
           count(*) FILTER (WHERE recognise) AS recognised,
           count(*) FILTER (WHERE NOT recognise) AS declined,
           count(*) FILTER (WHERE reason_code = '01') AS declined_01,
           count(*) FILTER (WHERE reason_code = '02') AS declined_02,
           count(*) FILTER (WHERE reason_code = '03') AS declined_03,
           count(*) FILTER (WHERE reason_code = '04') AS declined_04,
           count(*) FILTER (WHERE reason_code = '05') AS declined_05,
           count(*) FILTER (WHERE reason_code = '06') AS declined_06
      FROM decided
     GROUP BY 1, 2, 3, 4)
SELECT month, dept_code, doctor_no, data_code, c.name AS item_name,
       coalesce(p.prompts, 0) AS prompts,
       coalesce(d.recognised, 0) AS recognised,
       coalesce(d.declined, 0) AS declined,
       round(d.recognised::numeric / nullif(d.recognised + d.declined, 0), 4) AS recognition_rate,
       coalesce(d.declined_01, 0) AS declined_01, coalesce(d.declined_02, 0) AS declined_02,
       coalesce(d.declined_03, 0) AS declined_03, coalesce(d.declined_04, 0) AS declined_04,
       coalesce(d.declined_05, 0) AS declined_05, coalesce(d.declined_06, 0) AS declined_06,
       coalesce(d.recognised, 0) AS repeats_avoided,
       coalesce(d.recognised, 0) * ip.price AS saved
FROM prompted p
FULL JOIN counted d USING (month, dept_code, doctor_no, data_code)
LEFT JOIN hmr.catalog c USING (data_code)
LEFT JOIN hmr.item_prices ip USING (data_code);

-- The same per month for the whole hospital, with the list calls (调阅) and the downloads of
-- recognised reports.
CREATE VIEW hmr.recognition_totals AS
WITH s AS (
    SELECT month, sum(prompts) AS prompts, sum(recognised) AS recognised, sum(declined) AS declined,
           sum(repeats_avoided) AS repeats_avoided, sum(saved) AS saved
      FROM hmr.recognition_stats GROUP BY month),
l AS (
    SELECT date_trunc('month', called_at AT TIME ZONE 'Asia/Shanghai')::date AS month,
           count(*) AS list_calls, count(*) FILTER (WHERE shown > 0) AS list_calls_with_results
      FROM hmr.list_log GROUP BY 1),
dl AS (
    SELECT date_trunc('month', read_at AT TIME ZONE 'Asia/Shanghai')::date AS month, count(*) AS downloads
      FROM hmr.download_log WHERE source IN ('kept', 'platform') GROUP BY 1)
SELECT month,
       coalesce(l.list_calls, 0) AS list_calls,
       coalesce(l.list_calls_with_results, 0) AS list_calls_with_results,
       coalesce(s.prompts, 0) AS prompts,
       coalesce(s.recognised, 0) AS recognised,
       coalesce(s.declined, 0) AS declined,
       round(s.recognised / nullif(s.recognised + s.declined, 0), 4) AS recognition_rate,
       coalesce(dl.downloads, 0) AS downloads,
       coalesce(s.repeats_avoided, 0) AS repeats_avoided,
       s.saved
FROM s FULL JOIN l USING (month) FULL JOIN dl USING (month);

SELECT pg_catalog.pg_extension_config_dump('hmr.list_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('hmr.list_log', '');
SELECT pg_catalog.pg_extension_config_dump('hmr.item_prices', '');
REVOKE ALL ON hmr.list_log, hmr.item_prices, hmr.recognition_stats, hmr.recognition_totals FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON hmr.item_prices TO hmr_admin;
GRANT SELECT ON hmr.list_log, hmr.recognition_stats, hmr.recognition_totals TO hmr_worker, hmr_admin;

-- Upload statistics (issue #18).
-- Uploads of reports per day (Beijing time) and kind, rolled up from the history when
-- hmr.purge_history() deletes it, so the upload statistics outlive the trimmed history. The
-- time from the event (the approval) to the platform's acceptance is kept as a distribution.
CREATE TABLE hmr.upload_days (
    day           date NOT NULL,
    kind          text NOT NULL,
    uploaded      bigint NOT NULL DEFAULT 0,
    revokes       bigint NOT NULL DEFAULT 0,
    discarded     bigint NOT NULL DEFAULT 0,
    within_1min   bigint NOT NULL DEFAULT 0,
    within_10min  bigint NOT NULL DEFAULT 0,
    within_1h     bigint NOT NULL DEFAULT 0,
    within_24h    bigint NOT NULL DEFAULT 0,
    within_72h    bigint NOT NULL DEFAULT 0,
    CONSTRAINT upload_days_pkey PRIMARY KEY (day, kind)
);

-- Finished events older than `keep` leave the history in batches (the worker calls this;
-- the history exists for audit, so keep it as long as the hospital's rules say). Report
-- uploads are rolled up into hmr.upload_days first.
CREATE OR REPLACE FUNCTION hmr.purge_history(keep interval DEFAULT '90 days', batch integer DEFAULT 10000) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    removed bigint := 0;
    n bigint;
BEGIN
    INSERT INTO hmr.upload_days AS u (day, kind, uploaded, revokes, discarded, within_1min, within_10min,
                                      within_1h, within_24h, within_72h)
    SELECT (h.created_at AT TIME ZONE 'Asia/Shanghai')::date, h.kind,
           count(*) FILTER (WHERE h.outcome = 'delivered'),
           count(*) FILTER (WHERE h.outcome = 'delivered' AND h.detail = 'revoke'),
           count(*) FILTER (WHERE h.outcome = 'discarded'),
           count(*) FILTER (WHERE h.outcome = 'delivered' AND h.finished_at - h.created_at <= interval '1 minute'),
           count(*) FILTER (WHERE h.outcome = 'delivered' AND h.finished_at - h.created_at <= interval '10 minutes'),
           count(*) FILTER (WHERE h.outcome = 'delivered' AND h.finished_at - h.created_at <= interval '1 hour'),
           count(*) FILTER (WHERE h.outcome = 'delivered' AND h.finished_at - h.created_at <= interval '24 hours'),
           count(*) FILTER (WHERE h.outcome = 'delivered' AND h.finished_at - h.created_at <= interval '72 hours')
      FROM hmr.outbox_history h
     WHERE h.finished_at < now() - keep AND h.kind IN ('lab_report', 'exam_report')
     GROUP BY 1, 2
    ON CONFLICT (day, kind) DO UPDATE
       SET uploaded = u.uploaded + EXCLUDED.uploaded, revokes = u.revokes + EXCLUDED.revokes,
           discarded = u.discarded + EXCLUDED.discarded, within_1min = u.within_1min + EXCLUDED.within_1min,
           within_10min = u.within_10min + EXCLUDED.within_10min, within_1h = u.within_1h + EXCLUDED.within_1h,
           within_24h = u.within_24h + EXCLUDED.within_24h, within_72h = u.within_72h + EXCLUDED.within_72h;
    LOOP
        DELETE FROM hmr.outbox_history
         WHERE id IN (SELECT id FROM hmr.outbox_history WHERE finished_at < now() - keep ORDER BY finished_at LIMIT batch);
        GET DIAGNOSTICS n = ROW_COUNT;
        removed := removed + n;
        EXIT WHEN n < batch;
    END LOOP;
    RETURN removed;
END
$$;

-- Uploads of lab and exam reports by month (Beijing time) and kind: 上传率 (of the events that
-- had something to send — a version or a revoke — the share the platform accepted; waiting,
-- quarantined and discarded ones are not uploaded) and 及时率 (of the uploads, the share
-- accepted within `on_time` of the approval), the distribution of that time, and revokes.
-- From the history, the outbox and, for purged days, hmr.upload_days (there `on_time` counts
-- at the largest of 1 min, 10 min, 1 h, 24 h, 72 h not above it).
CREATE FUNCTION hmr.upload_stats(on_time interval DEFAULT '24 hours')
RETURNS TABLE (month date, kind text, uploaded bigint, not_uploaded bigint, upload_rate numeric,
               uploaded_on_time bigint, on_time_rate numeric, revokes bigint, within_1min bigint,
               within_10min bigint, within_1h bigint, within_24h bigint, within_72h bigint)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    WITH live AS (
        SELECT date_trunc('month', h.created_at AT TIME ZONE 'Asia/Shanghai')::date AS month, h.kind,
               count(*) FILTER (WHERE h.outcome = 'delivered') AS uploaded,
               count(*) FILTER (WHERE h.outcome = 'discarded') AS not_uploaded,
               count(*) FILTER (WHERE h.outcome = 'delivered' AND h.finished_at - h.created_at <= on_time) AS on_time,
               count(*) FILTER (WHERE h.outcome = 'delivered' AND h.detail = 'revoke') AS revokes,
               count(*) FILTER (WHERE h.outcome = 'delivered' AND h.finished_at - h.created_at <= interval '1 minute') AS w1,
               count(*) FILTER (WHERE h.outcome = 'delivered' AND h.finished_at - h.created_at <= interval '10 minutes') AS w10,
               count(*) FILTER (WHERE h.outcome = 'delivered' AND h.finished_at - h.created_at <= interval '1 hour') AS w60,
               count(*) FILTER (WHERE h.outcome = 'delivered' AND h.finished_at - h.created_at <= interval '24 hours') AS w24h,
               count(*) FILTER (WHERE h.outcome = 'delivered' AND h.finished_at - h.created_at <= interval '72 hours') AS w72h
          FROM hmr.outbox_history h
         WHERE h.kind IN ('lab_report', 'exam_report')
         GROUP BY 1, 2
        UNION ALL
        SELECT date_trunc('month', o.created_at AT TIME ZONE 'Asia/Shanghai')::date, o.kind,
               0, count(*), 0, 0, 0, 0, 0, 0, 0
          FROM hmr.outbox o
         WHERE o.kind IN ('lab_report', 'exam_report')
         GROUP BY 1, 2
        UNION ALL
        SELECT date_trunc('month', d.day)::date, d.kind, d.uploaded, d.discarded,
               CASE WHEN on_time >= interval '72 hours' THEN d.within_72h
                    WHEN on_time >= interval '24 hours' THEN d.within_24h
                    WHEN on_time >= interval '1 hour' THEN d.within_1h
                    WHEN on_time >= interval '10 minutes' THEN d.within_10min
                    WHEN on_time >= interval '1 minute' THEN d.within_1min
                    ELSE 0 END,
               d.revokes, d.within_1min, d.within_10min, d.within_1h, d.within_24h, d.within_72h
          FROM hmr.upload_days d)
    SELECT l.month, l.kind, sum(l.uploaded)::bigint, sum(l.not_uploaded)::bigint,
           round(sum(l.uploaded) / nullif(sum(l.uploaded) + sum(l.not_uploaded), 0), 4),
           sum(l.on_time)::bigint, round(sum(l.on_time) / nullif(sum(l.uploaded), 0), 4),
           sum(l.revokes)::bigint, sum(l.w1)::bigint, sum(l.w10)::bigint, sum(l.w60)::bigint,
           sum(l.w24h)::bigint, sum(l.w72h)::bigint
      FROM live l
     GROUP BY l.month, l.kind
$$;

-- Quarantined events by kind and age (how long the DBA has left them).
CREATE VIEW hmr.quarantine_ageing AS
SELECT kind,
       count(*) FILTER (WHERE now() - failed_at < interval '1 hour') AS under_1h,
       count(*) FILTER (WHERE now() - failed_at >= interval '1 hour' AND now() - failed_at < interval '1 day') AS under_1d,
       count(*) FILTER (WHERE now() - failed_at >= interval '1 day' AND now() - failed_at < interval '7 days') AS under_7d,
       count(*) FILTER (WHERE now() - failed_at >= interval '7 days') AS older,
       min(failed_at) AS oldest
FROM hmr.outbox
WHERE state = 'quarantined'
GROUP BY kind;

SELECT pg_catalog.pg_extension_config_dump('hmr.upload_days', '');
REVOKE ALL ON hmr.upload_days, hmr.quarantine_ageing FROM PUBLIC;
REVOKE ALL ON FUNCTION hmr.upload_stats(interval) FROM PUBLIC;
GRANT SELECT ON hmr.quarantine_ageing TO hmr_worker, hmr_admin;
GRANT SELECT, INSERT, UPDATE ON hmr.upload_days TO hmr_worker, hmr_admin;
GRANT EXECUTE ON FUNCTION hmr.upload_stats(interval) TO hmr_worker, hmr_admin;

-- The list call names its workstation (statistics of 调阅 by workstation): one more argument.
DROP FUNCTION public.hmr_list_recognitions(text, text, text, text, text, text, boolean);
DROP FUNCTION hmr.list_recognitions_json(text, text, text, text, text, text, boolean);
CREATE FUNCTION hmr."list_recognitions_json"(
	"id_type" TEXT, /* & str */
	"id_no" TEXT, /* & str */
	"visit_no" TEXT, /* & str */
	"doctor_no" TEXT, /* & str */
	"dept_code" TEXT, /* & str */
	"kind" TEXT DEFAULT 'all', /* & str */
	"use_cache" bool DEFAULT true, /* bool */
	"workstation" TEXT DEFAULT '' /* & str */
) RETURNS jsonb /* JsonB */
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'list_recognitions_json_wrapper';
CREATE FUNCTION public.hmr_list_recognitions(id_type text, id_no text, visit_no text, doctor_no text,
                                             dept_code text, kind text DEFAULT 'all',
                                             use_cache boolean DEFAULT true, workstation text DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- PL/pgSQL, which keeps this plan for the session (an SQL function plans it on every call).
    RETURN hmr.list_recognitions_json(id_type, id_no, visit_no, doctor_no, dept_code, kind, use_cache,
                                      coalesce(workstation, ''));
END
$$;
REVOKE ALL ON FUNCTION hmr.list_recognitions_json(text, text, text, text, text, text, boolean, text),
                       public.hmr_list_recognitions(text, text, text, text, text, text, boolean, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION hmr.list_recognitions_json(text, text, text, text, text, text, boolean, text) TO hmr_admin;
GRANT EXECUTE ON FUNCTION public.hmr_list_recognitions(text, text, text, text, text, text, boolean, text)
      TO hmr_his, hmr_admin;

-- A report and its results written in one transaction are one upload, not one per row:
-- hmr.ingest merges events of a record that an earlier pending event already carries.
-- Moves hmr.captured into the outbox in id order, merging redundant events: the worker reads
-- a record's current state after it claims an event, so the record's newest event carries
-- every change committed before its claim. A captured event is merged into the record's newest
-- outbox event when that one is pending and not yet read into a frozen plan; otherwise the
-- events of one record in this batch keep only the newest (which waits behind any earlier
-- event in flight). Never into an older event: one released from quarantine while a later one
-- is in flight would deliver the change and then be superseded by the later, staler one. A
-- LIS that writes a report and its 30 results in one transaction makes 31 events and one
-- upload. Merged events go to the history (outcome 'merged', detail names the event that
-- carries them): every captured event is accounted for. Returns the number of events taken.
CREATE FUNCTION hmr.ingest_captured() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    WITH moved AS (DELETE FROM hmr.captured RETURNING *),
    -- The record's newest event in the outbox (one probe): it carries the captured ones when
    -- pending and unread.
    m AS (
        SELECT moved.*, n.id AS newest,
               coalesce(CASE WHEN n.unread THEN n.id END,
                        max(moved.id) OVER (PARTITION BY moved.kind, moved.key)) AS carrier
          FROM moved
          LEFT JOIN LATERAL (SELECT o.id, o.state = 'pending' AND o.plan IS NULL AS unread
                               FROM hmr.outbox o
                              WHERE o.kind = moved.kind AND o.key = moved.key
                              ORDER BY o.id DESC LIMIT 1) n ON true),
    -- Ids are taken when the HIS writes: a transaction that commits late brings an event
    -- older than one of its record already in the outbox (claimed, or with a frozen plan).
    -- It is numbered anew, after it, so the record's events go in the order they arrived.
    carriers AS (
        SELECT m.id, CASE WHEN m.newest > m.id THEN nextval('hmr.event_id_seq') ELSE m.id END AS new_id
          FROM m WHERE m.id = m.carrier),
    merged AS (
        INSERT INTO hmr.outbox_history (id, kind, key, op, xid, created_at, outcome, attempts, detail)
        SELECT m.id, m.kind, m.key, m.op, m.xid, m.created_at, 'merged', 0,
               'into ' || coalesce(c.new_id, m.carrier)
          FROM m LEFT JOIN carriers c ON c.id = m.carrier WHERE m.id <> m.carrier),
    kept AS (
        INSERT INTO hmr.outbox (id, kind, key, op, xid, created_at)
        SELECT c.new_id, m.kind, m.key, m.op, m.xid, m.created_at
          FROM m JOIN carriers c ON c.id = m.id ORDER BY c.new_id)
    SELECT count(*) INTO n FROM m;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION hmr.ingest() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    IF NOT pg_try_advisory_xact_lock(7166846871) THEN
        RETURN 0;
    END IF;
    n := hmr.ingest_captured();
    IF pg_relation_size('hmr.captured') > 1048576 THEN
        BEGIN
            LOCK TABLE hmr.captured IN ACCESS EXCLUSIVE MODE NOWAIT;
            -- Rows committed since the move above: no writer is left, so these are all.
            n := n + hmr.ingest_captured();
            TRUNCATE hmr.captured;
        EXCEPTION WHEN lock_not_available THEN
            NULL; -- a HIS transaction is capturing: next time
        END;
    END IF;
    RETURN n;
END
$$;
REVOKE ALL ON FUNCTION hmr.ingest_captured() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION hmr.ingest_captured() TO hmr_worker, hmr_admin;

-- Orders recognised on a report revoked at its hospital since (issue #28 §3): the order's state
-- says so (hmr_order_recognition: 'revoked') and hmr.orders_to_perform lists them.
CREATE OR REPLACE VIEW hmr.order_recognitions AS
SELECT d.order_id, d.check_id, d.report_id, d.recognise AS recognised, d.reason_code, d.reason_text,
       d.doctor_no, d.dept_code, d.decided_at,
       EXISTS (SELECT 1 FROM hmr.delivered v WHERE v.kind = 'decision' AND v.key = d.check_id) AS delivered,
       -- the recognised report was revoked at its hospital since (the worker's recheck): the
       -- test is to be performed after all (hmr.orders_to_perform, NOTIFY hmr_report_revoked)
       (SELECT max(r.revoked_at) FROM hmr.retained_reports r WHERE r.report_id = d.report_id) AS revoked_at
FROM hmr.current_decisions d
JOIN hmr.checks c ON c.check_id = d.check_id AND c.refused_at IS NULL;
CREATE VIEW hmr.orders_to_perform AS
SELECT r.order_id, r.check_id, r.report_id, r.doctor_no, r.dept_code, r.decided_at, r.revoked_at
FROM hmr.order_recognitions r
WHERE r.recognised AND r.revoked_at IS NOT NULL;
GRANT SELECT ON hmr.orders_to_perform TO hmr_his;
CREATE OR REPLACE FUNCTION public.hmr_order_recognition(order_id text)
RETURNS jsonb LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(
        (SELECT jsonb_build_object('order_id', r.order_id,
                                   'decision', CASE WHEN r.recognised AND r.revoked_at IS NOT NULL THEN 'revoked'
                                                    WHEN r.recognised THEN 'recognised' ELSE 'declined' END,
                                   'report_id', r.report_id, 'check_id', r.check_id,
                                   'reason_code', r.reason_code, 'decided_at', r.decided_at,
                                   'delivered', r.delivered, 'revoked_at', r.revoked_at)
           FROM hmr.order_recognitions r WHERE r.order_id = $1
          ORDER BY r.decided_at DESC LIMIT 1),
        jsonb_build_object('order_id', $1, 'decision', 'none'))
$$;

-- Doctor-facing hints in Chinese (issue #28 §5): the gate's HM001.
CREATE OR REPLACE FUNCTION hmr.gate() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    guard_query text;
    q text;
    r record;
    answer jsonb;
    undecided jsonb;
    on_unavailable hmr.unavailable_action;
BEGIN
    SELECT g.query INTO guard_query FROM hmr.guarded g WHERE g.tbl::oid = TG_RELID;
    IF guard_query IS NULL THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        -- The guard's rows after the update, less those it gave before (the CTE named
        -- new_rows stands for the old rows), so a status change alone asks nothing.
        q := format('SELECT n.visit, n.orders FROM (%s) n
                      WHERE NOT EXISTS (
                            SELECT 1 FROM (WITH new_rows AS (SELECT * FROM old_rows) SELECT * FROM (%s) g) o
                             WHERE o.visit IS NOT DISTINCT FROM n.visit AND o.orders IS NOT DISTINCT FROM n.orders)',
                    guard_query, guard_query);
    ELSE
        q := guard_query;
    END IF;
    SELECT e.gate_on_unavailable INTO on_unavailable FROM hmr.effective_policy e;
    FOR r IN EXECUTE q LOOP
        answer := public.hmr_check_prescription(r.visit, r.orders);
        IF answer->>'status' = 'unchecked' THEN
            -- A data problem (the patient not at the platform yet, …) never stops care.
            RAISE WARNING 'hmr: the platform did not check this prescription (%); saved (check %)',
                answer->>'reason', answer->>'check_id';
            CONTINUE;
        END IF;
        IF answer->>'status' = 'unavailable' THEN
            IF on_unavailable = 'block' THEN
                RAISE EXCEPTION '互认平台暂不可用，无法完成互认校验，请稍后再保存'
                    USING ERRCODE = 'HM002', DETAIL = answer::text,
                          HINT = '本院设置为平台不可用时不保存（hmr.policy）；请稍后再试，或联系信息科。';
            END IF;
            RAISE WARNING 'hmr: the platform is unavailable; saved without the mutual-recognition check (check %)',
                answer->>'check_id';
            CONTINUE;
        END IF;
        undecided := hmr.undecided(answer->'matches');
        -- Decisions the doctor took on the platform's page (of the previous refusal) count.
        IF undecided IS NOT NULL AND hmr.learn_page_decisions(undecided) > 0 THEN
            undecided := hmr.undecided(answer->'matches');
        END IF;
        IF undecided IS NOT NULL THEN
            -- Kept whatever becomes of this transaction (the refusal rolls it back).
            PERFORM hmr.keep_prompt(answer->>'check_id', undecided);
            RAISE EXCEPTION '存在可互认的检查检验结果，请选择"互认"或"不互认"后再保存'
                USING ERRCODE = 'HM001',
                      DETAIL = jsonb_build_object('check_id', answer->>'check_id', 'url', answer->>'url',
                                                  'matches', undecided)::text,
                      HINT = '请为每条医嘱选择：互认 SELECT hmr_record_decision(check_id, order_id, true)；'
                             '不互认 SELECT hmr_record_decision(check_id, order_id, false, 原因代码, 原因说明)；'
                             '然后再次保存。';
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

-- 0.3.0: one function records a page decision, for the worker and the extension alike.
-- A decision the doctor took on the platform's page (contract §6), recorded once: the worker
-- (before it uploads a check's decisions) and the extension (when the HIS asks) both learn the
-- page through this one function. Nothing is recorded when the order's current decision is
-- already this one (same choice and reason). Returns 1 when recorded, 0 otherwise.
CREATE FUNCTION hmr.adopt_page_decision(p_check text, p_order text, p_report text, p_recognise boolean,
                                        p_reason_code text, p_reason_text text, p_doctor_no text,
                                        p_decided_at timestamptz)
RETURNS integer LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH ins AS (
        INSERT INTO hmr.decisions (check_id, order_id, report_id, recognise, reason_code, reason_text,
                                   doctor_no, dept_code, decided_at, source)
        SELECT p_check, p_order, p_report, p_recognise, p_reason_code, p_reason_text,
               coalesce(nullif(p_doctor_no, ''), c.doctor_no), coalesce(c.dept_code, ''), p_decided_at, 'page'
          FROM hmr.checks c
         WHERE c.check_id = p_check
           AND NOT EXISTS (SELECT 1 FROM hmr.current_decisions x
                            WHERE x.check_id = p_check AND x.order_id = p_order AND x.report_id = p_report
                              AND x.recognise = p_recognise AND x.reason_code IS NOT DISTINCT FROM p_reason_code)
        RETURNING 1)
    SELECT count(*)::integer FROM ins
$$;
REVOKE ALL ON FUNCTION hmr.adopt_page_decision(text, text, text, boolean, text, text, text, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION hmr.adopt_page_decision(text, text, text, boolean, text, text, text, timestamptz) TO hmr_worker, hmr_admin;

-- ===================================================================== serve's used token ids
-- Issue #29 J8: `hmr-worker serve` claims each verified token's jti here, so a token replayed
-- after serve restarts is refused too (a token lives five minutes; its row a little longer).
CREATE TABLE hmr.serve_jti (
    iss        text NOT NULL,
    jti        text NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (iss, jti)
);

-- True when the terminal's jti was not used before. Now and then rows of long-expired tokens
-- go (ten minutes late: serve's clock may lag the database's, and serve refuses an expired
-- token on its own).
CREATE FUNCTION hmr.claim_jti(p_iss text, p_jti text, p_expires_at timestamptz)
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    claimed integer;
BEGIN
    IF random() < 0.01 THEN
        DELETE FROM hmr.serve_jti WHERE expires_at < now() - interval '10 minutes';
    END IF;
    INSERT INTO hmr.serve_jti (iss, jti, expires_at) VALUES (p_iss, p_jti, p_expires_at)
        ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS claimed = ROW_COUNT;
    RETURN claimed = 1;
END
$$;
REVOKE ALL ON hmr.serve_jti FROM PUBLIC;
REVOKE ALL ON FUNCTION hmr.claim_jti(text, text, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION hmr.claim_jti(text, text, timestamptz) TO hmr_his, hmr_admin;
-- (end of issue #29 J8)

-- 0.3.0: the list marks reports decided here; serve shows a patient's orders to perform.
-- The list marks its reports with this hospital's decisions (by report); a patient's
-- orders to perform are found by patient.
CREATE INDEX decisions_report_idx ON hmr.decisions (report_id);
CREATE INDEX checks_patient_idx ON hmr.checks (patient_id);

-- One patient's orders to perform after all (hmr.orders_to_perform, for that patient only):
-- what serve's widget shows beside the patient's list. Reads that patient's checks alone.
CREATE FUNCTION hmr.patient_orders_to_perform(p_patient_id text)
RETURNS TABLE (order_id text, report_id text, item_name text, revoked_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT d.order_id, d.report_id,
           (SELECT coalesce(o->>'item_name', o->>'item_code') FROM jsonb_array_elements(c.orders) o
             WHERE o->>'order_id' = d.order_id LIMIT 1),
           r.revoked_at
      FROM hmr.checks c
      JOIN hmr.decisions d ON d.check_id = c.check_id AND d.recognise
      JOIN LATERAL (SELECT max(k.revoked_at) AS revoked_at FROM hmr.retained_reports k
                     WHERE k.report_id = d.report_id) r ON r.revoked_at IS NOT NULL
     WHERE c.patient_id = p_patient_id AND c.refused_at IS NULL
       AND NOT EXISTS (SELECT 1 FROM hmr.decisions n
                        WHERE n.check_id = d.check_id AND n.order_id = d.order_id AND n.id > d.id)
     ORDER BY r.revoked_at DESC, d.order_id
$$;
REVOKE ALL ON FUNCTION hmr.patient_orders_to_perform(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION hmr.patient_orders_to_perform(text) TO hmr_his, hmr_admin;

-- 0.3.0: a HIS login reads what was decided per order, never who decided (issue #29 R5).
REVOKE SELECT ON hmr.decisions, hmr.current_decisions, hmr.order_recognitions, hmr.orders_to_perform FROM hmr_his;
GRANT SELECT (order_id, check_id, report_id, recognised, reason_code, reason_text, decided_at, delivered, revoked_at)
      ON hmr.order_recognitions TO hmr_his;
GRANT SELECT (order_id, check_id, report_id, decided_at, revoked_at) ON hmr.orders_to_perform TO hmr_his;

-- 0.3.0: 职称 words → GB/T 8561-2001 codes (hmr.code('title', …)); titleCode is checked.
INSERT INTO hmr.code_map (domain, word, code, builtin)
SELECT d, w, c, true FROM (VALUES
    ('title', '主任医师', '231'), ('title', '副主任医师', '232'), ('title', '主治医师', '233'), ('title', '医师', '234'),
    ('title', '住院医师', '234'), ('title', '医士', '235'),
    ('title', '主任药师', '241'), ('title', '副主任药师', '242'), ('title', '主管药师', '243'), ('title', '药师', '244'),
    ('title', '药士', '245'),
    ('title', '主任护师', '251'), ('title', '副主任护师', '252'), ('title', '主管护师', '253'), ('title', '护师', '254'),
    ('title', '护士', '255'),
    ('title', '主任技师', '261'), ('title', '副主任技师', '262'), ('title', '主管技师', '263'), ('title', '技师', '264'),
    ('title', '技士', '265'),
    ('title', '主任检验师', '261'), ('title', '副主任检验师', '262'), ('title', '主管检验师', '263'), ('title', '检验师', '264'),
    ('title', '检验士', '265')
) AS v(d, w, c)
ON CONFLICT (domain, word) DO NOTHING;

-- 0.3.0: the marks of a patient's list (serve's widget).
-- This hospital's decision on each of these reports: recognised when an order's current
-- decision (of a check the platform did not refuse) recognises it (it may be downloaded), else
-- declined. For a screen that marks a patient's list (serve's widget): kept out of
-- hmr_list_recognitions, the reception's hot path.
CREATE FUNCTION hmr.report_marks(report_ids text[])
RETURNS TABLE (report_id text, decided text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT d.report_id, CASE WHEN bool_or(d.recognise) THEN 'recognised' ELSE 'declined' END
      FROM hmr.decisions d
     WHERE d.report_id = ANY (report_ids)
       AND NOT EXISTS (SELECT 1 FROM hmr.decisions n
                        WHERE n.check_id = d.check_id AND n.order_id = d.order_id AND n.id > d.id)
       AND NOT EXISTS (SELECT 1 FROM hmr.checks c WHERE c.check_id = d.check_id AND c.refused_at IS NOT NULL)
     GROUP BY d.report_id
$$;
REVOKE ALL ON FUNCTION hmr.report_marks(text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION hmr.report_marks(text[]) TO hmr_his, hmr_admin;


-- The reports delivered lately, which each poll of a report source asks its view for.
CREATE INDEX delivered_reports_recent_idx ON hmr.delivered (kind, delivered_at)
    WHERE kind IN ('lab_report', 'exam_report');
