-- A third vendor's HIS/LIS, in MariaDB (run it there: mariadb his < 01_mariadb_schema.sql):
-- pinyin names, outpatients (门诊) and inpatients (住院) in separate tables, Chinese status and
-- code words (男/女, 门诊/住院, 在用/停用, 主任医师, 已审核/未审核, 偏高/偏低), and local
-- wall-clock DATETIMEs. Every table has a change time, indexed (the HIS's own screens need it),
-- which is what lets hmr poll the changes instead of the tables (03_connect.sql).
CREATE TABLE mzbr (brid VARCHAR(20) PRIMARY KEY, xm VARCHAR(50) NOT NULL, xb VARCHAR(4), sfzh VARCHAR(18),
                   csrq DATE, lxdh VARCHAR(20), jdsj DATETIME NOT NULL, gxsj DATETIME NOT NULL, KEY (gxsj));
CREATE TABLE zybr (zyid VARCHAR(20) PRIMARY KEY, zyh VARCHAR(20) NOT NULL, xm VARCHAR(50) NOT NULL, xb VARCHAR(4),
                   sfzh VARCHAR(18), csrq DATE, rysj DATETIME NOT NULL, gxsj DATETIME NOT NULL, KEY (gxsj));
CREATE TABLE ksdm (ksdm VARCHAR(10) PRIMARY KEY, ksmc VARCHAR(50) NOT NULL, bzks VARCHAR(10), yq VARCHAR(10),
                   sjks VARCHAR(10), zt VARCHAR(4) NOT NULL);
CREATE TABLE ryxx (gh VARCHAR(10) PRIMARY KEY, xm VARCHAR(50) NOT NULL, xb VARCHAR(4), ksdm VARCHAR(10),
                   zc VARCHAR(20), js VARCHAR(10), zt VARCHAR(4) NOT NULL);
CREATE TABLE jybg (bgdh VARCHAR(20) PRIMARY KEY, brid VARCHAR(20) NOT NULL, jzlx VARCHAR(4), jzh VARCHAR(20),
                   ksdm VARCHAR(10), sqys VARCHAR(10), bbmc VARCHAR(20), cysj DATETIME, bgsj DATETIME, shsj DATETIME,
                   shr VARCHAR(10), xmdm VARCHAR(10), xmmc VARCHAR(50), zt VARCHAR(4) NOT NULL, KEY (shsj));
CREATE TABLE jyjg (bgdh VARCHAR(20) NOT NULL, xh INT NOT NULL, zbdm VARCHAR(10), zbmc VARCHAR(50), jg VARCHAR(50),
                   dw VARCHAR(20), ckfw VARCHAR(50), bz VARCHAR(4), xgsj DATETIME NOT NULL, PRIMARY KEY (bgdh, xh), KEY (xgsj));
