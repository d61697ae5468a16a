-- hmr: the objects CREATE EXTENSION installs (schema hmr). SQL lives here, Rust only where
-- it must (validation shared with the worker). Comments say why, not what.

-- Kinds of record the platform receives, and the DBA-owned source view each is read from
-- at drain time. DBAs may point source_view at another view; the columns are documented
-- in the README (and checked by hmr.check_sources()).
CREATE TABLE hmr.kinds (
    kind           text PRIMARY KEY,
    source_view    text NOT NULL,
    key_column     text NOT NULL,
    item_view      text,
    batched        boolean NOT NULL,
    -- the column a backfill's `since` filters on
    changed_column text,
    description    text NOT NULL,
    -- a report whose local item code has no mapping in hmr.item_map: 'hold' it until the code
    -- is mapped (then it goes by itself), or 'send' it without a platform code (shared but
    -- never recognised; sent again with the code once mapped) (0.3.0)
    unmapped       text NOT NULL DEFAULT 'hold',
    CONSTRAINT kinds_unmapped_check CHECK (unmapped IN ('hold', 'send'))
);
INSERT INTO hmr.kinds VALUES
    ('patient',     'hmr_src.patient',     'patient_id', NULL,               true,  'updated_at',  '患者信息'),
    ('department',  'hmr_src.department',  'dept_code',  NULL,               true,  'updated_at',  '科室字典'),
    ('staff',       'hmr_src.staff',       'staff_no',   NULL,               true,  'updated_at',  '人员字典'),
    ('lab_report',  'hmr_src.lab_report',  'report_no',  'hmr_src.lab_item', false, 'reported_at', '检验报告'),
    ('exam_report', 'hmr_src.exam_report', 'report_no',  NULL,               false, 'reported_at', '检查报告'),
    ('decision',    'hmr.decisions',       'check_id',   NULL,               false, NULL,          '互认/不互认结果');
-- Kinds are dumped with the database (a DBA may point a kind at another view). A restore
-- loads them into the rows CREATE EXTENSION made: an insert of a kind that exists updates it.
CREATE FUNCTION hmr.kinds_restore() RETURNS trigger LANGUAGE plpgsql AS $$
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
CREATE TRIGGER kinds_restore BEFORE INSERT ON hmr.kinds FOR EACH ROW EXECUTE FUNCTION hmr.kinds_restore();

-- Code maps: the words hospitals use for coded fields (性别 男/女, 门诊/住院, 在用/停用, 偏高/↑ …)
-- → the platform's codes, for source views: `hmr.code('gender', p.xb) AS gender_code`. The
-- built-in rows cover common Chinese HIS words; a DBA adds the hospital's own (builtin false,
-- dumped with the database).
CREATE TABLE hmr.code_map (
    domain   text NOT NULL,
    word     text NOT NULL,   -- compared trimmed and case-insensitively
    code     text NOT NULL,
    builtin  boolean NOT NULL DEFAULT false,
    PRIMARY KEY (domain, word)
);
INSERT INTO hmr.code_map (domain, word, code, builtin)
SELECT d, w, c, true FROM (VALUES
    ('gender', '男', '1'), ('gender', '男性', '1'), ('gender', 'm', '1'), ('gender', 'male', '1'), ('gender', '1', '1'),
    ('gender', '女', '2'), ('gender', '女性', '2'), ('gender', 'f', '2'), ('gender', 'female', '2'), ('gender', '2', '2'),
    ('gender', '未知', '0'), ('gender', '未知的性别', '0'), ('gender', 'u', '0'), ('gender', 'unknown', '0'), ('gender', '0', '0'),
    ('gender', '未说明', '9'), ('gender', '未说明的性别', '9'), ('gender', '9', '9'),
    ('id_type', '身份证', '01'), ('id_type', '居民身份证', '01'), ('id_type', '1', '01'), ('id_type', '01', '01'),
    ('id_type', '护照', '02'), ('id_type', '02', '02'),
    ('id_type', '港澳通行证', '03'), ('id_type', '港澳居民来往内地通行证', '03'), ('id_type', '回乡证', '03'), ('id_type', '03', '03'),
    ('id_type', '台胞证', '04'), ('id_type', '台湾居民来往大陆通行证', '04'), ('id_type', '04', '04'),
    ('id_type', '其他', '99'), ('id_type', '99', '99'),
    ('visit_type', '门诊', '1'), ('visit_type', 'o', '1'), ('visit_type', '1', '1'),
    ('visit_type', '急诊', '2'), ('visit_type', 'e', '2'), ('visit_type', '2', '2'),
    ('visit_type', '住院', '3'), ('visit_type', 'i', '3'), ('visit_type', '3', '3'),
    ('visit_type', '体检', '4'), ('visit_type', 'p', '4'), ('visit_type', '4', '4'),
    ('active', '在用', '1'), ('active', '启用', '1'), ('active', '有效', '1'), ('active', '正常', '1'),
    ('active', 'y', '1'), ('active', 'true', '1'), ('active', 't', '1'), ('active', '1', '1'),
    ('active', '停用', '0'), ('active', '禁用', '0'), ('active', '无效', '0'), ('active', '作废', '0'),
    ('active', 'n', '0'), ('active', 'false', '0'), ('active', 'f', '0'), ('active', '0', '0'),
    ('abnormal_flag', '正常', '1'), ('abnormal_flag', 'n', '1'), ('abnormal_flag', '1', '1'),
    ('abnormal_flag', '偏高', '2'), ('abnormal_flag', '高', '2'), ('abnormal_flag', 'h', '2'), ('abnormal_flag', '↑', '2'), ('abnormal_flag', '2', '2'),
    ('abnormal_flag', '偏低', '3'), ('abnormal_flag', '低', '3'), ('abnormal_flag', 'l', '3'), ('abnormal_flag', '↓', '3'), ('abnormal_flag', '3', '3'),
    ('abnormal_flag', '异常', '4'), ('abnormal_flag', '阳性', '4'), ('abnormal_flag', 'a', '4'), ('abnormal_flag', '+', '4'), ('abnormal_flag', '4', '4'),
    ('role', '医生', 'doctor'), ('role', '医师', 'doctor'), ('role', '技师', 'technician'), ('role', '技术员', 'technician'),
    ('role', '护士', 'nurse'), ('role', '药师', 'pharmacist'), ('role', '其他', 'other'),
    ('exam_class', 'ct', 'CT'), ('exam_class', 'mr', 'MR'), ('exam_class', 'mri', 'MR'), ('exam_class', '磁共振', 'MR'),
    ('exam_class', 'dr', 'DR'), ('exam_class', 'cr', 'DR'), ('exam_class', 'x线', 'DR'), ('exam_class', '放射', 'DR'),
    ('exam_class', 'us', 'US'), ('exam_class', '超声', 'US'), ('exam_class', 'b超', 'US'), ('exam_class', '彩超', 'US'),
    ('exam_class', 'es', 'ES'), ('exam_class', '内镜', 'ES'), ('exam_class', '胃镜', 'ES'), ('exam_class', '肠镜', 'ES'),
    ('exam_class', 'ecg', 'ECG'), ('exam_class', '心电', 'ECG'), ('exam_class', '心电图', 'ECG'),
    ('exam_class', 'nm', 'NM'), ('exam_class', '核医学', 'NM'), ('exam_class', 'path', 'PATH'), ('exam_class', '病理', 'PATH'),
    ('exam_class', 'other', 'OTHER'), ('exam_class', '其他', 'OTHER')
) AS v(d, w, c);
SELECT pg_catalog.pg_extension_config_dump('hmr.code_map', 'WHERE NOT builtin');

