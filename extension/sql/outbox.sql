-- The outbox: capture inside the HIS transaction, the move into the outbox, the worker's
-- claim, attaching capture to HIS tables, and the quarantine.

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
-- The reports delivered lately, which each poll of a report source asks its view for (an
-- un-audit leaves no change time): without it each poll read every report ever delivered,
-- 300-500 ms at 1,000,000 (#31). Reports only: patients, the busiest kind, pay nothing.
CREATE INDEX delivered_reports_recent_idx ON hmr.delivered (kind, delivered_at)
    WHERE kind IN ('lab_report', 'exam_report');

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
                  HINT = '请将此调用连接到主库：使用 target_session_attrs=read-write 的多主机连接串，或 HIS 的读写数据源。';
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
