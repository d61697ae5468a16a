-- Sources: the kinds of record the platform receives, the DBA-owned views each is read
-- from, and the code maps those views use. First of the files CREATE EXTENSION runs (the
-- order is in extension/src/lib.rs).

-- Kinds of record the platform receives, and the DBA-owned source view each is read from
-- at drain time. DBAs may point source_view at another view; the columns are documented
-- in the README (and checked by hmr.check_sources()).
CREATE TABLE hmr.kinds (
    kind           text PRIMARY KEY,
    source_view    text NOT NULL,
    key_column     text NOT NULL,
    item_view      text,
    batched        boolean NOT NULL,
    -- the column a backfill's `since` filters on
    changed_column text,
    description    text NOT NULL,
    -- a report whose local item code has no mapping in hmr.item_map: 'hold' it until the code
    -- is mapped (then it goes by itself), or 'send' it without a platform code (shared but
    -- never recognised; sent again with the code once mapped) (0.3.0)
    unmapped       text NOT NULL DEFAULT 'hold',
    CONSTRAINT kinds_unmapped_check CHECK (unmapped IN ('hold', 'send'))
);
INSERT INTO hmr.kinds VALUES
    ('patient',     'hmr_src.patient',     'patient_id', NULL,               true,  'updated_at',  '患者信息'),
    ('department',  'hmr_src.department',  'dept_code',  NULL,               true,  'updated_at',  '科室字典'),
    ('staff',       'hmr_src.staff',       'staff_no',   NULL,               true,  'updated_at',  '人员字典'),
    ('lab_report',  'hmr_src.lab_report',  'report_no',  'hmr_src.lab_item', false, 'reported_at', '检验报告'),
    ('exam_report', 'hmr_src.exam_report', 'report_no',  NULL,               false, 'reported_at', '检查报告'),
    ('decision',    'hmr.decisions',       'check_id',   NULL,               false, NULL,          '互认/不互认结果');
-- Kinds are dumped with the database (a DBA may point a kind at another view). A restore
-- loads them into the rows CREATE EXTENSION made: an insert of a kind that exists updates it.
CREATE FUNCTION hmr.kinds_restore() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE hmr.kinds k
       SET source_view = NEW.source_view, key_column = NEW.key_column, item_view = NEW.item_view,
           batched = NEW.batched, changed_column = NEW.changed_column, description = NEW.description,
       unmapped = NEW.unmapped
     WHERE k.kind = NEW.kind;
    IF FOUND THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER kinds_restore BEFORE INSERT ON hmr.kinds FOR EACH ROW EXECUTE FUNCTION hmr.kinds_restore();

