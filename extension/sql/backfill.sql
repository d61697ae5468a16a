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
