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
    -- how often a source without a time column is compared in full (NULL: 15 minutes); a
    -- source with a time column is read by watermark at every poll and refuses one (it would
    -- silently do nothing)
    compare_every interval,
    -- the zone of a time column without one (timestamp without time zone: a vendor's wall
    -- clock, read raw from a foreign table so that the poll's bounds reach the remote server)
    time_zone    text NOT NULL DEFAULT 'Asia/Shanghai',
    CONSTRAINT polled_sources_pkey PRIMARY KEY (name),
    CONSTRAINT compare_every_is_for_sources_without_time_column CHECK (compare_every IS NULL OR time_column IS NULL)
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
