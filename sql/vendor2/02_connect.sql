-- Connecting the second vendor (01_vendor_schema.sql) to hmr: source views, grants, capture.
CREATE SCHEMA hmr_src;
CREATE VIEW hmr_src.patient AS
SELECT brid AS patient_id, '01' AS id_type, upper(sfzh) AS id_no, xm AS name, hmr.code('gender', xb) AS gender_code,
       csrq AS birth_date, lxdh AS phone, jdsj AT TIME ZONE 'Asia/Shanghai' AS registered_at,
       xgsj AT TIME ZONE 'Asia/Shanghai' AS updated_at FROM yy.mzbr
UNION ALL
SELECT zybrid, '01', upper(sfzh), xm, hmr.code('gender', xb), csrq, lxdh, rysj AT TIME ZONE 'Asia/Shanghai',
       xgsj AT TIME ZONE 'Asia/Shanghai' FROM yy.zybr;
CREATE VIEW hmr_src.department AS
SELECT ksdm AS dept_code, ksmc AS dept_name, bzks AS std_dept_code, yq AS campus_code, sjks AS parent_code,
       hmr.code('active', zt) AS status, xgsj AT TIME ZONE 'Asia/Shanghai' AS updated_at FROM yy.ksdm;
CREATE VIEW hmr_src.staff AS
SELECT gh AS staff_no, xm AS name, hmr.code('gender', xb) AS gender_code, ksdm AS dept_code, zc AS title_code,
       zyzsh AS practice_cert_no, hmr.code('role', lb) AS role, hmr.code('active', zt) AS status,
       xgsj AT TIME ZONE 'Asia/Shanghai' AS updated_at FROM yy.ryzd;
CREATE VIEW hmr_src.lab_report AS
SELECT b.bgdh AS report_no, b.brid AS patient_id, p.id_type, p.id_no, p.name AS patient_name,
       hmr.code('visit_type', b.jzlx) AS visit_type, b.jzh AS visit_no, b.sqdh AS order_no, b.ksdm AS dept_code,
       b.ysgh AS request_doctor_no, b.bbmc AS specimen_name, b.cjsj AT TIME ZONE 'Asia/Shanghai' AS sampled_at,
       b.bgsj AT TIME ZONE 'Asia/Shanghai' AS reported_at, b.shsj AT TIME ZONE 'Asia/Shanghai' AS audited_at,
       b.shr AS auditor_no, b.xmdm AS local_item_code, b.xmmc AS local_item_name
FROM yy.jybg b JOIN hmr_src.patient p ON p.patient_id = b.brid WHERE b.zt = 1;
CREATE VIEW hmr_src.lab_item AS
SELECT bgdh AS report_no, xh AS seq, zbdm AS item_code, zbmc AS item_name, jg AS result_value, dw AS result_unit,
       ckfw AS reference_range, hmr.code('abnormal_flag', bz) AS abnormal_flag, wjz <> 0 AS critical_flag FROM yy.jyjg;
INSERT INTO hmr.item_map (type, local_code, data_code) VALUES ('lab', 'XCG', 'JY0001'), ('lab', 'GGN', 'JY0004');
GRANT USAGE ON SCHEMA hmr_src, yy TO hmr_worker;
GRANT SELECT ON ALL TABLES IN SCHEMA hmr_src, yy TO hmr_worker;
SELECT hmr.watch('patient', 'yy.mzbr', 'brid');
SELECT hmr.watch('patient', 'yy.zybr', 'zybrid');
SELECT hmr.watch('department', 'yy.ksdm', 'ksdm');
SELECT hmr.watch('staff', 'yy.ryzd', 'gh');
SELECT hmr.watch('lab_report', 'yy.jybg', 'bgdh', 'OLD.zt IS DISTINCT FROM NEW.zt');
SELECT hmr.watch('lab_report', 'yy.jyjg', 'bgdh');
