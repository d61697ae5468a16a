-- The public SQL API: hmr_* functions in schema public, so HIS stored procedures call them
-- without a schema prefix. They run as the extension's owner (SECURITY DEFINER, pinned
-- search_path): HIS roles need no rights on hmr's tables.

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

CREATE FUNCTION public.hmr_query_recognitions(filter jsonb)
RETURNS jsonb LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT hmr.query_recognitions_json(filter)
$$;

-- The ordering step: is what the doctor is ordering a duplicate? {status, duplicate, url,
-- matches}; when duplicate, the workstation opens `url` and the doctor answers before going on.
CREATE FUNCTION public.hmr_check_order(visit jsonb, orders jsonb)
RETURNS jsonb LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT hmr.need_primary('互认校验');
    SELECT hmr.order_check_json(visit, orders)
$$;

-- The check the gate runs on every save. PL/pgSQL keeps its plans for the session (an SQL
-- function would parse and plan its statements on every call); a standby refuses with HM016
-- before anything is asked.
CREATE FUNCTION public.hmr_check_prescription(visit jsonb, orders jsonb)
RETURNS jsonb LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF pg_is_in_recovery() THEN
        PERFORM hmr.need_primary('互认校验');
    END IF;
    RETURN hmr.check_prescription_json(visit, orders);
END
$$;

-- Records the doctor's 互认 / 不互认 for one order of a check. `report_id` defaults to the
-- newest matching report; `doctor_no`/`dept_code` to the check's; `workstation` names the
-- terminal the doctor decided at (kept, cut to 32 characters). Once every matched order
-- of the check has a decision, the decisions go to the platform through the outbox.
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
    p_check alias FOR $1;
    p_order alias FOR $2;
BEGIN
    PERFORM hmr.need_primary('记录互认结果');
    IF NOT hmr.ensure_check(p_check) THEN
        RAISE EXCEPTION '找不到互认校验记录 %，请重新保存处方以重新校验', p_check
            USING ERRCODE = 'HM003', HINT = 'check_id comes from hmr_check_prescription() or the DETAIL of HM001.';
    END IF;
    -- One decision of a check at a time (several doctors' sessions, a pool): the last one
    -- to complete the check sees every other and queues the upload exactly once.
    SELECT * INTO c FROM hmr.checks k WHERE k.check_id = p_check FOR UPDATE;
    IF c.refused_at IS NOT NULL THEN
        RAISE EXCEPTION '互认平台拒绝了该处方的互认结果（%），请重新保存处方以重新校验', c.refused_reason
            USING ERRCODE = 'HM015', HINT = 'Save the prescription again: a fresh check lists what is recognisable now.';
    END IF;
    SELECT x INTO m FROM jsonb_array_elements(c.matches) x WHERE x->>'order_id' = p_order;
    IF m IS NULL THEN
        RAISE EXCEPTION '医嘱 % 没有可互认的报告，无需选择', p_order USING ERRCODE = 'HM003';
    END IF;
    rid := coalesce(report_id, m->'reports'->0->>'report_id');
    IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements(m->'reports') x WHERE x->>'report_id' = rid) THEN
        RAISE EXCEPTION '报告 % 不在医嘱 % 的可互认报告中', rid, p_order USING ERRCODE = 'HM003';
    END IF;
    problem := hmr.decision_problem(recognise, reason_code, reason_text);
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION '%', problem
            USING ERRCODE = 'HM004',
                  HINT = '01 病情变化，原结果难以反映当前病情; 02 结果在疾病发展中变化较快; 03 手术、输血等重大医疗措施前; '
                         '04 急诊、急救; 05 司法、伤残、病退等鉴定; 06 其他情形确需复查 (reason_text required)';
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
            coalesce(hmr_record_decision.doctor_no, c.doctor_no), coalesce(hmr_record_decision.dept_code, c.dept_code),
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

-- Decisions taken on the platform's page for a check (the HIS polls this while the page is
-- open): {status, complete, decisions [{order_id, report_id, recognise, …, source}], recorded}.
CREATE FUNCTION public.hmr_page_decisions(check_id text)
RETURNS jsonb LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT hmr.need_primary('记录互认结果');
    SELECT hmr.page_decisions_json(check_id)
$$;

