-- Operations: upload days, purging the history, upload statistics, and the views operators
-- read (settings, stuck records, status, readiness).

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

-- Here, after the Rust functions exist: they read settings through hmr.setting_of().

-- Every hmr setting in one place, readable in any session (also before the library is
-- loaded, when SHOW does not know the hmr.* settings yet): policy first, then the GUCs.
CREATE VIEW hmr.settings AS
SELECT 'gate_on_unavailable'::text AS name, e.gate_on_unavailable::text AS value, e.source,
       'hmr_admin: SELECT hmr.set_policy(gate_on_unavailable => ...)'::text AS changed_with,
       'allow or block: what the order gate does when the platform cannot be asked'::text AS description
  FROM hmr.effective_policy e
UNION ALL
SELECT 'platform_timeout_ms', e.platform_timeout_ms::text, e.source,
       'hmr_admin: SELECT hmr.set_policy(platform_timeout_ms => ...)',
       'hard timeout of one platform call from SQL, in milliseconds (100-600000)'
  FROM hmr.effective_policy e
UNION ALL
SELECT d.name, coalesce(s.v[1], d.default_value), coalesce(s.v[2], 'default'),
       'SET / ALTER DATABASE ... SET', d.description
  FROM (VALUES ('hmr.check_sample_rows', '1000', 'rows per source view hmr.check_sources() validates'),
               ('hmr.stuck_after_seconds', '600', 'a record failing this long shows in hmr.stuck_records (seconds)'),
               ('hmr.list_cache_seconds', '10', 'seconds a recognition list answer is reused (0: never)'))
       AS d(name, default_value, description)
  CROSS JOIN LATERAL (SELECT hmr.setting_of(d.name) AS v) s;

-- Records whose oldest unfinished event has been failing for a while: one stuck or
-- poisoned record never holds back others, but someone should look at it.
CREATE VIEW hmr.stuck_records AS
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

-- One row of facts for operators (the same as `hmr-worker status`).
CREATE VIEW hmr.status AS
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

-- Per kind: ready (its source checks clean), problems (how many), or not connected (no
-- view yet and nothing captures or polls it): a hospital connecting lab first is ready for lab.
CREATE VIEW hmr.source_readiness AS
SELECT k.kind,
       CASE WHEN NOT connected THEN 'not connected'
            WHEN n = 0 THEN 'ready'
            ELSE 'problems' END AS state,
       n AS problems
FROM (SELECT k.kind,
             to_regclass(k.source_view) IS NOT NULL
             OR EXISTS (SELECT 1 FROM hmr.watches w WHERE w.kind = k.kind)
             OR EXISTS (SELECT 1 FROM hmr.polled_sources p WHERE p.kind = k.kind) AS connected
        FROM hmr.kinds k WHERE k.kind <> 'decision') k
CROSS JOIN LATERAL (SELECT CASE WHEN k.connected THEN (SELECT count(*) FROM hmr.check_sources(k.kind)) ELSE 0 END AS n) c;

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
