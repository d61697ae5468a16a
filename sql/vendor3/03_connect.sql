-- Connecting the MariaDB HIS of 01_mariadb_schema.sql to hmr, in the HIS's PostgreSQL database
-- with hmr: the foreign tables, the source views, what each poll reads, the polled sources.
-- Edit the server's host and port and the login. tests/tests/vendor3.rs counts the lines (≤ 40).
CREATE EXTENSION IF NOT EXISTS mysql_fdw;
CREATE SERVER his_mariadb FOREIGN DATA WRAPPER mysql_fdw OPTIONS (host '127.0.0.1', port '3306');
CREATE USER MAPPING FOR PUBLIC SERVER his_mariadb OPTIONS (username 'hmr', password 'change-me');
CREATE SCHEMA his_remote;
IMPORT FOREIGN SCHEMA his FROM SERVER his_mariadb INTO his_remote;
CREATE SCHEMA hmr_src;
CREATE VIEW hmr_src.patient AS
SELECT brid AS patient_id, '01' AS id_type, upper(sfzh) AS id_no, xm AS name, hmr.code('gender', xb) AS gender_code,
       csrq AS birth_date, lxdh AS phone, jdsj AT TIME ZONE 'Asia/Shanghai' AS registered_at,
       gxsj AT TIME ZONE 'Asia/Shanghai' AS updated_at FROM his_remote.mzbr
UNION ALL SELECT zyid, '01', upper(sfzh), xm, hmr.code('gender', xb), csrq, NULL, rysj AT TIME ZONE 'Asia/Shanghai',
       gxsj AT TIME ZONE 'Asia/Shanghai' FROM his_remote.zybr;
CREATE VIEW hmr_src.department AS
SELECT ksdm AS dept_code, ksmc AS dept_name, bzks AS std_dept_code, yq AS campus_code, sjks AS parent_code,
       hmr.code('active', zt) AS status, hmr.changed_at('his-departments', ksdm) AS updated_at FROM his_remote.ksdm;
CREATE VIEW hmr_src.staff AS
SELECT gh AS staff_no, xm AS name, hmr.code('gender', xb) AS gender_code, ksdm AS dept_code, hmr.code('title', zc) AS title_code,
       hmr.code('role', js) AS role, hmr.code('active', zt) AS status, hmr.changed_at('his-staff', gh) AS updated_at FROM his_remote.ryxx;
-- No join to hmr_src.patient: the worker takes id_type, id_no and the name from it by patient_id.
CREATE VIEW hmr_src.lab_report AS
SELECT bgdh AS report_no, brid AS patient_id, hmr.code('visit_type', jzlx) AS visit_type, jzh AS visit_no, ksdm AS dept_code,
       sqys AS request_doctor_no, bbmc AS specimen_name, cysj AT TIME ZONE 'Asia/Shanghai' AS sampled_at, bgsj AT TIME ZONE 'Asia/Shanghai' AS reported_at,
       shsj AT TIME ZONE 'Asia/Shanghai' AS audited_at, shr AS auditor_no, xmdm AS local_item_code, xmmc AS local_item_name FROM his_remote.jybg WHERE zt = '已审核';
CREATE VIEW hmr_src.lab_item AS
SELECT bgdh AS report_no, xh AS seq, zbdm AS item_code, zbmc AS item_name, jg AS result_value, dw AS result_unit,
       ckfw AS reference_range, hmr.code('abnormal_flag', bz) AS abnormal_flag FROM his_remote.jyjg;
-- What each poll reads: the raw change times, so that its bounds are sent to MariaDB.
CREATE VIEW hmr_src.patient_changes AS SELECT brid AS patient_id, gxsj AS updated_at FROM his_remote.mzbr UNION ALL SELECT zyid, gxsj FROM his_remote.zybr;
CREATE VIEW hmr_src.lab_changes AS SELECT bgdh AS report_no, shsj AS audited_at FROM his_remote.jybg WHERE zt = '已审核';
CREATE VIEW hmr_src.lab_result_changes AS SELECT bgdh AS report_no, xgsj AS changed_at FROM his_remote.jyjg;
INSERT INTO hmr.polled_sources (name, kind, source_view, time_column, compare_every) VALUES
    ('his-patients', 'patient', 'hmr_src.patient_changes', 'updated_at', NULL), ('his-departments', 'department', NULL, NULL, '10 seconds'),
    ('his-staff', 'staff', NULL, NULL, '10 seconds'), ('his-lab', 'lab_report', 'hmr_src.lab_changes', 'audited_at', NULL),
    ('his-lab-results', 'lab_report', 'hmr_src.lab_result_changes', 'changed_at', NULL);
INSERT INTO hmr.item_map (type, local_code, data_code) VALUES ('lab', 'XCG', 'JY0001');
GRANT USAGE ON SCHEMA hmr_src TO hmr_worker;
GRANT SELECT ON ALL TABLES IN SCHEMA hmr_src TO hmr_worker;
