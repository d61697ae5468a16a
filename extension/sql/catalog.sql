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

-- Reports met with a local item code that had no mapping (one row per report, its latest
-- code). Adding the mapping releases the ones held for it and sends again, as their next
-- version, the ones that went without it (hmr.item_mapped).
CREATE TABLE hmr.unmapped_reports (
    kind        text NOT NULL,
    key         text NOT NULL,
    type        text NOT NULL,
    local_code  text NOT NULL,
    local_name  text,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, key)
);
CREATE INDEX unmapped_reports_code_idx ON hmr.unmapped_reports (type, local_code);

-- What is unmapped now: each local code without a mapping, how many reports met it, how many
-- wait for it (policy hold) and the oldest of those.
CREATE VIEW hmr.unmapped_items AS
SELECT r.type, r.local_code, max(r.local_name) AS local_name, count(*) AS reports,
       count(o.id) AS held, min(o.created_at) AS oldest_held_since,
       (array_agg(r.key ORDER BY o.created_at) FILTER (WHERE o.id IS NOT NULL))[1] AS oldest_held_report,
       min(r.first_seen) AS first_seen, max(r.last_seen) AS last_seen
FROM hmr.unmapped_reports r
LEFT JOIN hmr.outbox o ON o.kind = r.kind AND o.key = r.key AND o.state = 'quarantined'
      AND o.waits_for_kind = 'item_map' AND o.waits_for_key = r.type || ':' || r.local_code
WHERE NOT EXISTS (SELECT 1 FROM hmr.item_map m WHERE m.type = r.type AND m.local_code = r.local_code)
GROUP BY r.type, r.local_code;

-- A mapping added (or changed): the reports held for it go; the ones sent without a code go
-- again (the worker reads them anew, now with the code: the next version).
CREATE FUNCTION hmr.item_mapped() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE hmr.outbox o
       SET state = 'pending', plan = NULL, plan_pdf = NULL, step = 0, generation = o.generation + 1, attempts = 0,
           next_attempt_at = '-infinity', last_error = NULL, error_field = NULL,
           error_reason = NULL, failed_at = NULL, waits_for_kind = NULL, waits_for_key = NULL
     WHERE o.state = 'quarantined' AND o.waits_for_kind = 'item_map'
       AND o.waits_for_key = NEW.type || ':' || NEW.local_code;
    INSERT INTO hmr.outbox (kind, key, op)
    SELECT r.kind, r.key, 'S'
      FROM hmr.unmapped_reports r
      JOIN hmr.delivered d ON d.kind = r.kind AND d.key = r.key AND NOT d.revoked
     WHERE r.type = NEW.type AND r.local_code = NEW.local_code
       AND NOT EXISTS (SELECT 1 FROM hmr.outbox o WHERE o.kind = r.kind AND o.key = r.key);
    DELETE FROM hmr.unmapped_reports r WHERE r.type = NEW.type AND r.local_code = NEW.local_code;
    PERFORM hmr.wake_workers();
    RETURN NULL;
END
$$;
CREATE TRIGGER item_mapped AFTER INSERT OR UPDATE ON hmr.item_map
    FOR EACH ROW EXECUTE FUNCTION hmr.item_mapped();
