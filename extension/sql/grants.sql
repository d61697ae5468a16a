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
GRANT EXECUTE ON FUNCTION hmr.patient_orders_to_perform(text) TO hmr_his, hmr_admin;
GRANT EXECUTE ON FUNCTION hmr.report_marks(text[]) TO hmr_his, hmr_admin;
GRANT SELECT ON hmr.guarded, hmr.guards, hmr.catalog, hmr.item_map TO hmr_his;
-- Per order, what was decided and whether to perform it; never who decided (no HIS login
-- counts a doctor's 互认 figures: those are the hospital administrators', hmr_admin).
GRANT SELECT (order_id, check_id, report_id, recognised, reason_code, reason_text, decided_at, delivered, revoked_at)
      ON hmr.order_recognitions TO hmr_his;
GRANT SELECT (order_id, check_id, report_id, decided_at, revoked_at) ON hmr.orders_to_perform TO hmr_his;
-- hmr-worker serve logs in as a HIS role and finds the patient and staff views here.
GRANT SELECT ON hmr.kinds TO hmr_his;
-- serve (a HIS role) claims each verified token's jti (issue #29 J8).
GRANT EXECUTE ON FUNCTION hmr.claim_jti(text, text, timestamptz) TO hmr_his;
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
GRANT EXECUTE ON FUNCTION hmr.adopt_page_decision(text, text, text, boolean, text, text, text, timestamptz) TO hmr_worker;
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
