-- Sample departments (two campuses), staff, patients and lab reports (draft): the demo
-- audits the reports afterwards.
INSERT INTO his.department (dept_code, dept_name, std_code, campus, parent_code) VALUES
    ('03',   '内科',       'A03', 'HZ01', NULL),
    ('0301', '心血管内科', 'A03.01', 'HZ01', '03'),
    ('05',   '外科',       'A04', 'HZ01', NULL),
    ('0502', '普通外科',   'A04.01', 'HZ01', '05'),
    ('30',   '检验科',     'A30', 'HZ01', NULL),
    ('B03',  '内科(仲恺院区)', 'A03', 'HZ02', NULL);

INSERT INTO his.staff (staff_no, name, sex, dept_code, title_code, cert_no, role, external) VALUES
    ('D001', '王建华', 1, '0301', '231', '110440000012345', 'doctor',     false),
    ('D002', '李秀英', 2, '0502', '232', '110440000023456', 'doctor',     false),
    ('T001', '张伟',   1, '30',   '252', NULL,              'technician', false),
    ('T002', '刘芳',   2, '30',   '253', NULL,              'technician', false),
    ('E001', '周教授', 1, 'B03',  '231', '110110000034567', 'doctor',     true);

INSERT INTO his.patient (patient_id, id_no, name, sex, birthday, phone, registered_via) VALUES
    ('P0001', '441302198003151233', '陈志明', 1, '1980-03-15', '13800000001', 'outpatient'),
    ('P0002', '441302199211082345', '林晓燕', 2, '1992-11-08', NULL,          'wechat'),
    ('P0003', '441322197505213458', '黄国强', 1, '1975-05-21', '13800000003', 'admission');

INSERT INTO lis.report (report_no, patient_id, visit_no, apply_no, dept_code, doctor_no, specimen_code,
                        specimen_name, barcode, group_code, group_name, sampled_at, received_at, reported_at,
                        tester_no, auditor_no) VALUES
    ('L20261126001', 'P0001', 'MZ001', 'SQ001', '0301', 'D001', 'BLD', '全血', 'B0001', 'JY0001', '血常规',
     now() - interval '3 hours', now() - interval '150 minutes', now() - interval '1 hour', 'T002', 'T001'),
    ('L20261126002', 'P0002', 'MZ002', 'SQ002', '0301', 'D001', 'SER', '血清', 'B0002', 'JY0004', '肝功能',
     now() - interval '3 hours', now() - interval '150 minutes', now() - interval '1 hour', 'T001', 'T002'),
    ('L20261126003', 'P0003', 'ZY003', 'SQ003', '0502', 'D002', 'SER', '血清', 'B0003', 'JY0005', '肾功能',
     now() - interval '3 hours', now() - interval '150 minutes', now() - interval '1 hour', 'T002', 'T001');

INSERT INTO lis.result (report_no, seq, item_code, item_name, value, unit, ref_range, flag, critical) VALUES
    ('L20261126001', 1, 'WBC', '白细胞计数',   '6.5',  '10^9/L', '3.5-9.5',   'N', false),
    ('L20261126001', 2, 'RBC', '红细胞计数',   '4.1',  '10^12/L', '4.3-5.8',  'L', false),
    ('L20261126001', 3, 'HGB', '血红蛋白',     '128',  'g/L',    '130-175',   'L', false),
    ('L20261126001', 4, 'PLT', '血小板计数',   '210',  '10^9/L', '125-350',   'N', false),
    ('L20261126002', 1, 'ALT', '丙氨酸氨基转移酶', '85', 'U/L',  '7-40',      'H', false),
    ('L20261126002', 2, 'AST', '天门冬氨酸氨基转移酶', '60', 'U/L', '13-35',  'H', false),
    ('L20261126002', 3, 'TBIL', '总胆红素',    '15.2', 'μmol/L', '0-21',      'N', false),
    ('L20261126003', 1, 'CREA', '肌酐',        '98',   'μmol/L', '57-111',    'N', false),
    ('L20261126003', 2, 'UREA', '尿素',        '6.1',  'mmol/L', '3.1-8.0',   'N', false);

-- RIS item codes → platform catalog (the catalog is loaded first: hmr.load_catalog).
INSERT INTO hmr.item_map (type, local_code, data_code) VALUES
    ('exam', 'CT-HEAD',  'JC0001'),
    ('exam', 'CT-CHEST', 'JC0002');

-- A final CT report (polled from the RIS) and a preliminary one (not uploaded yet).
INSERT INTO ris.exam_report (exam_no, patient_id, visit_no, apply_no, dept_code, doctor_no, modality, item_code,
                             item_name, body_part, accession_no, study_uid, findings, conclusion, examined_at,
                             reported_at, audited_at, reporter, auditor, status) VALUES
    ('E20261126001', 'P0003', 'ZY003', 'SQ101', '0502', 'D002', 'CT', 'CT-CHEST', '胸部CT平扫', '胸部',
     'A0001', '1.2.840.1.1', '双肺纹理清晰，未见明显实质性病变。纵隔居中，心影不大。', '胸部CT平扫未见明显异常。',
     now() - interval '2 hours', now() - interval '90 minutes', now() - interval '80 minutes', 'D002', 'D001', 'F'),
    ('E20261126002', 'P0001', 'MZ001', 'SQ102', '0301', 'D001', 'US', 'US-ABD', '腹部彩超', '腹部',
     'A0002', NULL, '肝胆胰脾未见明显异常。', '腹部彩超未见异常。',
     now() - interval '1 hour', now() - interval '30 minutes', NULL, 'D001', NULL, 'P');
