//! The report layout a hospital can edit: a TOML file, deep-merged over the builtin one.

use serde::Deserialize;

use crate::fields::{self, Flags, Kind};
use crate::PdfError;

const BUILTIN_LAB: &str = include_str!("../templates/lab-report.toml");
const BUILTIN_EXAM: &str = include_str!("../templates/exam-report.toml");

/// Everything about how a report looks. See `templates/lab-report.toml` for the keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub page: PageSpec,
    pub fonts: FontSizes,
    pub flags: Flags,
    pub lab: LabLayout,
    pub exam: ExamLayout,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageSpec {
    pub width_mm: f32,
    pub height_mm: f32,
    pub margin_top_mm: f32,
    pub margin_bottom_mm: f32,
    pub margin_left_mm: f32,
    pub margin_right_mm: f32,
}

/// Font sizes in points.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FontSizes {
    pub header: f32,
    pub table_header: f32,
    pub table: f32,
    pub section_label: f32,
    pub body: f32,
    pub footer: f32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabLayout {
    pub heading: Vec<HeadingLine>,
    pub header: FieldGrid,
    pub table: Table,
    pub footer: Footer,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExamLayout {
    pub heading: Vec<HeadingLine>,
    pub header: FieldGrid,
    pub sections: Vec<Section>,
    pub footer: Footer,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadingLine {
    /// Text with `{placeholders}`.
    pub text: String,
    pub size: f32,
    #[serde(default)]
    pub align: Align,
    #[serde(default)]
    pub bold: bool,
    /// Draw on the previous line instead of a new one.
    #[serde(default)]
    pub inline: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Align {
    #[default]
    Left,
    Center,
    Right,
}

/// `label：value` cells filled row by row.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldGrid {
    pub columns: usize,
    pub fields: Vec<FieldSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    pub field: String,
    /// Printed as `label：value`.
    pub label: String,
    /// How many grid columns the cell takes (for long values).
    #[serde(default = "one")]
    pub span: usize,
    /// Print the label even when the report has no value for it (a blank to fill by hand);
    /// by default a field without a value is left out, label and all.
    #[serde(default)]
    pub always: bool,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Column {
    pub field: String,
    pub label: String,
    /// Relative; all widths are scaled to fill the content width.
    pub width: f32,
    #[serde(default)]
    pub align: Align,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Section {
    pub field: String,
    pub label: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Footer {
    pub columns: usize,
    pub fields: Vec<FieldSpec>,
    #[serde(default)]
    pub notes: Vec<String>,
    /// E.g. "第 {page} 页 / 共 {pages} 页"; empty for none.
    #[serde(default)]
    pub page_number: String,
}

impl Template {
    /// The layout shipped in `templates/`: an A4 检验报告单 and 检查报告单.
    pub fn builtin() -> Template {
        // The shipped files are checked by the tests, so this cannot fail in a release.
        Self::parse_merged(builtin_table()).expect("builtin template is valid")
    }

    /// Parses a hospital's template. Keys left out keep their builtin values; tables merge key by
    /// key, arrays are replaced whole. Errors name the offending key or line.
    pub fn from_toml(text: &str) -> Result<Template, PdfError> {
        let overlay: toml::Table = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| {
                let before = text.get(..s.start).unwrap_or(text);
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().unwrap_or_default().chars().count() + 1;
                format!(" at line {line}, column {column}")
            });
            PdfError::Template(format!(
                "not valid TOML{}: {}",
                at.unwrap_or_default(),
                e.message().trim()
            ))
        })?;
        let mut merged = builtin_table();
        merge(&mut merged, overlay);
        Self::parse_merged(merged)
    }

    fn parse_merged(table: toml::Table) -> Result<Template, PdfError> {
        let template: Template = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            // toml appends its own "in `key`" line; the path above already says where.
            let inner = e.inner().to_string();
            let msg = inner.split("\nin `").next().unwrap_or_default().trim();
            PdfError::Template(format!("{}: {msg}", e.path()))
        })?;
        template.validate()?;
        Ok(template)
    }

    /// Checks what serde cannot: known field names and placeholders, sane sizes.
    pub fn validate(&self) -> Result<(), PdfError> {
        let p = &self.page;
        positive("page.width_mm", p.width_mm)?;
        positive("page.height_mm", p.height_mm)?;
        for (key, v) in [
            ("page.margin_top_mm", p.margin_top_mm),
            ("page.margin_bottom_mm", p.margin_bottom_mm),
            ("page.margin_left_mm", p.margin_left_mm),
            ("page.margin_right_mm", p.margin_right_mm),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(bad(key, format!("must be zero or more, got {v}")));
            }
        }
        if p.margin_left_mm + p.margin_right_mm >= p.width_mm * 0.8 {
            return Err(bad("page", "left + right margins leave almost no width"));
        }
        if p.margin_top_mm + p.margin_bottom_mm >= p.height_mm * 0.8 {
            return Err(bad("page", "top + bottom margins leave almost no height"));
        }
        let f = &self.fonts;
        for (key, v) in [
            ("fonts.header", f.header),
            ("fonts.table_header", f.table_header),
            ("fonts.table", f.table),
            ("fonts.section_label", f.section_label),
            ("fonts.body", f.body),
            ("fonts.footer", f.footer),
        ] {
            font_size(key, v)?;
        }

        let lab = &self.lab;
        check_heading("lab.heading", &lab.heading, Kind::Lab)?;
        check_grid("lab.header", lab.header.columns, &lab.header.fields, Kind::Lab)?;
        check_footer("lab.footer", &lab.footer, Kind::Lab)?;
        if lab.table.columns.is_empty() {
            return Err(bad("lab.table.columns", "needs at least one column"));
        }
        for (i, c) in lab.table.columns.iter().enumerate() {
            let key = format!("lab.table.columns[{i}]");
            if !fields::ITEM_FIELDS.contains(&c.field.as_str()) {
                return Err(bad(
                    &key,
                    format!(
                        "unknown item field `{}`; known: {}",
                        c.field,
                        fields::ITEM_FIELDS.join(", ")
                    ),
                ));
            }
            positive(&format!("{key}.width"), c.width)?;
        }

        let exam = &self.exam;
        check_heading("exam.heading", &exam.heading, Kind::Exam)?;
        check_grid("exam.header", exam.header.columns, &exam.header.fields, Kind::Exam)?;
        check_footer("exam.footer", &exam.footer, Kind::Exam)?;
        for (i, s) in exam.sections.iter().enumerate() {
            check_field(&format!("exam.sections[{i}]"), &s.field, Kind::Exam)?;
        }
        Ok(())
    }
}

