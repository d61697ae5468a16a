//! Renders real-looking reports and reads them back with poppler (pdftotext, pdfinfo, pdffonts,
//! pdftoppm), so the assertions are about what a reader of the PDF sees.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use hmr_pdf::{Context, PdfError, Renderer, Template, DEFAULT_FONT};
use hmr_protocol::{ExamReport, LabItem, LabReport};

/// (name, unit, reference range, typical value) — a CBC plus common chemistry.
const ITEMS: &[(&str, &str, &str, &str)] = &[
    ("白细胞计数", "10^9/L", "3.5-9.5", "6.21"),
    ("红细胞计数", "10^12/L", "4.3-5.8", "4.87"),
    ("血红蛋白", "g/L", "130-175", "142"),
    ("红细胞压积", "%", "40-50", "43.1"),
    ("平均红细胞体积", "fL", "82-100", "88.5"),
    ("平均血红蛋白含量", "pg", "27-34", "29.2"),
    ("平均血红蛋白浓度", "g/L", "316-354", "330"),
    ("血小板计数", "10^9/L", "125-350", "211"),
    ("中性粒细胞百分比", "%", "40-75", "61.2"),
    ("淋巴细胞百分比", "%", "20-50", "28.4"),
    ("单核细胞百分比", "%", "3-10", "6.1"),
    ("嗜酸性粒细胞百分比", "%", "0.4-8.0", "2.9"),
    ("嗜碱性粒细胞百分比", "%", "0-1", "0.4"),
    ("中性粒细胞绝对值", "10^9/L", "1.8-6.3", "3.80"),
    ("淋巴细胞绝对值", "10^9/L", "1.1-3.2", "1.76"),
    ("丙氨酸氨基转移酶", "U/L", "9-50", "23"),
    ("天门冬氨酸氨基转移酶", "U/L", "15-40", "21"),
    ("总蛋白", "g/L", "65-85", "72.3"),
    ("白蛋白", "g/L", "40-55", "45.1"),
    ("总胆红素", "μmol/L", "0-23", "12.4"),
    ("直接胆红素", "μmol/L", "0-8", "3.1"),
    ("尿素", "mmol/L", "3.1-8.0", "5.2"),
    ("肌酐", "μmol/L", "57-111", "81"),
    ("尿酸", "μmol/L", "208-428", "351"),
    ("葡萄糖", "mmol/L", "3.9-6.1", "5.0"),
    ("总胆固醇", "mmol/L", "<5.2", "4.6"),
    ("甘油三酯", "mmol/L", "<1.7", "1.2"),
    ("高密度脂蛋白胆固醇", "mmol/L", ">1.0", "1.3"),
    ("低密度脂蛋白胆固醇", "mmol/L", "<3.4", "2.7"),
    ("钾", "mmol/L", "3.5-5.3", "4.1"),
    ("钠", "mmol/L", "137-147", "140"),
    ("氯", "mmol/L", "99-110", "103"),
    ("钙", "mmol/L", "2.11-2.52", "2.30"),
    ("超敏C反应蛋白", "mg/L", "0-3", "1.2"),
    ("凝血酶原时间", "s", "9.4-12.5", "11.0"),
];

fn renderer() -> &'static Renderer {
    static R: OnceLock<Renderer> = OnceLock::new();
    R.get_or_init(|| {
        Renderer::from_font_file(Template::builtin(), Path::new(DEFAULT_FONT)).expect("default font loads")
    })
}

fn ctx() -> Context {
    Context {
        hospital_name: "示例市第一人民医院".into(),
        department_name: Some("心血管内科门诊".into()),
        gender_code: Some("1".into()),
        birth_date: Some("1980-03-15".into()),
        request_doctor_name: Some("李医生".into()),
        tester_name: Some("孙检验".into()),
        auditor_name: Some("王审核".into()),
        reporter_name: Some("赵报告".into()),
        received_at: Some("2026-11-26T08:40:00+08:00".into()),
        recognition_statement: Some("本报告已上传检查检验结果互认共享平台，有效期内可供其他医疗机构互认。".into()),
        ..Context::default()
    }
}

