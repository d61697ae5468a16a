-- hmr: the objects CREATE EXTENSION installs (schema hmr). SQL lives here, Rust only where
-- it must (validation shared with the worker). Comments say why, not what.

-- Kinds of record the platform receives, and the DBA-owned source view each is read from
-- at drain time. DBAs may point source_view at another view; the columns are documented
-- in the README (and checked by hmr.check_sources()).
CREATE TABLE hmr.kinds (
    kind         text PRIMARY KEY,
    source_view  text NOT NULL,
    key_column   text NOT NULL,
    item_view    text,
    batched      boolean NOT NULL,
    description  text NOT NULL
);
INSERT INTO hmr.kinds VALUES
    ('patient',     'hmr_src.patient',     'patient_id', NULL,               true,  '患者信息'),
    ('department',  'hmr_src.department',  'dept_code',  NULL,               true,  '科室字典'),
    ('staff',       'hmr_src.staff',       'staff_no',   NULL,               true,  '人员字典'),
    ('lab_report',  'hmr_src.lab_report',  'report_no',  'hmr_src.lab_item', false, '检验报告'),
    ('exam_report', 'hmr_src.exam_report', 'report_no',  NULL,               false, '检查报告'),
    ('decision',    'hmr.decisions',       'check_id',   NULL,               false, '互认/不互认结果');
SELECT pg_catalog.pg_extension_config_dump('hmr.kinds', '');

-- The outbox: which record changed and how. The HIS transaction writes one small row;
-- everything else (payload, versions, delivery) happens in the worker.
CREATE TABLE hmr.outbox (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind             text NOT NULL,
    key              text NOT NULL,
    -- I insert, U update, D delete (captured); S sync (enqueued by hand, backfill, dependency)
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
    -- the requests frozen at first build, resent byte for byte on every retry
    plan             jsonb,
    step             integer NOT NULL DEFAULT 0,
    last_error       text,
    error_field      text,
    error_reason     text,
    failed_at        timestamptz
);
-- Per-record order: an event waits while an earlier one of the same record is unfinished.
CREATE INDEX outbox_record_idx ON hmr.outbox (kind, key, id);
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
    -- delivered | unchanged | skipped | discarded
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

-- Workers waiting for work. The capture trigger sends a NOTIFY only while one is here, so
-- a busy system pays no NOTIFY (it serialises commits on a global lock).
CREATE UNLOGGED TABLE hmr.sleepers (
    worker  text PRIMARY KEY,
    until   timestamptz NOT NULL
);

-- The capture trigger. Arguments: kind, key column. It records which row changed and
-- nothing else. (A faster C-level version is issue #7's; the contract stays the same.)
-- SECURITY DEFINER so HIS roles need no rights on the outbox; the pinned search_path keeps
-- a caller's own objects from being run with the definer's rights.
CREATE FUNCTION hmr.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_key text;
    old_key text;
BEGIN
    IF TG_OP <> 'DELETE' THEN
        new_key := to_jsonb(NEW) ->> TG_ARGV[1];
    END IF;
    IF TG_OP <> 'INSERT' THEN
        old_key := to_jsonb(OLD) ->> TG_ARGV[1];
    END IF;
    IF new_key IS NOT NULL THEN
        INSERT INTO hmr.outbox (kind, key, op) VALUES (TG_ARGV[0], new_key, left(TG_OP, 1));
    END IF;
    -- A key that changed (or a deleted row) leaves the old record to reconcile too.
    IF old_key IS NOT NULL AND old_key IS DISTINCT FROM new_key THEN
        INSERT INTO hmr.outbox (kind, key, op) VALUES (TG_ARGV[0], old_key, 'D');
    END IF;
    IF EXISTS (SELECT 1 FROM hmr.sleepers WHERE until > now()) THEN
        -- Same channel and payload fold into one NOTIFY per transaction.
        PERFORM pg_notify('hmr_outbox', '');
    END IF;
    RETURN NULL;
END
$$;

-- Attach capture to a HIS table. `update_when` filters updates (an SQL condition on OLD and
-- NEW, e.g. 'OLD.status IS DISTINCT FROM NEW.status'); inserts and deletes always count.
CREATE FUNCTION hmr.watch(kind text, tbl regclass, key_column name, update_when text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql AS $$
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
    PERFORM hmr.unwatch(kind, tbl);
    IF update_when IS NULL THEN
        EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON %s '
                       'FOR EACH ROW EXECUTE FUNCTION hmr.capture(%L, %L)',
                       trigger_name, tbl, kind, key_column);
    ELSE
        EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR DELETE ON %s '
                       'FOR EACH ROW EXECUTE FUNCTION hmr.capture(%L, %L)',
                       trigger_name, tbl, kind, key_column);
        EXECUTE format('CREATE TRIGGER %I AFTER UPDATE ON %s FOR EACH ROW WHEN (%s) '
                       'EXECUTE FUNCTION hmr.capture(%L, %L)',
                       trigger_name || '_upd', tbl, update_when, kind, key_column);
    END IF;
    RETURN format('%s changes of %s are captured as %s', tbl, key_column, kind);