-- The platform's code for a hospital's word (or code); an unknown word comes back as it is,
-- so hmr.check_sources() names it with the allowed codes. NULL and '' stay NULL.
CREATE FUNCTION hmr.code(domain text, value text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN nullif(trim(value), '') IS NULL THEN NULL
                ELSE coalesce((SELECT m.code FROM hmr.code_map m
                                WHERE m.domain = code.domain AND m.word = lower(trim(value))),
                              trim(value)) END
$$;
-- Numbers and other types (a smallint sex column): the same, on their text.
CREATE FUNCTION hmr.code(domain text, value anyelement) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT hmr.code(domain, value::text)
$$;

-- A yes/no flag from the words and numbers HIS tables use (是/否, Y/N, 1/0, true/false, 阳性).
CREATE FUNCTION hmr.flag(value text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE lower(trim(value))
             WHEN '是' THEN true WHEN 'y' THEN true WHEN 'yes' THEN true WHEN '1' THEN true
             WHEN 't' THEN true WHEN 'true' THEN true WHEN '阳性' THEN true WHEN '危急' THEN true
             WHEN '否' THEN false WHEN 'n' THEN false WHEN 'no' THEN false WHEN '0' THEN false
             WHEN 'f' THEN false WHEN 'false' THEN false WHEN '阴性' THEN false WHEN '' THEN false
           END
$$;
CREATE FUNCTION hmr.flag(value anyelement) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT hmr.flag(value::text)
$$;

-- Event ids: one sequence for every way an event is made (capture trigger, hand enqueue,
-- backfill, polling), so the per-record order is the order of these ids.
CREATE SEQUENCE hmr.event_id_seq;

-- What the capture trigger writes inside the HIS transaction: which record changed and how,
-- nothing else. Append-only with no index and no constraint on purpose (the trigger writes
-- straight into the heap, and an index would cost the HIS transaction); the worker moves
-- the rows into hmr.outbox in batches (hmr.ingest()).
CREATE TABLE hmr.captured (
    id          bigint NOT NULL,
    kind        text NOT NULL,
    key         text NOT NULL,
    -- I insert, U update, D delete
    op          "char" NOT NULL,
    xid         xid8 NOT NULL,
    created_at  timestamptz NOT NULL
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000);

-- The outbox: events being delivered, with their delivery state.
CREATE TABLE hmr.outbox (
    id               bigint PRIMARY KEY DEFAULT nextval('hmr.event_id_seq'),
    kind             text NOT NULL,
    key              text NOT NULL,
    -- I insert, U update, D delete (captured); S sync (enqueued by hand, backfill, dependency);
    -- P polled
    op               "char" NOT NULL,
    xid              xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- delivery progress: written by the worker only
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'claimed', 'quarantined')),
    attempts         integer NOT NULL DEFAULT 0,
    -- bumped when a DBA retries a quarantined event, so the retry gets fresh request ids
    generation       integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT '-infinity',
    lease_owner      text,
    lease_until      timestamptz,
    -- the requests frozen at first build, resent byte for byte on every retry; a PDF body
    -- is kept in plan_pdf as it is (not hex inside the jsonb)
    plan             jsonb,
    plan_pdf         bytea,
    step             integer NOT NULL DEFAULT 0,
    last_error       text,
    error_field      text,
    error_reason     text,
    failed_at        timestamptz,
    -- claimed ahead of the others (hmr.hurry: a doctor is waiting for it)
    urgent           boolean NOT NULL DEFAULT false,
    -- a quarantined event waiting for another record (a report for its patient, staff for
    -- their department): released by the worker once that record is delivered (0.3.0)
    waits_for_kind   text,
    waits_for_key    text,
    CONSTRAINT outbox_waits_for_both CHECK ((waits_for_kind IS NULL) = (waits_for_key IS NULL))
);
CREATE INDEX outbox_urgent_idx ON hmr.outbox (id) WHERE urgent;
CREATE INDEX outbox_waits_for_idx ON hmr.outbox (waits_for_kind, waits_for_key) WHERE waits_for_kind IS NOT NULL;
-- Per-record order: an event waits while an earlier one of the same record is unfinished.
CREATE INDEX outbox_record_idx ON hmr.outbox (kind, key, id);
-- PDFs are compressed already: store them without trying again.
ALTER TABLE hmr.outbox ALTER COLUMN plan_pdf SET STORAGE EXTERNAL;
ALTER TABLE hmr.outbox SET (fillfactor = 70);

-- Finished events, kept for audit; the worker moves them here in the statement that
-- finishes them, so the hot table stays small.
CREATE TABLE hmr.outbox_history (
    id           bigint PRIMARY KEY,
    kind         text NOT NULL,
    key          text NOT NULL,
    op           "char" NOT NULL,
    xid          xid8 NOT NULL,
    created_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT now(),
    -- delivered | unchanged | skipped | discarded | superseded | merged
    outcome      text NOT NULL,
    version      integer,
    attempts     integer NOT NULL,
    detail       text
);
CREATE INDEX outbox_history_finished_idx ON hmr.outbox_history (finished_at);

-- What the platform holds of each record, as far as we know.
CREATE TABLE hmr.delivered (
    kind          text NOT NULL,
    key           text NOT NULL,
    version       integer NOT NULL,
    content_hash  text NOT NULL,
    revoked       boolean NOT NULL DEFAULT false,
    delivered_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, key)
);

-- Workers waiting for work, for operators (hmr.status). The wake-up itself is a flag in
-- shared memory (hmr.worker_sleeping()), which the capture trigger reads with one atomic load.
CREATE UNLOGGED TABLE hmr.sleepers (
    worker  text PRIMARY KEY,
    until   timestamptz NOT NULL
);

-- The capture trigger (Rust, src/capture.rs). Arguments: kind, key column. It appends which
-- row changed to hmr.captured and nothing else; HIS roles need no rights on hmr's tables.
CREATE FUNCTION hmr.capture() RETURNS trigger LANGUAGE c AS 'MODULE_PATHNAME', 'hmr_capture';