fn lab_report(n: usize) -> LabReport {
    let items = (0..n)
        .map(|i| {
            let (name, unit, range, value) = ITEMS[i % ITEMS.len()];
            let round = i / ITEMS.len();
            let name = if round == 0 {
                name.to_owned()
            } else {
                format!("{name}（复查{round}）")
            };
            // A few high, low and critical ones, as a real panel would have.
            let (value, flag, critical) = match i {
                0 => ("12.80".to_owned(), "2", None),
                2 => ("98".to_owned(), "3", None),
                7 => ("31".to_owned(), "3", Some(true)),
                15 => ("86".to_owned(), "2", None),
                29 => ("6.1".to_owned(), "2", Some(true)),
                _ => (value.to_owned(), "1", Some(false)),
            };
            LabItem {
                item_code: format!("L{:04}", 101 + i),
                item_name: name,
                loinc: None,
                result_value: value,
                result_unit: Some(unit.into()),
                reference_range: Some(range.into()),
                abnormal_flag: Some(flag.into()),
                critical_flag: critical,
                method: None,
            }
        })
        .collect();
    LabReport {
        report_no: "LAB20261126000123".into(),
        version: 1,
        patient_id: "P000123456".into(),
        id_type: "01".into(),
        id_no: "110101198001011234".into(),
        name: "张三丰".into(),
        visit_type: Some("1".into()),
        visit_no: Some("MZ202611260042".into()),
        order_no: Some("ORD88001".into()),
        dept_code: Some("0301".into()),
        request_doctor_no: Some("D1024".into()),
        specimen_code: Some("BLD".into()),
        specimen_name: Some("静脉血".into()),
        specimen_no: Some("2611260042017".into()),
        sampled_at: Some("2026-11-26T08:05:00+08:00".into()),
        reported_at: "2026-11-26T09:30:00+08:00".into(),
        audited_at: Some("2026-11-26T09:41:12+08:00".into()),
        auditor_no: "T009".into(),
        category_code: Some("CBC".into()),
        category_name: Some("血常规+生化".into()),
        data_code: Some("JY0001".into()),
        items,
    }
}

const FINDINGS_END: &str = "双肾未见明显异常回声，膀胱充盈良好，壁光滑（检查所见结束）。";

fn exam_report() -> ExamReport {
    let sentence = "肝脏大小形态正常，包膜光滑，实质回声均匀，肝内管道结构清晰，门静脉主干内径约1.1cm，血流通畅。\
                    胆囊大小约6.5cm×2.8cm，壁毛糙，腔内未见明显异常回声。";
    let mut findings = sentence.repeat(6);
    findings.push('\n');
    findings.push_str("Liver size normal, echotexture homogeneous, no focal lesion identified in segments IV-VIII. ");
    findings.push_str(FINDINGS_END);
    ExamReport {
        report_no: "US20261126000077".into(),
        version: 1,
        patient_id: "P000123456".into(),
        id_type: "01".into(),
        id_no: "110101198001011234".into(),
        name: "张三丰".into(),
        visit_type: Some("1".into()),
        visit_no: Some("MZ202611260042".into()),
        order_no: None,
        dept_code: Some("0301".into()),
        request_doctor_no: Some("D1024".into()),
        exam_class: "US".into(),
        exam_item_code: Some("US001".into()),
        exam_item_name: Some("腹部彩超（肝胆胰脾双肾）".into()),
        body_part_code: None,
        body_part_name: Some("上腹部".into()),
        data_code: Some("JC0101".into()),
        accession_no: Some("A26112600077".into()),
        study_instance_uid: None,
        findings,
        impression: "1. 胆囊壁毛糙，请结合临床。\n2. 肝、胰、脾、双肾未见明显异常。".into(),
        examined_at: Some("2026-11-26T10:02:00+08:00".into()),
        reported_at: "2026-11-26T10:30:00+08:00".into(),
        audited_at: Some("2026-11-26T10:45:00+08:00".into()),
        reporter_no: Some("D2001".into()),
        auditor_no: "D2002".into(),
        critical_flag: Some(true),
        image_url: None,
    }
}