-- What became of one order: recognised (互认, with the report: do not perform it), declined
-- (不互认), or no decision; and whether the platform has the decision.
CREATE FUNCTION public.hmr_order_recognition(order_id text)
RETURNS jsonb LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(
        (SELECT jsonb_build_object('order_id', r.order_id,
                                   'decision', CASE WHEN r.recognised THEN 'recognised' ELSE 'declined' END,
                                   'report_id', r.report_id, 'check_id', r.check_id,
                                   'reason_code', r.reason_code, 'decided_at', r.decided_at,
                                   'delivered', r.delivered)
           FROM hmr.order_recognitions r WHERE r.order_id = $1
          ORDER BY r.decided_at DESC LIMIT 1),
        jsonb_build_object('order_id', $1, 'decision', 'none'))
$$;

-- A report recognised here: the kept copy, or fetched now when the decision has reached
-- the platform but the worker has not kept it yet. Every read is logged.
CREATE FUNCTION public.hmr_download_report(report_id text, format text DEFAULT 'pdf')
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
                  HINT = 'Re-order the test, or choose another recognisable report.';
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

-- ===================================================================== views over settings
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

-- ===================================================================== roles (least privilege)
-- hmr_his     HIS stored procedures: the hmr_* API only; nothing of hmr's tables.
-- hmr_worker  the worker: drains the outbox, keeps downloads; reads the hmr_src views
--             (GRANT SELECT ON ALL TABLES IN SCHEMA hmr_src TO hmr_worker).
-- hmr_admin   DBAs: configure, attach, retry, discard, load the catalog; read the audit trail.
-- Nobody but the extension's owner reads hmr.platform (credentials).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hmr_his') THEN CREATE ROLE hmr_his NOLOGIN; END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hmr_worker') THEN CREATE ROLE hmr_worker NOLOGIN; END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hmr_admin') THEN CREATE ROLE hmr_admin NOLOGIN; END IF;
END
$$;

REVOKE ALL ON ALL TABLES IN SCHEMA hmr FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA hmr FROM PUBLIC;
REVOKE ALL ON FUNCTION public.hmr_list_recognitions(text, text, text, text, text, text, boolean, text),
                       public.hmr_query_recognitions(jsonb),
                       public.hmr_check_prescription(jsonb, jsonb),
                       public.hmr_record_decision(text, text, boolean, text, text, text, text, text, text),
                       public.hmr_download_report(text, text), public.hmr_order_recognition(text),
                       public.hmr_check_order(jsonb, jsonb), public.hmr_page_decisions(text) FROM PUBLIC;

-- The gate runs with the saving role's rights and calls the pinned public wrapper only; the
-- SECURITY DEFINER functions behind the wrappers are not granted to HIS roles. (A trigger
-- function needs no EXECUTE grant to fire.)
GRANT USAGE ON SCHEMA hmr TO hmr_his, hmr_worker, hmr_admin;
GRANT EXECUTE ON FUNCTION public.hmr_list_recognitions(text, text, text, text, text, text, boolean, text),
                          public.hmr_query_recognitions(jsonb),
                          public.hmr_check_prescription(jsonb, jsonb),
                          public.hmr_record_decision(text, text, boolean, text, text, text, text, text, text),
                          public.hmr_download_report(text, text), public.hmr_order_recognition(text),
                          public.hmr_check_order(jsonb, jsonb), public.hmr_page_decisions(text),
                          hmr.learn_page_decisions(jsonb), hmr.undecided(jsonb), hmr.id_card_problem(text, date), hmr.org_code_valid(text), hmr.keep_prompt(text, jsonb),
                          hmr.decision_problem(boolean, text, text)
      TO hmr_his, hmr_admin;
GRANT SELECT ON hmr.guarded, hmr.guards, hmr.current_decisions, hmr.decisions, hmr.order_recognitions,
                hmr.catalog, hmr.item_map
      TO hmr_his;
-- hmr-worker serve logs in as a HIS role and finds the patient and staff views here.
GRANT SELECT ON hmr.kinds TO hmr_his;
-- Policy: everyone reads it; only hmr_admin changes it (hmr.set_policy).
GRANT SELECT ON hmr.policy, hmr.effective_policy, hmr.settings TO hmr_his, hmr_worker, hmr_admin;
-- Source views (read by the worker, checked by DBAs) use the code maps.
GRANT SELECT ON hmr.code_map TO hmr_his, hmr_worker, hmr_admin;
GRANT EXECUTE ON FUNCTION hmr.code(text, anyelement), hmr.code(text, text), hmr.flag(anyelement), hmr.flag(text)
      TO hmr_his, hmr_worker, hmr_admin;