-- Code maps: the words hospitals use for coded fields (性别 男/女, 门诊/住院, 在用/停用, 偏高/↑ …)
-- → the platform's codes, for source views: `hmr.code('gender', p.xb) AS gender_code`. The
-- built-in rows cover common Chinese HIS words; a DBA adds the hospital's own (builtin false,
-- dumped with the database).
CREATE TABLE hmr.code_map (
    domain   text NOT NULL,
    word     text NOT NULL,   -- compared trimmed and case-insensitively
    code     text NOT NULL,
    builtin  boolean NOT NULL DEFAULT false,
    PRIMARY KEY (domain, word)
);
INSERT INTO hmr.code_map (domain, word, code, builtin)
SELECT d, w, c, true FROM (VALUES
    ('gender', '男', '1'), ('gender', '男性', '1'), ('gender', 'm', '1'), ('gender', 'male', '1'), ('gender', '1', '1'),
    ('gender', '女', '2'), ('gender', '女性', '2'), ('gender', 'f', '2'), ('gender', 'female', '2'), ('gender', '2', '2'),
    ('gender', '未知', '0'), ('gender', '未知的性别', '0'), ('gender', 'u', '0'), ('gender', 'unknown', '0'), ('gender', '0', '0'),
    ('gender', '未说明', '9'), ('gender', '未说明的性别', '9'), ('gender', '9', '9'),
    ('id_type', '身份证', '01'), ('id_type', '居民身份证', '01'), ('id_type', '1', '01'), ('id_type', '01', '01'),
    ('id_type', '护照', '02'), ('id_type', '02', '02'),
    ('id_type', '港澳通行证', '03'), ('id_type', '港澳居民来往内地通行证', '03'), ('id_type', '回乡证', '03'), ('id_type', '03', '03'),
    ('id_type', '台胞证', '04'), ('id_type', '台湾居民来往大陆通行证', '04'), ('id_type', '04', '04'),
    ('id_type', '其他', '99'), ('id_type', '99', '99'),
    ('visit_type', '门诊', '1'), ('visit_type', 'o', '1'), ('visit_type', '1', '1'),
    ('visit_type', '急诊', '2'), ('visit_type', 'e', '2'), ('visit_type', '2', '2'),
    ('visit_type', '住院', '3'), ('visit_type', 'i', '3'), ('visit_type', '3', '3'),
    ('visit_type', '体检', '4'), ('visit_type', 'p', '4'), ('visit_type', '4', '4'),
    ('active', '在用', '1'), ('active', '启用', '1'), ('active', '有效', '1'), ('active', '正常', '1'),
    ('active', 'y', '1'), ('active', 'true', '1'), ('active', 't', '1'), ('active', '1', '1'),
    ('active', '停用', '0'), ('active', '禁用', '0'), ('active', '无效', '0'), ('active', '作废', '0'),
    ('active', 'n', '0'), ('active', 'false', '0'), ('active', 'f', '0'), ('active', '0', '0'),
    ('abnormal_flag', '正常', '1'), ('abnormal_flag', 'n', '1'), ('abnormal_flag', '1', '1'),
    ('abnormal_flag', '偏高', '2'), ('abnormal_flag', '高', '2'), ('abnormal_flag', 'h', '2'), ('abnormal_flag', '↑', '2'), ('abnormal_flag', '2', '2'),
    ('abnormal_flag', '偏低', '3'), ('abnormal_flag', '低', '3'), ('abnormal_flag', 'l', '3'), ('abnormal_flag', '↓', '3'), ('abnormal_flag', '3', '3'),
    ('abnormal_flag', '异常', '4'), ('abnormal_flag', '阳性', '4'), ('abnormal_flag', 'a', '4'), ('abnormal_flag', '+', '4'), ('abnormal_flag', '4', '4'),
    ('role', '医生', 'doctor'), ('role', '医师', 'doctor'), ('role', '技师', 'technician'), ('role', '技术员', 'technician'),
    ('role', '护士', 'nurse'), ('role', '药师', 'pharmacist'), ('role', '其他', 'other'),
    ('exam_class', 'ct', 'CT'), ('exam_class', 'mr', 'MR'), ('exam_class', 'mri', 'MR'), ('exam_class', '磁共振', 'MR'),
    ('exam_class', 'dr', 'DR'), ('exam_class', 'cr', 'DR'), ('exam_class', 'x线', 'DR'), ('exam_class', '放射', 'DR'),
    ('exam_class', 'us', 'US'), ('exam_class', '超声', 'US'), ('exam_class', 'b超', 'US'), ('exam_class', '彩超', 'US'),
    ('exam_class', 'es', 'ES'), ('exam_class', '内镜', 'ES'), ('exam_class', '胃镜', 'ES'), ('exam_class', '肠镜', 'ES'),
    ('exam_class', 'ecg', 'ECG'), ('exam_class', '心电', 'ECG'), ('exam_class', '心电图', 'ECG'),
    ('exam_class', 'nm', 'NM'), ('exam_class', '核医学', 'NM'), ('exam_class', 'path', 'PATH'), ('exam_class', '病理', 'PATH'),
    ('exam_class', 'other', 'OTHER'), ('exam_class', '其他', 'OTHER'),
    -- 职称 → GB/T 8561-2001 (the codes themselves map to themselves through hmr.code's fallback)
    ('title', '主任医师', '231'), ('title', '副主任医师', '232'), ('title', '主治医师', '233'), ('title', '医师', '234'),
    ('title', '住院医师', '234'), ('title', '医士', '235'),
    ('title', '主任药师', '241'), ('title', '副主任药师', '242'), ('title', '主管药师', '243'), ('title', '药师', '244'),
    ('title', '药士', '245'),
    ('title', '主任护师', '251'), ('title', '副主任护师', '252'), ('title', '主管护师', '253'), ('title', '护师', '254'),
    ('title', '护士', '255'),
    ('title', '主任技师', '261'), ('title', '副主任技师', '262'), ('title', '主管技师', '263'), ('title', '技师', '264'),
    ('title', '技士', '265'),
    ('title', '主任检验师', '261'), ('title', '副主任检验师', '262'), ('title', '主管检验师', '263'), ('title', '检验师', '264'),
    ('title', '检验士', '265')
) AS v(d, w, c);
SELECT pg_catalog.pg_extension_config_dump('hmr.code_map', 'WHERE NOT builtin');

-- The platform's code for a hospital's word (or code); an unknown word comes back as it is,
-- so hmr.check_sources() names it with the allowed codes. NULL and '' stay NULL.
CREATE FUNCTION hmr.code(domain text, value text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN nullif(trim(value), '') IS NULL THEN NULL
                ELSE coalesce((SELECT m.code FROM hmr.code_map m
                                WHERE m.domain = code.domain AND m.word = lower(trim(value))),
                              trim(value)) END
$$;
-- Numbers and other types (a smallint sex column): the same, on their text.
CREATE FUNCTION hmr.code(domain text, value anyelement) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT hmr.code(domain, value::text)
$$;

-- A yes/no flag from the words and numbers HIS tables use (是/否, Y/N, 1/0, true/false, 阳性).
CREATE FUNCTION hmr.flag(value text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE lower(trim(value))
             WHEN '是' THEN true WHEN 'y' THEN true WHEN 'yes' THEN true WHEN '1' THEN true
             WHEN 't' THEN true WHEN 'true' THEN true WHEN '阳性' THEN true WHEN '危急' THEN true
             WHEN '否' THEN false WHEN 'n' THEN false WHEN 'no' THEN false WHEN '0' THEN false
             WHEN 'f' THEN false WHEN 'false' THEN false WHEN '阴性' THEN false WHEN '' THEN false
           END
$$;
CREATE FUNCTION hmr.flag(value anyelement) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT hmr.flag(value::text)
$$;