fn out_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hmr-pdf")
}

fn save(name: &str, pdf: &[u8]) -> PathBuf {
    let dir = out_dir();
    std::fs::create_dir_all(&dir).expect("create output dir");
    let path = dir.join(name);
    std::fs::write(&path, pdf).expect("write pdf");
    path
}

fn tool(name: &str, args: &[&str]) -> String {
    let out = Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name} (poppler-utils) must be installed: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// pdftotext drops or adds spaces between CJK runs, so compare without whitespace.
fn has(text: &str, needle: &str) -> bool {
    let squeeze = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    squeeze(text).contains(&squeeze(needle))
}

fn text_of(path: &Path) -> String {
    tool("pdftotext", &["-layout", path.to_str().unwrap(), "-"])
}

/// Page 1 as a PNG at 60 dpi (pdftoppm), written next to the PDFs as `<name>.png`.
fn page_one_png(pdf: &Path, name: &str) -> Vec<u8> {
    let prefix = out_dir().join(name);
    tool(
        "pdftoppm",
        &[
            "-png",
            "-r",
            "60",
            "-f",
            "1",
            "-l",
            "1",
            "-singlefile",
            pdf.to_str().unwrap(),
            prefix.to_str().unwrap(),
        ],
    );
    std::fs::read(prefix.with_extension("png")).expect("pdftoppm wrote a PNG")
}

fn pages_of(path: &Path) -> usize {
    let info = tool("pdfinfo", &[path.to_str().unwrap()]);
    let line = info
        .lines()
        .find(|l| l.starts_with("Pages:"))
        .expect("pdfinfo prints Pages");
    line["Pages:".len()..].trim().parse().expect("page count")
}

#[test]
fn lab_report_reads_back() {
    let pdf = renderer().lab(&lab_report(30), &ctx()).expect("renders");
    assert!(pdf.starts_with(b"%PDF-"));
    assert!(pdf.len() < 200 * 1024, "30-item PDF is {} bytes", pdf.len());
    let path = save("lab-30.pdf", &pdf);

    let text = text_of(&path);
    for needle in [
        "示例市第一人民医院",
        "检验报告单",
        "张三丰",
        "白细胞计数",
        "红细胞计数",
        "12.80",
        "↑",
        "↓",
        "危",
        "王审核",
        "审核者",
        "2026-11-26 09:30",
        "2026-11-26 09:41",
        "心血管内科门诊",
        "静脉血",
        "2611260042017",
        "本报告仅对所检测标本负责",
        "第 1 页 / 共 1 页",
    ] {
        assert!(has(&text, needle), "{needle:?} missing from:\n{text}");
    }
    // Times are printed to the minute, never raw.
    assert!(!text.contains("T09:30:00"), "raw timestamp leaked:\n{text}");
    assert_eq!(pages_of(&path), 1);

    // The font is embedded, and as a subset (pdffonts: emb=yes sub=yes).
    let fonts = tool("pdffonts", &[path.to_str().unwrap()]);
    let font_line = fonts
        .lines()
        .nth(2)
        .unwrap_or_else(|| panic!("no font listed:\n{fonts}"));
    let cols: Vec<&str> = font_line.split_whitespace().collect();
    assert!(cols[0].contains('+'), "subset fonts carry a XXXXXX+ tag: {font_line}");
    assert!(font_line.contains("yes yes"), "embedded and subset expected: {fonts}");

    // It rasterises to a real page image.
    let png = page_one_png(&path, "lab-30");
    assert!(png.starts_with(b"\x89PNG"));
    assert!(png.len() > 10_000, "page image suspiciously small: {} bytes", png.len());
    eprintln!(
        "lab-30: {} bytes, page image {}",
        pdf.len(),
        out_dir().join("lab-30.png").display()
    );
}

