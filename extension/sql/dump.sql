-- ===================================================================== dump and restore
-- Everything that is state or configuration goes into pg_dump with the HIS database, so a
-- restored database (a move, an upgrade) resends nothing and keeps its audit trail: the
-- outbox and what was delivered, decisions, checks, downloads, the catalog and mappings,
-- polled-source watermarks, backfill checkpoints, the platform settings and the policy, and
-- the sequences that number them. Caches and worker presence (unlogged) are not state.
DO $$
DECLARE
    t text;
BEGIN
    -- One call per statement: each updates the extension's row (pg_extension).
    FOREACH t IN ARRAY ARRAY['hmr.event_id_seq', 'hmr.captured', 'hmr.outbox', 'hmr.outbox_history', 'hmr.delivered',
                             'hmr.backfill_id_seq', 'hmr.backfills', 'hmr.catalog', 'hmr.item_map', 'hmr.unmapped_reports',
                             'hmr.polled_sources', 'hmr.polled_seen', 'hmr.polled_hashes', 'hmr.platform', 'hmr.checks', 'hmr.prompts',
                             'hmr.decision_id_seq', 'hmr.decisions', 'hmr.retained_reports',
                             'hmr.download_log_id_seq', 'hmr.download_log', 'hmr.guarded',
                             'hmr.list_log_id_seq', 'hmr.list_log', 'hmr.item_prices', 'hmr.upload_days'] LOOP
        PERFORM pg_catalog.pg_extension_config_dump(t::regclass, '');
    END LOOP;
END
$$;
