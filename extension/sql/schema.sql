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
    description    text NOT NULL
);
INSERT INTO hmr.kinds VALUES
    ('patient',     'hmr_src.patient',     'patient_id', NULL,               true,  'updated_at',  '患者信息'),
    ('department',  'hmr_src.department',  'dept_code',  NULL,               true,  'updated_at',  '科室字典'),
    ('staff',       'hmr_src.staff',       'staff_no',   NULL,               true,  'updated_at',  '人员字典'),
    ('lab_report',  'hmr_src.lab_report',  'report_no',  'hmr_src.lab_item', false, 'reported_at', '检验报告'),
    ('exam_report', 'hmr_src.exam_report', 'report_no',  NULL,               false, 'reported_at', '检查报告'),
    ('decision',    'hmr.decisions',       'check_id',   NULL,               false, NULL,          '互认/不互认结果');
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

-- Backfills: the day a hospital connects, every existing record goes through the same outbox
-- (so ordering, dedupe and quarantine apply). Pages commit with their checkpoint, so an
-- interrupted backfill resumes where it stopped and enqueues nothing twice.
CREATE TABLE hmr.backfills (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
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
    IF n > 0 AND EXISTS (SELECT 1 FROM hmr.sleepers WHERE until > now()) THEN
        PERFORM pg_notify('hmr_outbox', '');
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

-- Local codes met in reports without a mapping: the report went up without a dataCode
-- (shared, never recognised). Map them in hmr.item_map; later reports carry the code.
CREATE TABLE hmr.unmapped_items (
    type         text NOT NULL,
    local_code   text NOT NULL,
    local_name   text,
    reports      bigint NOT NULL DEFAULT 1,
    first_seen   timestamptz NOT NULL DEFAULT now(),
    last_seen    timestamptz NOT NULL DEFAULT now(),
    example_key  text,
    PRIMARY KEY (type, local_code)
);

-- Polled sources: exam systems (RIS, PACS, ultrasound, endoscopy) are often another database
-- or a vendor view the HIS cannot put triggers on. The worker polls them through the kind's
-- source view, by a watermark on the audit time. Pairs (key, audit time) already seen are
-- remembered for `lookback`, so equal audit times and rows that arrive late (committed after
-- newer ones were polled) are still picked up, and a re-audit (new audit time) is a new event.
CREATE TABLE hmr.polled_sources (
    kind         text PRIMARY KEY REFERENCES hmr.kinds,
    time_column  text NOT NULL DEFAULT 'audited_at',
    -- wait this long after audit before uploading (radiologists correct within minutes)
    delay        interval NOT NULL DEFAULT '0',
    -- how late a row may arrive and still be picked up
    lookback     interval NOT NULL DEFAULT '1 day',
    watermark    timestamptz,
    polled_at    timestamptz,
    enabled      boolean NOT NULL DEFAULT true
);

CREATE TABLE hmr.polled_seen (
    kind       text NOT NULL,
    key        text NOT NULL,
    seen_time  timestamptz NOT NULL,
    PRIMARY KEY (kind, key, seen_time)
);

-- Polls one source: enqueues rows audited since (watermark - lookback) and at least `delay`
-- ago that were not seen yet; also enqueues reports the platform holds that left the view
-- (withdrawn in the exam system), so they are revoked. Returns the events enqueued.
CREATE FUNCTION hmr.poll_source(source_kind text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    p hmr.polled_sources;
    k hmr.kinds;
    since timestamptz;
    newest timestamptz;
    added integer;
    gone integer;
BEGIN
    SELECT * INTO p FROM hmr.polled_sources WHERE kind = source_kind AND enabled FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    SELECT * INTO k FROM hmr.kinds WHERE kind = source_kind;
    since := coalesce(p.watermark - p.lookback, '-infinity');
    EXECUTE format(
        'WITH cand AS (
            SELECT v.%1$I::text AS key, v.%2$I AS t FROM %3$s v
             WHERE v.%2$I > $1 AND v.%2$I <= now() - $2),
         new AS (
            INSERT INTO hmr.polled_seen (kind, key, seen_time) SELECT $3, key, t FROM cand
            ON CONFLICT DO NOTHING RETURNING key, seen_time),
         ins AS (
            INSERT INTO hmr.outbox (kind, key, op) SELECT $3, key, ''P'' FROM new ORDER BY seen_time, key
            RETURNING 1)
         SELECT (SELECT count(*)::int FROM ins), (SELECT max(t) FROM cand)',
        k.key_column, p.time_column, k.source_view::regclass)
      INTO added, newest USING since, p.delay, source_kind;
    -- Withdrawn: held by the platform, recently seen, no longer in the view.
    EXECUTE format(
        'INSERT INTO hmr.outbox (kind, key, op)
         SELECT d.kind, d.key, ''P'' FROM hmr.delivered d
          WHERE d.kind = $1 AND NOT d.revoked AND d.delivered_at > now() - $2
            AND NOT EXISTS (SELECT 1 FROM %1$s v WHERE v.%2$I::text = d.key)
            AND NOT EXISTS (SELECT 1 FROM hmr.outbox o WHERE o.kind = d.kind AND o.key = d.key)',
        k.source_view::regclass, k.key_column)
      USING source_kind, p.lookback;
    GET DIAGNOSTICS gone = ROW_COUNT;
    UPDATE hmr.polled_sources
       SET watermark = greatest(watermark, newest), polled_at = now()
     WHERE kind = source_kind;
    DELETE FROM hmr.polled_seen
     WHERE kind = source_kind AND seen_time < greatest(p.watermark, newest) - p.lookback;
    RETURN added + gone;
END
$$;

-- Polls every enabled source; the worker calls this on its poll interval.
CREATE FUNCTION hmr.poll_sources() RETURNS integer
LANGUAGE sql AS $$
    SELECT coalesce(sum(hmr.poll_source(kind)), 0)::int FROM hmr.polled_sources WHERE enabled
$$;