END
$$;

CREATE FUNCTION hmr.unwatch(kind text, tbl regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'hmr_capture_' || kind, tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'hmr_capture_' || kind || '_upd', tbl);
END
$$;

-- What is watched: one row per capture trigger.
CREATE VIEW hmr.watches AS
SELECT t.tgrelid::regclass AS tbl,
       (string_to_array(encode(t.tgargs, 'escape'), '\000'))[1] AS kind,
       (string_to_array(encode(t.tgargs, 'escape'), '\000'))[2] AS key_column,
       CASE WHEN t.tgname LIKE '%\_upd' THEN 'update' ELSE 'insert, update, delete' END AS events,
       substring(pg_get_triggerdef(t.oid) FROM 'WHEN \((.*)\) EXECUTE') AS update_when,
       t.tgenabled <> 'D' AS enabled
FROM pg_trigger t
WHERE t.tgfoid = 'hmr.capture()'::regprocedure AND NOT t.tgisinternal;

-- Enqueue a record by hand (resend after a fix, backfill): the same path as a trigger.
CREATE FUNCTION hmr.enqueue(kind text, key text) RETURNS bigint
LANGUAGE sql AS $$
    INSERT INTO hmr.outbox (kind, key, op) VALUES (kind, key, 'S') RETURNING id
$$;

-- Quarantined events: what the platform (or our own validation) refused, and why.
-- `error_field` names the column of the source view when it can.
CREATE VIEW hmr.quarantine AS
SELECT id, kind, key, error_field, error_reason, last_error, attempts, created_at, failed_at
FROM hmr.outbox
WHERE state = 'quarantined';

-- Backlog per kind, for operators.
CREATE VIEW hmr.backlog AS
SELECT kind,
       count(*) FILTER (WHERE state = 'pending')     AS pending,
       count(*) FILTER (WHERE state = 'claimed')     AS in_flight,
       count(*) FILTER (WHERE state = 'quarantined') AS quarantined,
       min(created_at) FILTER (WHERE state <> 'quarantined') AS oldest
FROM hmr.outbox
GROUP BY kind;

-- Send a quarantined event again after the source is fixed: rebuilt from the source
-- view, with fresh request ids (the platform remembers its first answer to the old ones).
CREATE FUNCTION hmr.retry(event_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE hmr.outbox
       SET state = 'pending', plan = NULL, step = 0, generation = generation + 1, attempts = 0,
           next_attempt_at = '-infinity', last_error = NULL, error_field = NULL,
           error_reason = NULL, failed_at = NULL
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
           SET state = 'pending', plan = NULL, step = 0, generation = generation + 1, attempts = 0,
               next_attempt_at = '-infinity', last_error = NULL, error_field = NULL,
               error_reason = NULL, failed_at = NULL
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