#[test]
fn long_table_continues_on_a_second_page_with_the_header_repeated() {
    let report = lab_report(60);
    let pdf = renderer().lab(&report, &ctx()).expect("renders");
    let path = save("lab-60.pdf", &pdf);
    assert_eq!(pages_of(&path), 2);

    let p = path.to_str().unwrap();
    let page2 = tool("pdftotext", &["-layout", "-f", "2", "-l", "2", p, "-"]);
    for needle in [
        "示例市第一人民医院",
        "检验报告单",
        "张三丰",
        "检验项目",
        "参考范围",
        "王审核",
        "第 2 页 / 共 2 页",
    ] {
        assert!(has(&page2, needle), "page 2 lacks {needle:?}:\n{page2}");
    }
    // Every item is printed exactly once, in order, the last one on page 2.
    let all = text_of(&path);
    for it in &report.items {
        assert_eq!(all.matches(&it.item_code).count(), 1, "{} printed once", it.item_code);
    }
    assert!(page2.contains(&report.items[59].item_code));
    let page1 = tool("pdftotext", &["-layout", "-f", "1", "-l", "1", p, "-"]);
    assert!(page1.contains(&report.items[0].item_code) && !page2.contains(&report.items[0].item_code));
}

/// Largest right edge of any word, from `pdftotext -bbox` (points).
fn max_x(path: &Path) -> f32 {
    let html = tool("pdftotext", &["-bbox", path.to_str().unwrap(), "-"]);
    html.split("xMax=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next()?.parse::<f32>().ok())
        .fold(0.0, f32::max)
}

#[test]
fn exam_findings_wrap_inside_the_margins() {
    let report = exam_report();
    let pdf = renderer().exam(&report, &ctx()).expect("renders");
    assert!(pdf.starts_with(b"%PDF-"));
    let path = save("exam.pdf", &pdf);
    let text = text_of(&path);
    for needle in [
        "超声检查报告单",
        "检查所见",
        "检查结论",
        "腹部彩超（肝胆胰脾双肾）",
        "Liver size normal",
        "（检查所见结束）",
        "胆囊壁毛糙，请结合临床。",
        "【危急值】",
        "赵报告",
        "2026-11-26 10:02",
        "本报告仅供临床参考",
    ] {
        assert!(has(&text, needle), "{needle:?} missing from:\n{text}");
    }
    // A4 is 595.3 pt wide with a 15 mm (42.5 pt) right margin.
    let right_edge = 595.3 - 15.0 * 72.0 / 25.4;
    let x = max_x(&path);
    assert!(
        x <= right_edge + 0.5,
        "text reaches x={x}, past the right margin at {right_edge}"
    );
    assert!(x > right_edge - 30.0, "long lines should use the width: max x={x}");
}

/// Every field a hospital expects on its 报告单, as a reader sees it (pdftotext): names, not
/// codes; gender and the age at report time from the patient; the specimen's received time;
/// the exam class in Chinese; the hospital's 互认 statement. Page 1 of each is rasterised
/// (pdftoppm) next to the PDFs; `docs/pdf-lab.png` and `docs/pdf-exam.png` are such images.
#[test]
fn every_field_prints_as_a_hospital_expects() {
    let lab = renderer().lab(&lab_report(12), &ctx()).expect("renders");
    let path = save("lab-fields.pdf", &lab);
    let text = text_of(&path);
    for (label, value) in [
        ("性别", "男"),
        ("年龄", "46岁"),
        ("科室", "心血管内科门诊"),
        ("申请医生", "李医生"),
        ("检验者", "孙检验"),
        ("审核者", "王审核"),
        ("采样时间", "2026-11-26 08:05"),
        ("接收时间", "2026-11-26 08:40"),
        ("报告时间", "2026-11-26 09:30"),
        ("标本", "静脉血"),
        ("条码号", "2611260042017"),
        ("检验类别", "血常规+生化"),
        ("病人ID", "P000123456"),
        ("就诊号", "MZ202611260042"),
    ] {
        assert!(
            has(&text, &format!("{label}：{value}")),
            "{label}：{value} missing from:\n{text}"
        );
    }
    assert!(
        has(&text, "本报告已上传检查检验结果互认共享平台"),
        "the 互认 statement:\n{text}"
    );
    for code in ["D1024", "T009", "0301"] {
        assert!(!text.contains(code), "{code} printed instead of a name:\n{text}");
    }

    let exam = renderer().exam(&exam_report(), &ctx()).expect("renders");
    let epath = save("exam-fields.pdf", &exam);
    let etext = text_of(&epath);
    assert!(has(&etext, "超声检查报告单"), "the class in Chinese:\n{etext}");
    for (label, value) in [
        ("性别", "男"),
        ("年龄", "46岁"),
        ("科室", "心血管内科门诊"),
        ("申请医生", "李医生"),
        ("报告医师", "赵报告"),
        ("审核医师", "王审核"),
        ("检查项目", "腹部彩超（肝胆胰脾双肾）"),
        ("检查部位", "上腹部"),
        ("检查号", "A26112600077"),
        ("检查时间", "2026-11-26 10:02"),
        ("审核时间", "2026-11-26 10:45"),
    ] {
        assert!(
            has(&etext, &format!("{label}：{value}")),
            "{label}：{value} missing from:\n{etext}"
        );
    }
    assert!(has(&etext, "本报告已上传检查检验结果互认共享平台"));
    for code in ["D1024", "D2001", "D2002", "US检查"] {
        assert!(!etext.contains(code), "{code} printed:\n{etext}");
    }

    // Without names the codes print; without a statement no empty line is left for it.
    let bare = Context {
        hospital_name: "示例市第一人民医院".into(),
        ..Context::default()
    };
    let btext = text_of(&save(
        "lab-bare.pdf",
        &renderer().lab(&lab_report(3), &bare).expect("renders"),
    ));
    assert!(
        has(&btext, "申请医生：D1024") && has(&btext, "审核者：T009") && has(&btext, "科室：0301"),
        "{btext}"
    );
    assert!(!has(&btext, "互认共享平台"));

    for (name, pdf) in [("lab-fields", &path), ("exam-fields", &epath)] {
        assert!(page_one_png(pdf, name).len() > 10_000, "a real page image");
    }
}

#[test]
fn exam_text_longer_than_a_page_flows_on() {
    let mut report = exam_report();
    report.findings = format!(
        "{}{FINDINGS_END}",
        "肝脏大小形态正常，包膜光滑，实质回声均匀。".repeat(150)
    );
    report.critical_flag = None;
    let pdf = renderer().exam(&report, &ctx()).expect("renders");
    let path = save("exam-long.pdf", &pdf);
    let pages = pages_of(&path);
    assert!(pages >= 2, "expected several pages, got {pages}");
    let text = text_of(&path);
    assert!(has(&text, "（检查所见结束）") && !text.contains("【危急值】"));
    // Every page repeats heading and patient; the 检查结论 label is never left alone at a page end.
    for n in 1..=pages {
        let page = tool(
            "pdftotext",
            &["-f", &n.to_string(), "-l", &n.to_string(), path.to_str().unwrap(), "-"],
        );
        assert!(
            has(&page, "超声检查报告单") && has(&page, "张三丰"),
            "page {n}:\n{page}"
        );
        if has(&page, "检查结论") {
            assert!(has(&page, "胆囊壁毛糙"), "label without its text on page {n}:\n{page}");
        }
    }
}

#[test]
fn custom_template_changes_labels_marks_and_page() {
    let toml = r#"
        [page]
        width_mm = 210
        height_mm = 148        # A5 landscape

        [flags.abnormal]
        "1" = ""
        "2" = "H"
        "3" = "L"

        [lab.footer]
        columns = 2
        fields = [
            { field = "auditor", label = "审核医师" },
            { field = "audited_at", label = "审核时间" },
        ]
        notes = ["{hospital_name}检验科 电话 0571-88888888"]
    "#;
    let template = Template::from_toml(toml).expect("valid template");
    let r = Renderer::from_font_file(template, Path::new(DEFAULT_FONT)).expect("font");
    let pdf = r.lab(&lab_report(30), &ctx()).expect("renders");
    let path = save("lab-custom.pdf", &pdf);
    let text = text_of(&path);
    assert!(text.contains("审核医师") && !text.contains("审核者"), "{text}");
    assert!(text.contains("示例市第一人民医院检验科 电话 0571-88888888"));
    assert!(!text.contains('↑') && text.contains(" H"), "custom mark used:\n{text}");
    // Untouched keys keep builtin values, e.g. the title.
    assert!(text.contains("检验报告单"));
    // A5 landscape holds fewer rows: 30 items need more than one page.
    assert!(pages_of(&path) >= 2);
    let info = tool("pdfinfo", &[path.to_str().unwrap()]);
    assert!(
        info.contains("595.276 x 419.528") || info.contains("595.28 x 419.53"),
        "{info}"
    );
}

#[test]
fn shipped_template_files_parse_alone() {
    for file in ["templates/lab-report.toml", "templates/exam-report.toml"] {
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).expect("file shipped");
        Template::from_toml(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    Template::builtin().validate().expect("builtin valid");
}

fn template_error(toml: &str) -> String {
    match Template::from_toml(toml) {
        Err(e @ PdfError::Template(_)) => {
            eprintln!("{e}");
            e.to_string()
        }
        Err(other) => panic!("wrong error kind: {other}"),
        Ok(_) => panic!("accepted a bad template:\n{toml}"),
    }
}

#[test]
fn bad_templates_are_refused_with_the_reason() {
    let e = template_error("[lab.footer\nfields = 3");
    assert!(e.contains("not valid TOML") && e.contains("line 1"), "{e}");

    let e = template_error("[page]\nwidht_mm = 100");
    assert!(e.contains("page") && e.contains("widht_mm"), "{e}");

    let e = template_error("[fonts]\ntable = \"big\"");
    assert!(e.contains("fonts.table") && e.contains("invalid type"), "{e}");

    let e = template_error("[lab.header]\nfields = [{ field = \"nmae\", label = \"姓名\" }]");
    assert!(
        e.contains("lab.header.fields[0]") && e.contains("nmae") && e.contains("known: hospital_name"),
        "{e}"
    );

    let e = template_error("[lab.table]\ncolumns = [{ field = \"result\", label = \"结果\", width = 0 }]");
    assert!(e.contains("lab.table.columns[0].width"), "{e}");

    let e = template_error("[[exam.heading]]\ntext = \"{hospital}\"\nsize = 12");
    assert!(e.contains("exam.heading[0]") && e.contains("`hospital`"), "{e}");

    let e = template_error("[[lab.heading]]\ntext = \"x\"\nsize = 12\nalign = \"middle\"");
    assert!(e.contains("lab.heading[0].align") && e.contains("middle"), "{e}");

    let e = template_error("[fonts]\nbody = 0.5");
    assert!(e.contains("fonts.body"), "{e}");
}

#[test]
fn unusable_fonts_are_refused() {
    let err = Renderer::new(Template::builtin(), b"not a font".to_vec(), 0).unwrap_err();
    assert!(matches!(err, PdfError::Font(_)), "{err}");
    let err = Renderer::from_font_file(Template::builtin(), Path::new("/nonexistent/font.ttc")).unwrap_err();
    assert!(matches!(err, PdfError::FontFile { .. }) && err.to_string().contains("/nonexistent/font.ttc"));
    let dejavu = Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf");
    if dejavu.exists() {
        let err = Renderer::from_font_file(Template::builtin(), dejavu).unwrap_err();
        assert!(err.to_string().contains("no Chinese glyphs"), "{err}");
    }
    let data = std::fs::read(DEFAULT_FONT).expect("font");
    let err = Renderer::new(Template::builtin(), data, 7).unwrap_err();
    assert!(err.to_string().contains("index 7"), "{err}");
}

#[test]
fn renderer_is_shareable_across_threads() {
    fn check<T: Send + Sync>() {}
    check::<Renderer>();
    let r = renderer();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| s.spawn(|| r.lab(&lab_report(10), &ctx()).expect("renders")))
            .collect();
        for h in handles {
            assert!(h.join().expect("no panic").starts_with(b"%PDF-"));
        }
    });
}

