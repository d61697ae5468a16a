-- Recognition (互认服务): the platform's settings, checks, prompts, decisions, kept reports,
-- downloads; then the public hmr_* functions HIS stored procedures call (they call the Rust
-- functions of extension/src/recognition.rs, hence this file's place after them).

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
-- The list marks its reports with this hospital's decisions (by report); a patient's
-- orders to perform are found by patient.
CREATE INDEX decisions_report_idx ON hmr.decisions (report_id);
CREATE INDEX checks_patient_idx ON hmr.checks (patient_id);

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

-- Per order: what the doctor decided and whether the platform has it, so the HIS marks a
-- recognised (互认) order not to be performed. Decisions of a check the platform refused
-- do not count.
CREATE VIEW hmr.order_recognitions AS
SELECT d.order_id, d.check_id, d.report_id, d.recognise AS recognised, d.reason_code, d.reason_text,
       d.doctor_no, d.dept_code, d.decided_at,
       EXISTS (SELECT 1 FROM hmr.delivered v WHERE v.kind = 'decision' AND v.key = d.check_id) AS delivered,
       -- the recognised report was revoked at its hospital since (the worker's recheck): the
       -- test is to be performed after all (hmr.orders_to_perform, NOTIFY hmr_report_revoked)
       (SELECT max(r.revoked_at) FROM hmr.retained_reports r WHERE r.report_id = d.report_id) AS revoked_at
FROM hmr.current_decisions d
JOIN hmr.checks c ON c.check_id = d.check_id AND c.refused_at IS NULL;

-- Orders the doctor recognised (互认: not performed) whose report its hospital revoked since:
-- the HIS performs them after all. Announced on channel hmr_report_revoked (payload: the
-- report id) when the worker notices.
CREATE VIEW hmr.orders_to_perform AS
SELECT r.order_id, r.check_id, r.report_id, r.doctor_no, r.dept_code, r.decided_at, r.revoked_at
FROM hmr.order_recognitions r
WHERE r.recognised AND r.revoked_at IS NOT NULL;

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

-- Decisions taken on the platform's page for a check (the HIS polls this while the page is
-- open): {status, complete, decisions [{order_id, report_id, recognise, …, source}], recorded}.
CREATE FUNCTION public.hmr_page_decisions(check_id text)
RETURNS jsonb LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT hmr.need_primary('记录互认结果');
    SELECT hmr.page_decisions_json(check_id)
$$;

-- What became of one order: recognised (互认, with the report: do not perform it), revoked
-- (recognised, but its report was revoked at its hospital since: perform it), declined
-- (不互认), or no decision; and whether the platform has the decision.
CREATE FUNCTION public.hmr_order_recognition(order_id text)
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