GRANT INSERT, UPDATE, DELETE ON hmr.code_map TO hmr_admin;
-- Views read settings through it (functions in a view are called as the view's reader).
GRANT EXECUTE ON FUNCTION hmr.setting_of(text) TO hmr_his, hmr_worker, hmr_admin;
-- Views of dictionaries compared in full take their change time from it.
GRANT EXECUTE ON FUNCTION hmr.changed_at(text, text) TO hmr_his, hmr_worker, hmr_admin;
GRANT SELECT ON hmr.polled_hashes TO hmr_his;
GRANT INSERT, UPDATE ON hmr.policy TO hmr_admin;

GRANT SELECT, DELETE, TRUNCATE ON hmr.captured TO hmr_worker, hmr_admin;
GRANT USAGE ON SEQUENCE hmr.event_id_seq, hmr.backfill_id_seq TO hmr_worker, hmr_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON hmr.outbox, hmr.outbox_history, hmr.delivered, hmr.sleepers,
                                       hmr.polled_sources, hmr.polled_seen, hmr.polled_hashes, hmr.backfills, hmr.unmapped_reports
      TO hmr_worker, hmr_admin;
GRANT SELECT ON hmr.kinds, hmr.item_map, hmr.catalog, hmr.checks, hmr.prompts, hmr.prompt_log, hmr.decisions, hmr.current_decisions,
                hmr.status, hmr.backlog, hmr.stuck_records, hmr.quarantine, hmr.unmapped_items
      TO hmr_worker, hmr_admin;
GRANT SELECT, INSERT ON hmr.retained_reports TO hmr_worker;
GRANT UPDATE (rechecked_at, revoked_at, revoked_note) ON hmr.retained_reports TO hmr_worker;
GRANT UPDATE (refused_at, refused_reason) ON hmr.checks TO hmr_worker;
-- The worker turns off the logging of its statements' parameters (patients' data).
GRANT SET ON PARAMETER log_parameter_max_length TO hmr_worker;
GRANT EXECUTE ON FUNCTION hmr.poll_sources(), hmr.poll_source(text), hmr.purge_history(interval, integer),
                          hmr.backfill_start(text, timestamptz), hmr.backfill_page(bigint, integer),
                          hmr.capture(), hmr.ingest(), hmr.ingest_captured(), hmr.worker_sleeping(), hmr.wake_workers(),
                          hmr.note_rate_limit(float8), hmr.ingest_kept(),
                          hmr.claim(text, text[], integer, float8, boolean, float8)
      TO hmr_worker, hmr_admin;

GRANT SELECT, INSERT, UPDATE, DELETE ON hmr.kinds, hmr.item_map, hmr.catalog, hmr.guarded, hmr.item_prices TO hmr_admin;
-- Statistics: read by the hospital's administrators and the worker (its report command).
GRANT SELECT ON hmr.list_log, hmr.recognition_stats, hmr.recognition_totals, hmr.quarantine_ageing TO hmr_worker, hmr_admin;
GRANT SELECT, INSERT, UPDATE ON hmr.upload_days TO hmr_worker, hmr_admin;
GRANT EXECUTE ON FUNCTION hmr.upload_stats(interval) TO hmr_worker, hmr_admin;
GRANT SELECT ON hmr.source_readiness, hmr.prompts, hmr.prompt_log, hmr.guards, hmr.watches, hmr.backfill_progress, hmr.retained_reports, hmr.download_log, hmr.checks,
                hmr.list_cache TO hmr_admin;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA hmr TO hmr_admin;
GRANT EXECUTE ON FUNCTION public.hmr_list_recognitions(text, text, text, text, text, text, boolean, text),
                          public.hmr_query_recognitions(jsonb), public.hmr_check_prescription(jsonb, jsonb),
                          public.hmr_record_decision(text, text, boolean, text, text, text, text, text, text),
                          public.hmr_download_report(text, text), public.hmr_order_recognition(text),
                          public.hmr_check_order(jsonb, jsonb), public.hmr_page_decisions(text)
      TO hmr_admin;