/// A measurement, not a test (it asserts nothing): `cargo test -p hmr-pdf --release --
/// --ignored --nocapture timing`. Speed targets live in BENCHMARKS.md.
#[test]
#[ignore = "a measurement: run with --ignored"]
fn timing() {
    let started = Instant::now();
    let r = Renderer::from_font_file(Template::builtin(), Path::new(DEFAULT_FONT)).expect("font");
    let load = started.elapsed();
    type Case<'a> = (&'a str, Box<dyn Fn() -> Vec<u8> + 'a>);
    let cases: [Case<'_>; 3] = [
        (
            "lab 30 items",
            Box::new(|| r.lab(&lab_report(30), &ctx()).expect("renders")),
        ),
        (
            "lab 60 items",
            Box::new(|| r.lab(&lab_report(60), &ctx()).expect("renders")),
        ),
        ("exam", Box::new(|| r.exam(&exam_report(), &ctx()).expect("renders"))),
    ];
    eprintln!("font load + parse: {:.1} ms", load.as_secs_f64() * 1e3);
    for (name, render) in cases {
        let size = render().len();
        let n = 20;
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(render());
        }
        let avg = t.elapsed().as_secs_f64() * 1e3 / n as f64;
        eprintln!("{name}: {size} bytes, {avg:.1} ms per render (avg of {n})");
    }
}

