-- A second vendor's HIS/LIS, shaped differently from sql/demo: pinyin names, separate
-- outpatient (门诊) and inpatient (住院) patient tables, Chinese code words (男/女, 门诊/住院,
-- 在用/停用, ↑/↓), smallint flags and `timestamp without time zone` everywhere. It is connected
-- to hmr by 02_connect.sql alone (tests/tests/vendor2.rs counts its lines).
CREATE SCHEMA yy;
CREATE TABLE yy.mzbr (            -- 门诊病人
    brid varchar(20) PRIMARY KEY, xm varchar(50) NOT NULL, xb varchar(4), sfzh varchar(18),
    csrq date, lxdh varchar(20), jdsj timestamp NOT NULL DEFAULT (now() AT TIME ZONE 'Asia/Shanghai'),
    xgsj timestamp NOT NULL DEFAULT (now() AT TIME ZONE 'Asia/Shanghai'));
CREATE TABLE yy.zybr (            -- 住院病人
    zybrid varchar(20) PRIMARY KEY, zyh varchar(20) NOT NULL, xm varchar(50) NOT NULL, xb varchar(4),
    sfzh varchar(18), csrq date, lxdh varchar(20), rysj timestamp NOT NULL DEFAULT (now() AT TIME ZONE 'Asia/Shanghai'),
    xgsj timestamp NOT NULL DEFAULT (now() AT TIME ZONE 'Asia/Shanghai'));
CREATE TABLE yy.ksdm (            -- 科室
    ksdm varchar(10) PRIMARY KEY, ksmc varchar(50) NOT NULL, bzks varchar(10), yq varchar(10),
    sjks varchar(10), zt varchar(4) NOT NULL DEFAULT '在用', xgsj timestamp NOT NULL DEFAULT (now() AT TIME ZONE 'Asia/Shanghai'));
CREATE TABLE yy.ryzd (            -- 人员
    gh varchar(10) PRIMARY KEY, xm varchar(50) NOT NULL, xb varchar(4), ksdm varchar(10), zc varchar(10),
    zyzsh varchar(30), lb varchar(10), zt varchar(4) NOT NULL DEFAULT '在用',
    xgsj timestamp NOT NULL DEFAULT (now() AT TIME ZONE 'Asia/Shanghai'));
CREATE TABLE yy.jybg (            -- 检验报告; zt 0 未审核, 1 已审核
    bgdh varchar(20) PRIMARY KEY, brid varchar(20) NOT NULL, jzlx varchar(4), jzh varchar(20),
    sqdh varchar(20), ksdm varchar(10), ysgh varchar(10), bbmc varchar(20), cjsj timestamp,
    bgsj timestamp, shsj timestamp, shr varchar(10), xmdm varchar(10), xmmc varchar(50),
    zt smallint NOT NULL DEFAULT 0);
CREATE TABLE yy.jyjg (            -- 检验结果
    bgdh varchar(20) NOT NULL, xh integer NOT NULL, zbdm varchar(10), zbmc varchar(50), jg varchar(50),
    dw varchar(20), ckfw varchar(50), bz varchar(4) NOT NULL DEFAULT '', wjz smallint NOT NULL DEFAULT 0,
    PRIMARY KEY (bgdh, xh));
CREATE INDEX ON yy.jyjg (bgdh);
