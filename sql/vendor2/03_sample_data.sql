-- Sample records of the second vendor: two departments (one the other's parent), a doctor,
-- two outpatients and an inpatient, two lab reports (not yet audited).
INSERT INTO yy.ksdm (ksdm, ksmc, bzks, yq, sjks) VALUES ('NK', '内科', 'A03', 'HZ01', NULL),
                                                     ('NK01', '心血管内科', 'A03.04', 'HZ01', 'NK');
INSERT INTO yy.ryzd (gh, xm, xb, ksdm, zc, zyzsh, lb) VALUES ('1001', '王医生', '男', 'NK01', '232', '110440000000001', '医生');
INSERT INTO yy.mzbr (brid, xm, xb, sfzh, csrq, lxdh) VALUES
    ('MZ0001', '陈志明', '男', '441302198003151233', '1980-03-15', ''),
    ('MZ0002', '林晓燕', '女', '441302199211082345', '1992-11-08', '13800000002');
INSERT INTO yy.zybr (zybrid, zyh, xm, xb, sfzh, csrq) VALUES
    ('ZY0001', '20260001', '黄国强', '男', '441322197505213458', '1975-05-21');
INSERT INTO yy.jybg (bgdh, brid, jzlx, jzh, ksdm, ysgh, bbmc, cjsj, bgsj, shr, xmdm, xmmc) VALUES
    ('J0001', 'MZ0001', '门诊', 'MZ20260001', 'NK01', '1001', '全血', (now() AT TIME ZONE 'Asia/Shanghai') - interval '2 hours',
     (now() AT TIME ZONE 'Asia/Shanghai') - interval '1 hour', '1001', 'XCG', '血常规'),
    ('J0002', 'ZY0001', '住院', '20260001', 'NK01', '1001', '血清', (now() AT TIME ZONE 'Asia/Shanghai') - interval '2 hours',
     (now() AT TIME ZONE 'Asia/Shanghai') - interval '1 hour', '1001', 'GGN', '肝功能');
INSERT INTO yy.jyjg (bgdh, xh, zbdm, zbmc, jg, dw, ckfw, bz, wjz) VALUES
    ('J0001', 1, 'WBC', '白细胞计数', '11.2', '10^9/L', '3.5-9.5', '↑', 0),
    ('J0001', 2, 'HGB', '血红蛋白', '135', 'g/L', '130-175', '', 0),
    ('J0002', 1, 'ALT', '丙氨酸氨基转移酶', '35', 'U/L', '9-50', '', 0);
