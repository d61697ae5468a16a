-- How the sample HIS connects to hmr, in SQL alone: source views with hmr's canonical
-- columns (see README "Source views"), then capture triggers on the HIS tables.
CREATE SCHEMA IF NOT EXISTS hmr_src;

-- Patients come from two registration paths; the view is their union.
CREATE OR REPLACE VIEW hmr_src.patient AS
SELECT p.patient_id,
       p.id_type,
       upper(trim(p.id_no))  AS id_no,
       p.name,
       p.sex::text           AS gender_code,
       p.birthday            AS birth_date,
       nullif(p.phone, '')   AS phone,
       p.created_at          AS registered_at,
       p.updated_at
FROM his.patient p
UNION ALL
SELECT w.patient_id, '01', upper(trim(w.id_no)), w.name, w.sex::text, w.birthday, nullif(w.phone, ''),
       w.created_at, w.updated_at
FROM his.wechat_registration w;

CREATE OR REPLACE VIEW hmr_src.department AS
SELECT d.dept_code,
       d.dept_name,
       d.std_code     AS std_dept_code,
       d.campus       AS campus_code,
       d.parent_code,
       CASE WHEN d.active THEN '1' ELSE '0' END AS status,
       d.updated_at
FROM his.department d;

CREATE OR REPLACE VIEW hmr_src.staff AS
SELECT s.staff_no,
       s.name,
       s.sex::text    AS gender_code,
       s.dept_code,
       s.title_code,
       s.cert_no      AS practice_cert_no,
       s.role,
       CASE WHEN s.active THEN '1' ELSE '0' END AS status,
       s.external,
       s.updated_at
FROM his.staff s;

-- Only audited reports qualify: an un-audited one drops out of the view, and the worker
-- revokes what the platform holds.
CREATE OR REPLACE VIEW hmr_src.lab_report AS
SELECT r.report_no,
       r.patient_id,
       p.id_type,
       upper(trim(p.id_no)) AS id_no,
       p.name               AS patient_name,
       r.visit_type,
       r.visit_no,
       r.apply_no           AS order_no,
       r.dept_code,
       r.doctor_no          AS request_doctor_no,
       r.specimen_code,
       r.specimen_name,
       r.barcode            AS specimen_no,
       r.sampled_at,
       r.received_at,       -- printed on a rendered PDF (标本接收时间)
       r.reported_at,
       r.audited_at,
       r.tester_no,         -- printed as the 检验者's name (looked up in hmr_src.staff)
       r.auditor_no,
       r.group_code         AS category_code,
       r.group_name         AS category_name,
       r.group_code         AS data_code
FROM lis.report r
JOIN his.patient p USING (patient_id)
WHERE r.status = 'audited';

CREATE OR REPLACE VIEW hmr_src.lab_item AS
SELECT x.report_no,
       x.seq,
       x.item_code,
       x.item_name,
       x.value  AS result_value,
       x.unit   AS result_unit,
       x.ref_range AS reference_range,
       CASE x.flag WHEN 'N' THEN '1' WHEN 'H' THEN '2' WHEN 'L' THEN '3' WHEN 'A' THEN '4' END AS abnormal_flag,
       x.critical AS critical_flag
FROM lis.result x;

-- Reason and operator of a 取消审核, sent with the revoke.
CREATE OR REPLACE VIEW hmr_src.revocation AS
SELECT 'lab_report'::text AS kind, u.report_no, u.reason, u.operator AS operator_no, u.at AS revoked_at
FROM lis.unaudit_log u;

-- Exam reports from the RIS: final ones only; the RIS item code maps to the platform
-- catalog through hmr.item_map (unmapped items are listed in hmr.unmapped_items).
CREATE OR REPLACE VIEW hmr_src.exam_report AS
SELECT e.exam_no              AS report_no,
       e.patient_id,
       p.id_type,
       upper(trim(p.id_no))   AS id_no,
       p.name                 AS patient_name,
       e.visit_type,
       e.visit_no,
       e.apply_no             AS order_no,
       e.dept_code,
       e.doctor_no            AS request_doctor_no,
       e.modality             AS exam_class,
       e.item_code            AS exam_item_code,
       e.item_name            AS exam_item_name,
       e.item_code            AS local_item_code,
       e.item_name            AS local_item_name,
       e.body_part            AS body_part_name,
       e.accession_no,
       e.study_uid            AS study_instance_uid,
       e.findings,
       e.conclusion           AS impression,
       e.examined_at,
       e.reported_at,
       e.audited_at,
       e.reporter             AS reporter_no,
       e.auditor              AS auditor_no,
       e.critical             AS critical_flag,
       e.pdf
FROM ris.exam_report e
JOIN his.patient p USING (patient_id)
WHERE e.status = 'F';

-- The RIS has no triggers: poll it by audit time (here without delay; a hospital whose
-- radiologists correct reports within minutes sets e.g. delay = '10 minutes').
INSERT INTO hmr.polled_sources (kind, time_column, delay, lookback)
VALUES ('exam_report', 'audited_at', '0', '1 day');

SELECT hmr.watch('patient', 'his.patient', 'patient_id');
SELECT hmr.watch('patient', 'his.wechat_registration', 'patient_id');
SELECT hmr.watch('department', 'his.department', 'dept_code');
SELECT hmr.watch('staff', 'his.staff', 'staff_no');
-- Reports: on the header only a change of audit status matters (审核, 取消审核, 重新审核); a
-- result corrected on an audited report (the items table) is a new version of the report.
SELECT hmr.watch('lab_report', 'lis.report', 'report_no',
                 'OLD.status IS DISTINCT FROM NEW.status OR OLD.audited_at IS DISTINCT FROM NEW.audited_at');
SELECT hmr.watch('lab_report', 'lis.result', 'report_no');