-- Moves captured events into the outbox (the worker calls this before it claims). One mover
-- at a time, so ids enter the outbox in order; a second caller returns 0 at once. Deleted rows
-- stay in the heap until VACUUM, and every move scans them: once the table has grown past
-- 1 MB it is emptied with TRUNCATE instead (PgQ's rotation, in one table), but only when no
-- HIS transaction is writing it at that instant (NOWAIT): capture never waits on a worker for
-- longer than this transaction.
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
    m AS (
        SELECT moved.*,
               coalesce((SELECT CASE WHEN o.state = 'pending' AND o.plan IS NULL THEN o.id END
                           FROM hmr.outbox o
                          WHERE o.kind = moved.kind AND o.key = moved.key
                          ORDER BY o.id DESC LIMIT 1),
                        max(moved.id) OVER (PARTITION BY moved.kind, moved.key)) AS carrier
          FROM moved),
    merged AS (
        INSERT INTO hmr.outbox_history (id, kind, key, op, xid, created_at, outcome, attempts, detail)
        SELECT id, kind, key, op, xid, created_at, 'merged', 0, 'into ' || carrier
          FROM m WHERE id <> carrier),
    kept AS (
        INSERT INTO hmr.outbox (id, kind, key, op, xid, created_at)
        SELECT id, kind, key, op, xid, created_at FROM m WHERE id = carrier ORDER BY id)
    SELECT count(*) INTO n FROM m;
    RETURN n;
END
$$;

CREATE FUNCTION hmr.ingest() RETURNS integer
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

-- A worker's claim, in one round trip: say whether it is about to sleep (then a capture
-- wakes it with a NOTIFY), move captured events into the outbox, and take the oldest
-- eligible events with a lease: pending and due (or claimed with an expired lease), and the
-- earliest unfinished event of their record, so each record's events go in order.
CREATE FUNCTION hmr.claim(worker_id text, kinds text[], max_events integer, lease_seconds float8,
                          going_to_sleep boolean DEFAULT false, sleep_seconds float8 DEFAULT 1)
RETURNS TABLE (id bigint, kind text, key text, attempts integer, generation integer, plan jsonb, step integer,
               plan_pdf bytea)
LANGUAGE plpgsql AS $$
BEGIN
    IF going_to_sleep THEN
        INSERT INTO hmr.sleepers AS s (worker, until)
        VALUES (worker_id, now() + make_interval(secs => sleep_seconds))
        ON CONFLICT (worker) DO UPDATE SET until = EXCLUDED.until;
        PERFORM hmr.worker_sleeping();
    ELSE
        DELETE FROM hmr.sleepers s WHERE s.worker = worker_id;
    END IF;
    PERFORM hmr.ingest();
    RETURN QUERY
    WITH u AS (
        -- what a doctor is waiting for first (hmr.hurry; usually none)
        SELECT o.id FROM hmr.outbox o
         WHERE o.urgent AND o.state = 'pending' AND o.next_attempt_at <= now()
           AND o.kind = ANY (kinds)
           AND NOT EXISTS (SELECT 1 FROM hmr.outbox e
                            WHERE e.kind = o.kind AND e.key = o.key AND e.id < o.id
                              AND e.state <> 'quarantined')
         ORDER BY o.id
         LIMIT max_events
         FOR UPDATE OF o SKIP LOCKED),
    r AS (
        SELECT o.id FROM hmr.outbox o
         WHERE ((o.state = 'pending' AND o.next_attempt_at <= now())
                OR (o.state = 'claimed' AND o.lease_until < now()))
           AND o.kind = ANY (kinds)
           AND NOT EXISTS (SELECT 1 FROM hmr.outbox e
                            WHERE e.kind = o.kind AND e.key = o.key AND e.id < o.id
                              AND e.state <> 'quarantined')
         ORDER BY o.id
         LIMIT max_events
         FOR UPDATE OF o SKIP LOCKED),
    c AS (
        SELECT x.id FROM (SELECT u.id, 0 AS rank FROM u UNION ALL SELECT r.id, 1 FROM r) x
         GROUP BY x.id ORDER BY min(x.rank), x.id LIMIT max_events)
    UPDATE hmr.outbox o
       SET state = 'claimed', lease_owner = worker_id, attempts = o.attempts + 1,
           lease_until = now() + make_interval(secs => lease_seconds)
      FROM c WHERE o.id = c.id
    RETURNING o.id, o.kind, o.key, o.attempts, o.generation, o.plan, o.step, o.plan_pdf;
END
$$;

-- Attach capture to a HIS table. `update_when` filters updates (one boolean expression over
-- OLD and NEW, e.g. 'OLD.status IS DISTINCT FROM NEW.status'); inserts and deletes always
-- count. The expression is parsed and checked to be exactly one expression before it is
-- written into the trigger's WHEN clause (hmr.check_update_when), never spliced unchecked.
CREATE FUNCTION hmr.watch(kind text, tbl regclass, key_column name, update_when text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql SET client_min_messages = warning AS $$
DECLARE
    trigger_name text := 'hmr_capture_' || kind;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM hmr.kinds k WHERE k.kind = watch.kind) THEN
        RAISE EXCEPTION 'hmr: unknown kind "%"', kind
            USING ERRCODE = 'HM010', HINT = 'Kinds are listed in hmr.kinds.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = tbl AND a.attname = key_column
                   AND a.attnum > 0 AND NOT a.attisdropped) THEN
        RAISE EXCEPTION 'hmr: table % has no column "%"', tbl, key_column
            USING ERRCODE = 'HM011';
    END IF;
    IF update_when IS NOT NULL THEN
        BEGIN
            PERFORM hmr.check_update_when(update_when);
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'hmr: update_when refused: %', SQLERRM USING ERRCODE = 'HM014',
                HINT = 'One boolean expression over OLD and NEW, e.g. ''OLD.status IS DISTINCT FROM NEW.status''.';
        END;
    END IF;
    PERFORM hmr.unwatch(kind, tbl);
    IF update_when IS NULL THEN
        EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON %s '
                       'FOR EACH ROW EXECUTE FUNCTION hmr.capture(%L, %L)',
                       trigger_name, tbl, kind, key_column);
    ELSE
        -- The same "(\n…\n)" wrapping hmr.check_update_when parsed; first, so that an
        -- expression PostgreSQL refuses in WHEN (a subquery, another table) leaves nothing.
        EXECUTE format(E'CREATE TRIGGER %I AFTER UPDATE ON %s FOR EACH ROW WHEN (\n%s\n) '
                       'EXECUTE FUNCTION hmr.capture(%L, %L)',
                       trigger_name || '_upd', tbl, update_when, kind, key_column);
        EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR DELETE ON %s '
                       'FOR EACH ROW EXECUTE FUNCTION hmr.capture(%L, %L)',
                       trigger_name, tbl, kind, key_column);
    END IF;
    RETURN format('%s changes of %s are captured as %s', tbl, key_column, kind);
END
$$;

CREATE FUNCTION hmr.unwatch(kind text, tbl regclass) RETURNS void
LANGUAGE plpgsql SET client_min_messages = warning AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'hmr_capture_' || kind, tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'hmr_capture_' || kind || '_upd', tbl);
END
$$;