fn builtin_table() -> toml::Table {
    // Two files so hospitals get one per report kind; together they are one TOML document.
    let text = format!("{BUILTIN_LAB}\n{BUILTIN_EXAM}");
    toml::from_str(&text).expect("builtin template files are valid TOML")
}

/// Overlays `over` onto `base`: tables recursively, anything else (arrays included) replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn bad(key: &str, msg: impl std::fmt::Display) -> PdfError {
    PdfError::Template(format!("{key}: {msg}"))
}

fn positive(key: &str, v: f32) -> Result<(), PdfError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(bad(key, format!("must be greater than zero, got {v}")))
    }
}

fn font_size(key: &str, v: f32) -> Result<(), PdfError> {
    if v.is_finite() && (3.0..=72.0).contains(&v) {
        Ok(())
    } else {
        Err(bad(key, format!("font size must be between 3 and 72 points, got {v}")))
    }
}

fn check_field(key: &str, name: &str, kind: Kind) -> Result<(), PdfError> {
    if fields::names(kind).contains(&name) {
        Ok(())
    } else {
        Err(bad(
            key,
            format!(
                "unknown {} field `{name}`; known: {}",
                kind.as_str(),
                fields::names(kind).join(", ")
            ),
        ))
    }
}

/// Every `{name}` in `text` must be a field of `kind` or one of the page placeholders.
fn check_placeholders(key: &str, text: &str, kind: Kind) -> Result<(), PdfError> {
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(bad(key, format!("unclosed `{{` in {text:?}")));
        };
        let name = &after[..close];
        if !fields::PAGE_PLACEHOLDERS.contains(&name) {
            check_field(key, name, kind)?;
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

fn check_heading(key: &str, lines: &[HeadingLine], kind: Kind) -> Result<(), PdfError> {
    for (i, line) in lines.iter().enumerate() {
        let key = format!("{key}[{i}]");
        check_placeholders(&key, &line.text, kind)?;
        font_size(&format!("{key}.size"), line.size)?;
    }
    Ok(())
}

fn check_grid(key: &str, columns: usize, fields: &[FieldSpec], kind: Kind) -> Result<(), PdfError> {
    if !(1..=8).contains(&columns) {
        return Err(bad(&format!("{key}.columns"), format!("must be 1 to 8, got {columns}")));
    }
    for (i, f) in fields.iter().enumerate() {
        let key = format!("{key}.fields[{i}]");
        check_field(&key, &f.field, kind)?;
        if !(1..=columns).contains(&f.span) {
            return Err(bad(
                &format!("{key}.span"),
                format!("must be 1 to {columns} (the columns), got {}", f.span),
            ));
        }
    }
    Ok(())
}

fn check_footer(key: &str, footer: &Footer, kind: Kind) -> Result<(), PdfError> {
    check_grid(key, footer.columns, &footer.fields, kind)?;
    for (i, note) in footer.notes.iter().enumerate() {
        check_placeholders(&format!("{key}.notes[{i}]"), note, kind)?;
    }
    check_placeholders(&format!("{key}.page_number"), &footer.page_number, kind)
}
