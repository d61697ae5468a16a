-- Statistics (互认统计): what the badge showed and what the doctors decided, per month.

-- Every call of the recognition list (the badge: 调阅 and 提醒): who looked, for which patient
-- (masked), what it showed. Not written on a hot standby or in a read-only transaction.
CREATE SEQUENCE hmr.list_log_id_seq;
CREATE TABLE hmr.list_log (
    id            bigint PRIMARY KEY DEFAULT nextval('hmr.list_log_id_seq'),
    called_at     timestamptz NOT NULL DEFAULT now(),
    doctor_no     text,
    dept_code     text,
    visit_no      text,
    id_no_masked  text,
    kind          text NOT NULL,
    -- status ok: how many recognisable reports the badge showed; unavailable: NULL
    shown         integer,
    status        text NOT NULL,
    cached        boolean NOT NULL DEFAULT false,
    called_by     text NOT NULL DEFAULT session_user,
    -- the calling workstation as the HIS names it (outpatient, inpatient, emergency, …)
    workstation   text
);
CREATE INDEX list_log_called_idx ON hmr.list_log (called_at);

-- The hospital's price per catalog item (optional), to estimate what recognition saved.
CREATE TABLE hmr.item_prices (
    data_code  text PRIMARY KEY REFERENCES hmr.catalog,
    price      numeric(12, 2) NOT NULL CHECK (price >= 0)
);

-- 互认 by month (Beijing time) × department × doctor × catalog item: how often doctors were
-- warned of a duplicate (prompts: one per order a refused save left undecided), what they
-- decided (the decision that counts; decisions of a check the platform refused do not),
-- the 互认率, the 不互认 reasons (01–06), the repeat tests avoided and, with a price in
-- hmr.item_prices, what they would have cost. Totals: hmr.recognition_totals.
CREATE VIEW hmr.recognition_stats AS
WITH prompted AS (
    SELECT date_trunc('month', p.prompted_at AT TIME ZONE 'Asia/Shanghai')::date AS month,
           c.dept_code, c.doctor_no, m->>'data_code' AS data_code, count(*) AS prompts
      FROM hmr.prompts p
      JOIN hmr.checks c USING (check_id)
     CROSS JOIN LATERAL jsonb_array_elements(p.undecided) m
     GROUP BY 1, 2, 3, 4),
decided AS (
    SELECT date_trunc('month', d.decided_at AT TIME ZONE 'Asia/Shanghai')::date AS month,
           d.dept_code, d.doctor_no,
           (SELECT m->>'data_code' FROM jsonb_array_elements(c.matches) m
             WHERE m->>'order_id' = d.order_id LIMIT 1) AS data_code,
           d.recognise, d.reason_code
      FROM hmr.current_decisions d
      JOIN hmr.checks c ON c.check_id = d.check_id AND c.refused_at IS NULL),
counted AS (
    SELECT month, dept_code, doctor_no, data_code,
           count(*) FILTER (WHERE recognise) AS recognised,
           count(*) FILTER (WHERE NOT recognise) AS declined,
           count(*) FILTER (WHERE reason_code = '01') AS declined_01,
           count(*) FILTER (WHERE reason_code = '02') AS declined_02,
           count(*) FILTER (WHERE reason_code = '03') AS declined_03,
           count(*) FILTER (WHERE reason_code = '04') AS declined_04,
           count(*) FILTER (WHERE reason_code = '05') AS declined_05,
           count(*) FILTER (WHERE reason_code = '06') AS declined_06
      FROM decided
     GROUP BY 1, 2, 3, 4)
SELECT month, dept_code, doctor_no, data_code, c.name AS item_name,
       coalesce(p.prompts, 0) AS prompts,
       coalesce(d.recognised, 0) AS recognised,
       coalesce(d.declined, 0) AS declined,
       round(d.recognised::numeric / nullif(d.recognised + d.declined, 0), 4) AS recognition_rate,
       coalesce(d.declined_01, 0) AS declined_01, coalesce(d.declined_02, 0) AS declined_02,
       coalesce(d.declined_03, 0) AS declined_03, coalesce(d.declined_04, 0) AS declined_04,
       coalesce(d.declined_05, 0) AS declined_05, coalesce(d.declined_06, 0) AS declined_06,
       coalesce(d.recognised, 0) AS repeats_avoided,
       coalesce(d.recognised, 0) * ip.price AS saved
FROM prompted p
FULL JOIN counted d USING (month, dept_code, doctor_no, data_code)
LEFT JOIN hmr.catalog c USING (data_code)
LEFT JOIN hmr.item_prices ip USING (data_code);

-- The same per month for the whole hospital, with the list calls (调阅) and the downloads of
-- recognised reports.
CREATE VIEW hmr.recognition_totals AS
WITH s AS (
    SELECT month, sum(prompts) AS prompts, sum(recognised) AS recognised, sum(declined) AS declined,
           sum(repeats_avoided) AS repeats_avoided, sum(saved) AS saved
      FROM hmr.recognition_stats GROUP BY month),
l AS (
    SELECT date_trunc('month', called_at AT TIME ZONE 'Asia/Shanghai')::date AS month,
           count(*) AS list_calls, count(*) FILTER (WHERE shown > 0) AS list_calls_with_results
      FROM hmr.list_log GROUP BY 1),
dl AS (
    SELECT date_trunc('month', read_at AT TIME ZONE 'Asia/Shanghai')::date AS month, count(*) AS downloads
      FROM hmr.download_log WHERE source IN ('kept', 'platform') GROUP BY 1)
SELECT month,
       coalesce(l.list_calls, 0) AS list_calls,
       coalesce(l.list_calls_with_results, 0) AS list_calls_with_results,
       coalesce(s.prompts, 0) AS prompts,
       coalesce(s.recognised, 0) AS recognised,
       coalesce(s.declined, 0) AS declined,
       round(s.recognised / nullif(s.recognised + s.declined, 0), 4) AS recognition_rate,
       coalesce(dl.downloads, 0) AS downloads,
       coalesce(s.repeats_avoided, 0) AS repeats_avoided,
       s.saved
FROM s FULL JOIN l USING (month) FULL JOIN dl USING (month);