-- What is watched: one row per capture trigger, with the events it really fires on.
CREATE VIEW hmr.watches AS
SELECT t.tgrelid::regclass AS tbl,
       (string_to_array(encode(t.tgargs, 'escape'), '\000'))[1] AS kind,
       (string_to_array(encode(t.tgargs, 'escape'), '\000'))[2] AS key_column,
       concat_ws(', ', CASE WHEN t.tgtype & 4 <> 0 THEN 'insert' END,
                       CASE WHEN t.tgtype & 16 <> 0 THEN 'update' END,
                       CASE WHEN t.tgtype & 8 <> 0 THEN 'delete' END) AS events,
       substring(pg_get_triggerdef(t.oid) FROM 'WHEN \((.*)\) EXECUTE') AS update_when,
       t.tgenabled IN ('O', 'A') AS enabled
FROM pg_trigger t
WHERE t.tgfoid = 'hmr.capture()'::regprocedure AND NOT t.tgisinternal;

-- A record the platform needs now (a doctor's check found the patient missing): its
-- waiting event is due at once and claimed ahead of the queue, or one is enqueued so.
CREATE FUNCTION hmr.hurry(kind text, key text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found_id bigint;
BEGIN
    UPDATE hmr.outbox o SET urgent = true, next_attempt_at = '-infinity'
     WHERE o.id = (SELECT min(e.id) FROM hmr.outbox e
                    WHERE e.kind = hurry.kind AND e.key = hurry.key AND e.state = 'pending')
    RETURNING o.id INTO found_id;
    IF found_id IS NULL AND NOT EXISTS (SELECT 1 FROM hmr.outbox o WHERE o.kind = hurry.kind AND o.key = hurry.key) THEN
        INSERT INTO hmr.outbox (kind, key, op, urgent) VALUES (hurry.kind, hurry.key, 'S', true) RETURNING id INTO found_id;
    END IF;
    PERFORM hmr.wake_workers();
    RETURN found_id;
END
$$;

-- On a hot standby (doctors' read-only screens are often pointed at one) the calls that only
-- read work — the badge, the list, the precise query, an order's decision — and those that
-- record (a check, a decision, a download) stop here with HM016, before asking the platform.
CREATE FUNCTION hmr.need_primary(what text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF pg_is_in_recovery() THEN
        RAISE EXCEPTION '当前连接的是只读备库，%需要连接主库', what
            USING ERRCODE = 'HM016',
                  HINT = 'Connect this call to the primary: a multi-host connection string with target_session_attrs=read-write, or the HIS''s read-write data source.';
    END IF;
END
$$;

-- Enqueue a record by hand (resend after a fix, backfill): the same path as a trigger.
CREATE FUNCTION hmr.enqueue(kind text, key text) RETURNS bigint
LANGUAGE sql AS $$
    INSERT INTO hmr.outbox (kind, key, op) VALUES (kind, key, 'S') RETURNING id
$$;

-- Quarantined events: what the platform (or our own validation) refused, and why.
-- `error_field` names the column of the source view when it can.
CREATE VIEW hmr.quarantine AS
SELECT id, kind, key, error_field, error_reason, last_error, attempts, created_at, failed_at,
       waits_for_kind, waits_for_key
FROM hmr.outbox
WHERE state = 'quarantined';

-- Backlog per kind, for operators.
-- Captured events not yet moved into the outbox count as pending.
CREATE VIEW hmr.backlog AS
SELECT kind,
       count(*) FILTER (WHERE state = 'pending')     AS pending,
       count(*) FILTER (WHERE state = 'claimed')     AS in_flight,
       count(*) FILTER (WHERE state = 'quarantined') AS quarantined,
       min(created_at) FILTER (WHERE state <> 'quarantined') AS oldest
FROM (SELECT kind, state, created_at FROM hmr.outbox
      UNION ALL
      SELECT kind, 'pending', created_at FROM hmr.captured) e
GROUP BY kind;

-- Send a quarantined event again after the source is fixed: rebuilt from the source
-- view, with fresh request ids (the platform remembers its first answer to the old ones).
CREATE FUNCTION hmr.retry(event_id bigint) RETURNS void
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

CREATE FUNCTION hmr.retry_kind(kind text) RETURNS bigint
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

-- Give up on a quarantined event, with the reason, keeping it in the history.
CREATE FUNCTION hmr.discard(event_id bigint, reason text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(trim(reason), '') = '' THEN
        RAISE EXCEPTION 'hmr: a reason is required to discard an event' USING ERRCODE = 'HM021';
    END IF;
    WITH d AS (DELETE FROM hmr.outbox WHERE id = event_id AND state = 'quarantined' RETURNING *)
    INSERT INTO hmr.outbox_history (id, kind, key, op, xid, created_at, outcome, attempts, detail)
    SELECT id, kind, key, op, xid, created_at, 'discarded', attempts,
           format('%s (was: %s %s)', reason, error_field, error_reason)
      FROM d;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'hmr: event % is not quarantined', event_id USING ERRCODE = 'HM020';
    END IF;
END
$$;

-- Backfills: the day a hospital connects, every existing record goes through the same outbox
-- (so ordering, dedupe and quarantine apply). Pages commit with their checkpoint, so an
-- interrupted backfill resumes where it stopped and enqueues nothing twice.
CREATE SEQUENCE hmr.backfill_id_seq;
CREATE TABLE hmr.backfills (
    id           bigint PRIMARY KEY DEFAULT nextval('hmr.backfill_id_seq'),
    kind         text NOT NULL REFERENCES hmr.kinds,
    since        timestamptz,
    total        bigint NOT NULL,
    enqueued     bigint NOT NULL DEFAULT 0,
    last_key     text,
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);

-- Starts a backfill of `kind` (records changed since `since`, or all), or returns the
-- unfinished one with the same arguments so that running it again resumes it.
CREATE FUNCTION hmr.backfill_start(kind text, since timestamptz DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    k hmr.kinds;
    found_id bigint;
    n bigint;
BEGIN
    SELECT * INTO k FROM hmr.kinds WHERE hmr.kinds.kind = backfill_start.kind;
    IF NOT FOUND OR k.changed_column IS NULL THEN
        RAISE EXCEPTION 'hmr: kind "%" cannot be backfilled', kind
            USING ERRCODE = 'HM010', HINT = 'Kinds are listed in hmr.kinds.';
    END IF;
    SELECT b.id INTO found_id FROM hmr.backfills b
     WHERE b.kind = backfill_start.kind AND b.since IS NOT DISTINCT FROM backfill_start.since
       AND b.finished_at IS NULL
     ORDER BY b.id DESC LIMIT 1;
    IF found_id IS NOT NULL THEN
        RETURN found_id;
    END IF;
    EXECUTE format('SELECT count(*) FROM %s v WHERE $1 IS NULL OR v.%I >= $1',
                   k.source_view::regclass, k.changed_column)
       INTO n USING since;
    INSERT INTO hmr.backfills (kind, since, total) VALUES (kind, since, n) RETURNING id INTO found_id;
    RETURN found_id;
END
$$;

-- Enqueues the next page of a backfill (in key order) and moves its checkpoint, in one
-- transaction. Returns how many records it enqueued; 0 means the backfill is finished.
CREATE FUNCTION hmr.backfill_page(backfill_id bigint, page_size integer DEFAULT 5000) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    b hmr.backfills;
    k hmr.kinds;
    key_type text;
    n integer;
    last text;
BEGIN
    SELECT * INTO b FROM hmr.backfills WHERE id = backfill_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'hmr: no backfill %', backfill_id USING ERRCODE = 'HM022';
    END IF;
    IF b.finished_at IS NOT NULL THEN
        RETURN 0;
    END IF;
    SELECT * INTO k FROM hmr.kinds WHERE kind = b.kind;
    -- Page in the key's own type, so the HIS table's index on it can serve the order.
    SELECT format_type(a.atttypid, a.atttypmod) INTO key_type FROM pg_attribute a
     WHERE a.attrelid = k.source_view::regclass AND a.attname = k.key_column;
    EXECUTE format(
        'WITH page AS (
            SELECT v.%1$I AS key FROM %2$s v
             WHERE ($1 IS NULL OR v.%1$I > $1::%3$s) AND ($2 IS NULL OR v.%4$I >= $2)
             ORDER BY v.%1$I LIMIT $3),
         ins AS (INSERT INTO hmr.outbox (kind, key, op) SELECT $4, key::text, ''S'' FROM page ORDER BY key)
         SELECT count(*)::int, (SELECT key::text FROM page ORDER BY key DESC LIMIT 1) FROM page',
        k.key_column, k.source_view::regclass, key_type, k.changed_column)
       INTO n, last USING b.last_key, b.since, page_size, b.kind;
    UPDATE hmr.backfills
       SET enqueued = enqueued + n, last_key = coalesce(last, last_key), updated_at = now(),
           finished_at = CASE WHEN n < page_size THEN now() END
     WHERE id = backfill_id;
    IF n > 0 THEN
        PERFORM hmr.wake_workers();
    END IF;
    RETURN n;
END
$$;

CREATE VIEW hmr.backfill_progress AS
SELECT id, kind, since, enqueued, total,
       round(100.0 * enqueued / nullif(total, 0), 1) AS percent,
       started_at, finished_at,
       CASE WHEN finished_at IS NOT NULL THEN 'finished' ELSE 'unfinished (run it again to resume)' END AS state
FROM hmr.backfills;

-- The recognition catalog (the province's list of recognisable items, with how long a result
-- stays valid). Data, loaded with hmr.load_catalog(csv); never compiled in.
CREATE TABLE hmr.catalog (
    data_code      text PRIMARY KEY,
    type           text NOT NULL CHECK (type IN ('lab', 'exam')),
    name           text NOT NULL,
    validity_days  integer NOT NULL CHECK (validity_days > 0),
    loaded_at      timestamptz NOT NULL DEFAULT now()
);

-- Local item codes (LIS test groups, RIS exam items) → platform catalog items.
CREATE TABLE hmr.item_map (
    type        text NOT NULL CHECK (type IN ('lab', 'exam')),
    local_code  text NOT NULL,
    data_code   text NOT NULL REFERENCES hmr.catalog,
    note        text,
    PRIMARY KEY (type, local_code)
);

-- Reports met with a local item code that had no mapping (one row per report, its latest
-- code). Adding the mapping releases the ones held for it and sends again, as their next
-- version, the ones that went without it (hmr.item_mapped).
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

-- Polled sources: exam systems (RIS, PACS, ultrasound, endoscopy) are often another database
-- or a vendor view the HIS cannot put triggers on. The worker polls each source by a
-- watermark on its audit time. Pairs (key, audit time) already seen are remembered for
-- `lookback`, so equal audit times and rows that arrive late (committed after newer ones were
-- polled) are still picked up, and a re-audit (new audit time) is a new event.
-- A kind may have several sources (one per exam system, each with its own view, delay and
-- watermark): a source's view finds what changed, and the record is read, as every record
-- is, from the kind's view (hmr.kinds.source_view, e.g. a UNION ALL of the systems' views),
-- by its key. So a report number is unique across the kind's sources: where two systems
-- could number alike, both views prefix it (e.g. 'US' || exam_no) (0.3.0: named sources).
CREATE TABLE hmr.polled_sources (
    kind         text NOT NULL REFERENCES hmr.kinds,
    -- NULL: the view has no time column (a dictionary in another database): it is compared in
    -- full, by each row's content hash, every `compare_every`
    time_column  text DEFAULT 'audited_at',
    -- wait this long after audit before uploading (radiologists correct within minutes)
    delay        interval NOT NULL DEFAULT '0',
    -- how late a row may arrive and still be picked up
    lookback     interval NOT NULL DEFAULT '1 day',
    watermark    timestamptz,
    polled_at    timestamptz,
    enabled      boolean NOT NULL DEFAULT true,
    -- the source's name (default: the kind's name, for a kind with one source)
    name         text NOT NULL,
    -- the view polled (default: the kind's view)
    source_view  text,
    -- how often a source without a time column is compared in full
    compare_every interval NOT NULL DEFAULT '15 minutes',
    CONSTRAINT polled_sources_pkey PRIMARY KEY (name)
);
CREATE FUNCTION hmr.polled_source_named() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.name := coalesce(NEW.name, NEW.kind);
    RETURN NEW;
END
$$;
CREATE TRIGGER polled_source_named BEFORE INSERT ON hmr.polled_sources
    FOR EACH ROW EXECUTE FUNCTION hmr.polled_source_named();

-- The content hash of each row of a source compared in full, as last seen.
CREATE TABLE hmr.polled_hashes (
    source      text NOT NULL,
    key         text NOT NULL,
    hash        text NOT NULL,
    -- when a comparison first saw this content: the record's change time (hmr.changed_at)
    changed_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT polled_hashes_pkey PRIMARY KEY (source, key)
);

CREATE TABLE hmr.polled_seen (
    kind       text NOT NULL,
    key        text NOT NULL,
    seen_time  timestamptz NOT NULL,
    source     text NOT NULL,
    CONSTRAINT polled_seen_pkey PRIMARY KEY (source, key, seen_time)
);

-- Polls one source: enqueues rows audited since (watermark - lookback) and at least `delay`
-- ago that were not seen yet; also enqueues reports the platform holds that left the view
-- (withdrawn in the exam system), so they are revoked. Returns the events enqueued.
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
        IF p.polled_at > now() - p.compare_every THEN
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
    -- Withdrawn: held by the platform, recently delivered, no longer in the view (a source
    -- with a view of its own: among the reports this source found).
    EXECUTE format(
        'INSERT INTO hmr.outbox (kind, key, op)
         SELECT d.kind, d.key, ''P'' FROM hmr.delivered d
          WHERE d.kind = $1 AND NOT d.revoked AND d.delivered_at > now() - $2
            AND ($3 IS NULL OR EXISTS (SELECT 1 FROM hmr.polled_seen s WHERE s.source = $4 AND s.key = d.key))
            AND NOT EXISTS (SELECT 1 FROM %1$s v WHERE v.%2$I::text = d.key)
            AND NOT EXISTS (SELECT 1 FROM hmr.outbox o WHERE o.kind = d.kind AND o.key = d.key)',
        polled, k.key_column)
      USING p.kind, p.lookback, p.source_view, p.name;
    GET DIAGNOSTICS gone = ROW_COUNT;
    UPDATE hmr.polled_sources
       SET watermark = greatest(watermark, newest), polled_at = now()
     WHERE name = p.name;
    DELETE FROM hmr.polled_seen
     WHERE source = p.name AND seen_time < greatest(p.watermark, newest) - p.lookback;
    RETURN added + gone;
END
$$;

-- The change time of a record of a source compared in full (one without a time column): when
-- a comparison first saw its current content. A view gives it as updated_at:
-- `hmr.changed_at('his-departments', k.ksdm) AS updated_at`.
CREATE FUNCTION hmr.changed_at(source text, key text) RETURNS timestamptz
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce((SELECT h.changed_at FROM hmr.polled_hashes h WHERE h.source = changed_at.source AND h.key = changed_at.key),
                    now())
$$;

-- Polls every enabled source; the worker calls this on its poll interval.
CREATE FUNCTION hmr.poll_sources() RETURNS integer
LANGUAGE sql AS $$
    SELECT coalesce(sum(hmr.poll_source(name)), 0)::int FROM hmr.polled_sources WHERE enabled
$$;

-- ===================================================================== recognition (互认服务)

-- How SQL functions reach the platform. One row; readable only by the extension's owner:
-- the functions that use it are SECURITY DEFINER. Set it with hmr.configure_platform().
CREATE TABLE hmr.platform (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    base_url    text NOT NULL,
    org_code    text NOT NULL,
    auth        text NOT NULL DEFAULT 'password' CHECK (auth IN ('password', 'signature')),
    username    text,
    password    text,
    app_id      text,
    app_secret  text,
    sign_alg    text NOT NULL DEFAULT 'HMAC-SHA256' CHECK (sign_alg IN ('HMAC-SHA256', 'HMAC-SM3'))
);
REVOKE ALL ON hmr.platform FROM PUBLIC;

CREATE FUNCTION hmr.configure_platform(base_url text, org_code text, username text DEFAULT NULL,
                                       password text DEFAULT NULL, app_id text DEFAULT NULL,
                                       app_secret text DEFAULT NULL, auth text DEFAULT 'password',
                                       sign_alg text DEFAULT 'HMAC-SHA256')
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT hmr.org_code_valid(org_code) THEN
        RAISE EXCEPTION 'hmr: % is not a valid 统一社会信用代码', org_code USING ERRCODE = 'HM012';
    END IF;
    INSERT INTO hmr.platform VALUES (true, base_url, org_code, auth, username, password, app_id, app_secret, sign_alg)
    ON CONFLICT (id) DO UPDATE SET base_url = EXCLUDED.base_url, org_code = EXCLUDED.org_code, auth = EXCLUDED.auth,
        username = EXCLUDED.username, password = EXCLUDED.password, app_id = EXCLUDED.app_id,
        app_secret = EXCLUDED.app_secret, sign_alg = EXCLUDED.sign_alg;
END
$$;

-- Every prescription check, kept (the gate's own check is rolled back with the refused
-- save; hmr_record_decision() keeps it then). `status` ok or unavailable (skipped check).
CREATE TABLE hmr.checks (
    check_id     text PRIMARY KEY,
    status       text NOT NULL,
    patient_id   text,
    id_type      text,
    id_no_masked text,
    visit_type   text,
    visit_no     text,
    doctor_no    text,
    dept_code    text,
    orders       jsonb NOT NULL,
    matches      jsonb NOT NULL DEFAULT '[]',
    url          text,
    checked_at   timestamptz NOT NULL DEFAULT now(),
    checked_by   text NOT NULL DEFAULT session_user,
    -- why the platform was not asked (unavailable) or did not check (unchecked: a data
    -- problem such as a patient not uploaded yet; the save is not stopped for it)
    reason       text,
    -- the platform refused the check's decisions (409: the report was revoked, superseded or
    -- expired since the check): they no longer count; the next save asks again
    refused_at     timestamptz,
    refused_reason text
);

-- Every prompt (提醒): a save the gate refused because a duplicate had no decision. Kept
-- whatever becomes of the refused transaction (written outside it first, see
-- hmr.keep_prompt), so the hospital can count how often doctors were warned.
CREATE TABLE hmr.prompts (
    check_id     text NOT NULL REFERENCES hmr.checks,
    prompted_at  timestamptz NOT NULL,
    -- the matches still without a decision when the save was refused
    undecided    jsonb NOT NULL,
    prompted_by  text NOT NULL,
    PRIMARY KEY (check_id, prompted_at)
);

-- 互认 / 不互认 decisions: an audit trail nobody edits (UPDATE and DELETE refused for all).
-- The newest decision of an order counts until the check's decisions are sent.
CREATE SEQUENCE hmr.decision_id_seq;
CREATE TABLE hmr.decisions (
    id           bigint PRIMARY KEY DEFAULT nextval('hmr.decision_id_seq'),
    check_id     text NOT NULL REFERENCES hmr.checks,
    order_id     text NOT NULL,
    report_id    text NOT NULL,
    recognise    boolean NOT NULL,
    reason_code  text,
    reason_text  text,
    doctor_no    text NOT NULL,
    dept_code    text NOT NULL,
    decided_at   timestamptz NOT NULL DEFAULT now(),
    recorded_by  text NOT NULL DEFAULT session_user,
    -- his (recorded through hmr_record_decision) or page (taken on the platform's page,
    -- learnt from it: not uploaded again)
    source       text NOT NULL DEFAULT 'his' CHECK (source IN ('his', 'page')),
    -- the terminal the doctor decided at (hmr_record_decision's workstation; serve: the
    -- authenticated terminal's name)
    workstation  text
);
CREATE INDEX decisions_order_idx ON hmr.decisions (order_id);
CREATE INDEX decisions_check_idx ON hmr.decisions (check_id);

CREATE FUNCTION hmr.refuse_edit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'hmr: % is an audit trail: rows are never changed or deleted', TG_TABLE_NAME
        USING ERRCODE = 'HM030';
END
$$;
CREATE TRIGGER decisions_append_only BEFORE UPDATE OR DELETE ON hmr.decisions
    FOR EACH ROW EXECUTE FUNCTION hmr.refuse_edit();

CREATE VIEW hmr.current_decisions AS
SELECT DISTINCT ON (check_id, order_id) *
FROM hmr.decisions
ORDER BY check_id, order_id, id DESC;

-- Per order: what the doctor decided and whether the platform has it, so the HIS marks a
-- recognised (互认) order not to be performed. Decisions of a check the platform refused
-- do not count.
CREATE VIEW hmr.order_recognitions AS
SELECT d.order_id, d.check_id, d.report_id, d.recognise AS recognised, d.reason_code, d.reason_text,
       d.doctor_no, d.dept_code, d.decided_at,
       EXISTS (SELECT 1 FROM hmr.delivered v WHERE v.kind = 'decision' AND v.key = d.check_id) AS delivered
FROM hmr.current_decisions d
JOIN hmr.checks c ON c.check_id = d.check_id AND c.refused_at IS NULL;

-- Prompts with who, where, whom, and what followed: decided (a decision for every order
-- prompted, on this or a later check), saved without (a later save went through without the
-- check: platform unavailable or not checking), abandoned (nothing within a day), open.
CREATE VIEW hmr.prompt_log AS
SELECT p.check_id, p.prompted_at,
       CASE c.visit_type WHEN '3' THEN 'inpatient' WHEN '4' THEN 'physical-exam' ELSE 'outpatient-emergency' END
           AS workstation,
       c.doctor_no, c.dept_code, c.patient_id, c.id_no_masked, c.orders, p.undecided,
       CASE
         WHEN NOT EXISTS (SELECT 1 FROM jsonb_array_elements(p.undecided) m
                           WHERE NOT EXISTS (SELECT 1 FROM hmr.decisions d
                                              WHERE d.order_id = m->>'order_id' AND d.decided_at >= p.prompted_at))
           THEN 'decided'
         WHEN EXISTS (SELECT 1 FROM hmr.checks l, jsonb_array_elements(p.undecided) m
                       WHERE l.checked_at > p.prompted_at AND l.status IN ('unavailable', 'unchecked')
                         AND l.orders @> jsonb_build_array(jsonb_build_object('order_id', m->>'order_id')))
           THEN 'saved without'
         WHEN p.prompted_at < now() - interval '1 day' THEN 'abandoned'
         ELSE 'open'
       END AS followed
FROM hmr.prompts p JOIN hmr.checks c USING (check_id);

-- Reports of other hospitals recognised here, downloaded and kept.
CREATE TABLE hmr.retained_reports (
    report_id   text NOT NULL,
    format      text NOT NULL CHECK (format IN ('pdf', 'json')),
    bytes       bytea NOT NULL,
    sha256      text NOT NULL,
    source_org  text,
    check_id    text,
    fetched_at  timestamptz NOT NULL DEFAULT now(),
    fetched_by  text NOT NULL DEFAULT session_user,
    -- the worker asks again on a schedule (worker.recheck_kept_secs): a report revoked at its
    -- source since is never handed out as valid (hmr_download_report: HM009)
    rechecked_at  timestamptz,
    revoked_at    timestamptz,
    revoked_note  text,
    PRIMARY KEY (report_id, format)
);

-- Who read which kept report, when (for the hospital's auditors).
CREATE SEQUENCE hmr.download_log_id_seq;
CREATE TABLE hmr.download_log (
    id         bigint PRIMARY KEY DEFAULT nextval('hmr.download_log_id_seq'),
    report_id  text NOT NULL,
    format     text NOT NULL,
    source     text NOT NULL,          -- kept | platform
    read_by    text NOT NULL DEFAULT session_user,
    read_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER download_log_append_only BEFORE UPDATE OR DELETE ON hmr.download_log
    FOR EACH ROW EXECUTE FUNCTION hmr.refuse_edit();

-- Short-lived answers of the list, so a workstation that polls does not flood the platform.
CREATE UNLOGGED TABLE hmr.list_cache (
    cache_key   text PRIMARY KEY,
    answer      jsonb NOT NULL,
    expires_at  timestamptz NOT NULL
);

-- The hospital's policy for the gate: what it does when the platform cannot be asked, and
-- the hard timeout of a call from SQL. A table, not settings: a saving session cannot SET it
-- over the DBA's choice; values are validated on write (an enum, a range); it is readable
-- before any hmr function ran, and dumped with the database. At most one row (none: the
-- defaults); set with hmr.set_policy() by hmr_admin. hmr.effective_policy is what applies.
CREATE TYPE hmr.unavailable_action AS ENUM ('allow', 'block');
CREATE TABLE hmr.policy (
    id                   boolean PRIMARY KEY DEFAULT true CHECK (id),
    -- allow: save, the skipped check recorded with status unavailable and a WARNING;
    -- block: refuse the save with HM002
    gate_on_unavailable  hmr.unavailable_action NOT NULL DEFAULT 'allow',
    platform_timeout_ms  integer NOT NULL DEFAULT 3000 CHECK (platform_timeout_ms BETWEEN 100 AND 600000),
    changed_at           timestamptz NOT NULL DEFAULT now(),
    changed_by           text NOT NULL DEFAULT session_user
);
SELECT pg_catalog.pg_extension_config_dump('hmr.policy', '');

CREATE VIEW hmr.effective_policy AS
SELECT coalesce(p.gate_on_unavailable, 'allow') AS gate_on_unavailable,
       coalesce(p.platform_timeout_ms, 3000)    AS platform_timeout_ms,
       CASE WHEN p.id IS NULL THEN 'default' ELSE 'hmr.policy' END AS source,
       p.changed_at, p.changed_by
FROM (SELECT true AS one) x LEFT JOIN hmr.policy p ON p.id;

CREATE FUNCTION hmr.set_policy(gate_on_unavailable text DEFAULT NULL, platform_timeout_ms integer DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    action hmr.unavailable_action;
BEGIN
    IF gate_on_unavailable IS NOT NULL THEN
        IF gate_on_unavailable NOT IN ('allow', 'block') THEN
            RAISE EXCEPTION 'hmr: gate_on_unavailable must be allow or block, not "%"', gate_on_unavailable
                USING ERRCODE = '22023';
        END IF;
        action := gate_on_unavailable::hmr.unavailable_action;
    END IF;
    INSERT INTO hmr.policy AS p (id, gate_on_unavailable, platform_timeout_ms)
    VALUES (true, coalesce(action, 'allow'), coalesce(set_policy.platform_timeout_ms, 3000))
    ON CONFLICT (id) DO UPDATE
       SET gate_on_unavailable = coalesce(action, p.gate_on_unavailable),
           platform_timeout_ms = coalesce(set_policy.platform_timeout_ms, p.platform_timeout_ms),
           changed_at = now(), changed_by = session_user;
    RETURN (SELECT format('gate_on_unavailable = %s, platform_timeout_ms = %s', e.gate_on_unavailable,
                          e.platform_timeout_ms) FROM hmr.effective_policy e);
END
$$;

-- The gate: statement-level triggers on the HIS order table run the DBA's guard query over
-- the saved rows (transition table `new_rows`), which yields one row per prescription with
-- columns `visit` jsonb and `orders` jsonb (see README), and refuse the save (HM001) while a
-- duplicate of a recognisable report has no decision. INSERT and UPDATE are both guarded
-- (a HIS that saves a draft, then submits it by UPDATE); an UPDATE is checked only for the
-- prescriptions whose guard output it changed.
CREATE TABLE hmr.guarded (
    tbl         regclass PRIMARY KEY,
    query       text NOT NULL,
    guarded_at  timestamptz NOT NULL DEFAULT now(),
    guarded_by  text NOT NULL DEFAULT session_user
);

-- The matches of a check whose order has no counting decision for one of its reports
-- (NULL: none left).
CREATE FUNCTION hmr.undecided(matches jsonb) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT jsonb_agg(m)
      FROM jsonb_array_elements(matches) m
     WHERE NOT EXISTS (
            SELECT 1 FROM hmr.order_recognitions d
             WHERE d.order_id = m->>'order_id'
               AND d.report_id IN (SELECT x->>'report_id' FROM jsonb_array_elements(m->'reports') x))
$$;

-- Runs as the saving role, with a pinned search_path (a saving session's own operators or
-- functions never take part); the guard query must name HIS tables with their schema.
CREATE FUNCTION hmr.gate() RETURNS trigger
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
                      HINT = 'Record the doctor''s choice for each order: SELECT hmr_record_decision(check_id, order_id, true) '
                             'for 互认, or hmr_record_decision(check_id, order_id, false, reason_code, reason_text) '
                             'for 不互认; then save again.';
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

-- The guards with the state of their triggers: a gate switched off (ALTER TABLE … DISABLE
-- TRIGGER, DROP TRIGGER by the table's owner) shows here and in hmr.status.
CREATE VIEW hmr.guards AS
SELECT g.tbl, g.query,
       pg_get_userbyid(c.relowner) AS table_owner,
       coalesce(r.rolcanlogin, false) AS owner_can_login,
       ins.state AS on_insert,
       upd.state AS on_update,
       c.oid IS NOT NULL AND ins.state = 'enabled' AND upd.state = 'enabled' AS active,
       g.guarded_at, g.guarded_by
FROM hmr.guarded g
LEFT JOIN pg_class c ON c.oid = g.tbl
LEFT JOIN pg_roles r ON r.oid = c.relowner
CROSS JOIN LATERAL (
    SELECT coalesce((SELECT CASE t.tgenabled WHEN 'D' THEN 'disabled' WHEN 'R' THEN 'replica only' ELSE 'enabled' END
                       FROM pg_trigger t
                      WHERE t.tgrelid = g.tbl AND t.tgname = 'hmr_gate' AND t.tgfoid = 'hmr.gate()'::regprocedure),
                    'missing') AS state) ins
CROSS JOIN LATERAL (
    SELECT coalesce((SELECT CASE t.tgenabled WHEN 'D' THEN 'disabled' WHEN 'R' THEN 'replica only' ELSE 'enabled' END
                       FROM pg_trigger t
                      WHERE t.tgrelid = g.tbl AND t.tgname = 'hmr_gate_update' AND t.tgfoid = 'hmr.gate()'::regprocedure),
                    'missing') AS state) upd;

-- Attach the gate to a HIS order table. `query` reads the transition table `new_rows` and
-- returns (visit jsonb, orders jsonb) per prescription; it runs with search_path
-- pg_catalog, pg_temp, so it names HIS tables with their schema (his.patient).
CREATE FUNCTION hmr.guard(tbl regclass, query text) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
BEGIN
    -- Checked now, not at the first save: a mistake in the query is the DBA's to see. Both
    -- forms the gate runs: the query itself, and over the old rows of an update.
    EXECUTE format('CREATE TEMP TABLE new_rows AS SELECT * FROM %s LIMIT 0', tbl);
    EXECUTE format('CREATE TEMP TABLE old_rows AS SELECT * FROM %s LIMIT 0', tbl);
    BEGIN
        EXECUTE format('SELECT visit::jsonb, orders::jsonb FROM (%s) q LIMIT 0', query);
        EXECUTE format('SELECT visit, orders FROM (WITH new_rows AS (SELECT * FROM old_rows) SELECT * FROM (%s) g) q LIMIT 0',
                       query);
    EXCEPTION WHEN OTHERS THEN
        DROP TABLE pg_temp.new_rows, pg_temp.old_rows;
        RAISE EXCEPTION 'hmr: the guard query does not run: %', SQLERRM USING ERRCODE = 'HM013',
            HINT = 'It reads new_rows (the saved rows), names HIS tables with their schema, and returns the columns '
                   'visit jsonb and orders jsonb.';
    END;
    DROP TABLE pg_temp.new_rows, pg_temp.old_rows;
    INSERT INTO hmr.guarded AS g (tbl, query) VALUES (guard.tbl, guard.query)
    ON CONFLICT ON CONSTRAINT guarded_pkey DO UPDATE
       SET query = EXCLUDED.query, guarded_at = now(), guarded_by = session_user;
    EXECUTE format('DROP TRIGGER IF EXISTS hmr_gate ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS hmr_gate_update ON %s', tbl);
    EXECUTE format('CREATE TRIGGER hmr_gate AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION hmr.gate()', tbl);
    EXECUTE format('CREATE TRIGGER hmr_gate_update AFTER UPDATE ON %s REFERENCING OLD TABLE AS old_rows '
                   'NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION hmr.gate()', tbl);
    RETURN format('saving into %s (INSERT or UPDATE) now requires a decision for every duplicate of a '
                  'recognisable report', tbl);
END
$$;

CREATE FUNCTION hmr.unguard(tbl regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS hmr_gate ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS hmr_gate_update ON %s', tbl);
    DELETE FROM hmr.guarded g WHERE g.tbl = unguard.tbl;
END
$$;

-- ===================================================================== operations

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
CREATE FUNCTION hmr.purge_history(keep interval DEFAULT '90 days', batch integer DEFAULT 10000) RETURNS bigint
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

-- ===================================================================== dump and restore
-- Everything that is state or configuration goes into pg_dump with the HIS database, so a
-- restored database (a move, an upgrade) resends nothing and keeps its audit trail: the
-- outbox and what was delivered, decisions, checks, downloads, the catalog and mappings,
-- polled-source watermarks, backfill checkpoints, the platform settings and the policy, and
-- the sequences that number them. Caches and worker presence (unlogged) are not state.
DO $$
DECLARE
    t text;
BEGIN
    -- One call per statement: each updates the extension's row (pg_extension).
    FOREACH t IN ARRAY ARRAY['hmr.event_id_seq', 'hmr.captured', 'hmr.outbox', 'hmr.outbox_history', 'hmr.delivered',
                             'hmr.backfill_id_seq', 'hmr.backfills', 'hmr.catalog', 'hmr.item_map', 'hmr.unmapped_reports',
                             'hmr.polled_sources', 'hmr.polled_seen', 'hmr.polled_hashes', 'hmr.platform', 'hmr.checks', 'hmr.prompts',
                             'hmr.decision_id_seq', 'hmr.decisions', 'hmr.retained_reports',
                             'hmr.download_log_id_seq', 'hmr.download_log', 'hmr.guarded',
                             'hmr.list_log_id_seq', 'hmr.list_log', 'hmr.item_prices', 'hmr.upload_days'] LOOP
        PERFORM pg_catalog.pg_extension_config_dump(t::regclass, '');
    END LOOP;
END
$$;
