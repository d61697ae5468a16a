-- The gate: the hospital's policy, and the save-time check on the HIS's order tables.

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
                      HINT = '请为每条医嘱选择：互认 SELECT hmr_record_decision(check_id, order_id, true)；'
                             '不互认 SELECT hmr_record_decision(check_id, order_id, false, 原因代码, 原因说明)；'
                             '然后再次保存。';
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
