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
       r.reported_at,
       r.audited_at,
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

SELECT hmr.watch('patient', 'his.patient', 'patient_id');
SELECT hmr.watch('patient', 'his.wechat_registration', 'patient_id');
SELECT hmr.watch('department', 'his.department', 'dept_code');
SELECT hmr.watch('staff', 'his.staff', 'staff_no');
-- Reports: only a change of audit status matters (审核, 取消审核, 重新审核).
SELECT hmr.watch('lab_report', 'lis.report', 'report_no',
                 'OLD.status IS DISTINCT FROM NEW.status OR OLD.audited_at IS DISTINCT FROM NEW.audited_at');
