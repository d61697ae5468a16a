-- A sample HIS/LIS schema, shaped like a typical vendor's: the demo and the tests use it,
-- and it shows a DBA how their own tables connect to hmr. Nothing here is hmr's.
CREATE SCHEMA his;
CREATE SCHEMA lis;
CREATE SCHEMA ris;

-- 患者主索引: registered from several points (outpatient, admission, kiosk, WeChat).
CREATE TABLE his.patient (
    patient_id     text PRIMARY KEY,
    id_type        text NOT NULL DEFAULT '01',
    id_no          text NOT NULL,
    name           text NOT NULL,
    sex            smallint NOT NULL,          -- 0 unknown, 1 male, 2 female, 9 unstated
    birthday       date NOT NULL,
    phone          text,
    registered_via text NOT NULL DEFAULT 'outpatient',
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Registrations from the WeChat service account land in their own table, with a patient id
-- from the same HIS sequence: a second path by which patients appear (多端同步).
CREATE TABLE his.wechat_registration (
    patient_id  text PRIMARY KEY,
    openid      text NOT NULL,
    id_no       text NOT NULL,
    name        text NOT NULL,
    sex         smallint NOT NULL,
    birthday    date NOT NULL,
    phone       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- 科室字典 of both campuses (院区): HZ01 main, HZ02 branch.
CREATE TABLE his.department (
    dept_code   text PRIMARY KEY,
    dept_name   text NOT NULL,
    std_code    text NOT NULL,                 -- 标准科室代码, e.g. A03 内科
    campus      text NOT NULL,
    parent_code text,                          -- no foreign key: vendors often have none
    active      boolean NOT NULL DEFAULT true,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- 人员字典: employees, and external experts / trainees (外院专家, 进修).
CREATE TABLE his.staff (
    staff_no    text PRIMARY KEY,
    name        text NOT NULL,
    sex         smallint,
    dept_code   text NOT NULL REFERENCES his.department,
    title_code  text,
    cert_no     text,
    role        text NOT NULL DEFAULT 'doctor',
    active      boolean NOT NULL DEFAULT true,
    external    boolean NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- LIS report header: `status` goes draft → audited (审核); un-audit sets it back.
CREATE TABLE lis.report (
    report_no     text PRIMARY KEY,
    patient_id    text NOT NULL REFERENCES his.patient,
    visit_type    text NOT NULL DEFAULT '1',
    visit_no      text,
    apply_no      text,
    dept_code     text,
    doctor_no     text,
    specimen_code text,
    specimen_name text,
    barcode       text,
    group_code    text,                        -- the LIS test group; maps to the platform catalog
    group_name    text,
    sampled_at    timestamptz,
    received_at   timestamptz,                 -- 标本接收
    reported_at   timestamptz,
    audited_at    timestamptz,
    tester_no     text,                        -- 检验者
    auditor_no    text,
    status        text NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'audited'))
);

CREATE TABLE lis.result (
    report_no  text NOT NULL REFERENCES lis.report ON DELETE CASCADE,
    seq        integer NOT NULL,
    item_code  text NOT NULL,
    item_name  text NOT NULL,
    value      text,
    unit       text,
    ref_range  text,
    flag       text,                           -- H high, L low, N normal, A abnormal, '' none
    critical   boolean NOT NULL DEFAULT false,
    PRIMARY KEY (report_no, seq)
);

-- LIS 取消审核 log: who un-audited a report and why (the revoke carries it).
CREATE TABLE lis.unaudit_log (
    report_no  text NOT NULL,
    reason     text NOT NULL,
    operator   text NOT NULL,
    at         timestamptz NOT NULL DEFAULT now()
);

-- The exam system (RIS/PACS/ultrasound/endoscopy), a vendor table without hmr triggers:
-- hmr polls it. status P preliminary, F final, C cancelled.
CREATE TABLE ris.exam_report (
    exam_no      text PRIMARY KEY,
    patient_id   text NOT NULL,
    visit_type   text NOT NULL DEFAULT '1',
    visit_no     text,
    apply_no     text,
    dept_code    text,
    doctor_no    text,
    modality     text NOT NULL,                -- CT, MR, DR, US, ES …
    item_code    text NOT NULL,                -- the RIS's own exam item code
    item_name    text NOT NULL,
    body_part    text,
    accession_no text,
    study_uid    text,
    findings     text,
    conclusion   text,
    examined_at  timestamptz,
    reported_at  timestamptz,
    audited_at   timestamptz,
    reporter     text,
    auditor      text,
    status       text NOT NULL DEFAULT 'P',
    critical     boolean NOT NULL DEFAULT false,
    pdf          bytea                         -- the RIS's own PDF, when it makes one
);