#[test]
fn sparse_reports_still_render() {
    // No items, no optional fields, odd timestamps: one page, blanks where data is missing.
    let mut lab = lab_report(0);
    lab.sampled_at = None;
    lab.audited_at = None;
    lab.reported_at = "20261126".into();
    let pdf = renderer().lab(&lab, &Context::default()).expect("renders");
    let path = save("lab-empty.pdf", &pdf);
    assert_eq!(pages_of(&path), 1);
    assert!(has(&text_of(&path), "报告时间：20261126"));

    let mut exam = exam_report();
    exam.findings = String::new();
    exam.impression = "未见异常".into();
    let pdf = renderer().exam(&exam, &Context::default()).expect("renders");
    assert!(has(&text_of(&save("exam-short.pdf", &pdf)), "检查结论：未见异常"));
}

/// Issue #31: a field without a value (no 检验者 known, no 接收时间) is left out, label and
/// all, not printed as an empty label; the template can ask for the blank (`always = true`).
#[test]
fn a_field_without_a_value_prints_no_empty_label() {
    let bare = Context {
        tester_name: None,
        received_at: None,
        ..ctx()
    };
    let pdf = renderer().lab(&lab_report(3), &bare).expect("renders");
    let text = text_of(&save("lab-no-tester.pdf", &pdf));
    assert!(!has(&text, "检验者"), "an empty 检验者 label printed:\n{text}");
    assert!(has(&text, "审核者") && has(&text, "王审核"), "{text}");
    let pdf = renderer().lab(&lab_report(3), &ctx()).expect("renders");
    let text = text_of(&save("lab-with-tester.pdf", &pdf));
    assert!(has(&text, "检验者") && has(&text, "孙检验"), "{text}");
}
