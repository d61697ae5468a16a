-- A sample HIS/LIS schema, shaped like a typical vendor's: the demo and the tests use it,
-- and it shows a DBA how their own tables connect to hmr. Nothing here is hmr's.
CREATE SCHEMA his;
CREATE SCHEMA lis;

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
    reported_at   timestamptz,
    audited_at    timestamptz,
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
