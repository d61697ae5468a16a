//! Renders a lab report (检验报告单) or exam report (检查报告单) to PDF, for when the LIS/RIS
//! supplies none of its own.
//!
//! The layout comes from a [`Template`] a hospital can edit as TOML without recompiling; the
//! builtin one is `templates/lab-report.toml` + `templates/exam-report.toml`. The Chinese font is
//! embedded as a subset holding only the glyphs used, so the file opens anywhere and stays small.
//!
//! ```no_run
//! # fn demo(report: &hmr_protocol::LabReport) -> Result<(), hmr_pdf::PdfError> {
//! use hmr_pdf::{Context, Renderer, Template, DEFAULT_FONT};
//! let renderer = Renderer::from_font_file(Template::builtin(), DEFAULT_FONT.as_ref())?;
//! let ctx = Context { hospital_name: "某市人民医院".into(), ..Context::default() };
//! let pdf: Vec<u8> = renderer.lab(report, &ctx)?;
//! # Ok(()) }
//! ```

mod fields;
mod render;
mod template;
mod text;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hmr_protocol::{ExamReport, LabReport};

use crate::render::{Frame, Geometry, ItemsTable, Sections};
use crate::text::TextEngine;

pub use crate::fields::Flags;
pub use crate::template::{
    Align, Column, ExamLayout, FieldGrid, FieldSpec, FontSizes, Footer, HeadingLine, LabLayout, PageSpec, Section,
    Table, Template,
};

/// WenQuanYi Micro Hei, from Debian's `fonts-wqy-microhei`.
pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc";

#[derive(Debug, thiserror::Error)]
pub enum PdfError {
    /// The template is not valid TOML, has an unknown or mistyped key, or an impossible value.
    #[error("report template: {0}")]
    Template(String),
    #[error("reading font {path}: {source}")]
    FontFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The font bytes are unusable (not TrueType/OpenType, bad index, no Chinese glyphs).
    #[error("font: {0}")]
    Font(String),
    #[error("writing PDF: {0}")]
    Pdf(String),
}

/// What the report itself does not carry: names the hospital knows from its own master data
/// (the worker reads them from optional columns of the report's source view, else from the
/// patient, department and staff views), and the hospital's own texts.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub hospital_name: String,
    /// Printed as 科室; the report's `deptCode` is used when absent.
    pub department_name: Option<String>,
    /// Printed as 性别 as given; else from `gender_code` (GB/T 2261.1: 1 男, 2 女 …).
    pub gender: Option<String>,
    pub gender_code: Option<String>,
    /// Printed as 年龄 as given; else the age at report time from `birth_date` (岁, or 月/天 for
    /// infants).
    pub age: Option<String>,
    pub birth_date: Option<String>,
    /// 申请医生, 检验者 (lab), 审核者, 报告医师 (exam): names; the staff numbers otherwise.
    pub request_doctor_name: Option<String>,
    pub tester_name: Option<String>,
    pub auditor_name: Option<String>,
    pub reporter_name: Option<String>,
    /// 标本接收时间 (lab).
    pub received_at: Option<String>,
    /// The hospital's 互认 statement (`{recognition_statement}`, printed under the report).
    pub recognition_statement: Option<String>,
}

/// A template plus a parsed font: build once, render many (it is `Send + Sync`).
pub struct Renderer {
    template: Template,
    data: Arc<Vec<u8>>,
    index: u32,
    font: writer::FontInfo,
}

impl std::fmt::Debug for Renderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renderer")
            .field("font_bytes", &self.data.len())
            .field("index", &self.index)
            .finish()
    }
}

impl Renderer {
    pub fn new(template: Template, font_bytes: Vec<u8>, font_index: u32) -> Result<Renderer, PdfError> {
        template.validate()?;
        let data = Arc::new(font_bytes);
        let engine = TextEngine::new(&data, font_index).ok_or_else(|| {
            PdfError::Font(format!(
                "not a TrueType/OpenType font, or no face at index {font_index}"
            ))
        })?;
        // Without CJK glyphs every Chinese character would print as an empty box.
        if !"检验报告".chars().all(|c| engine.has_glyph(c)) {
            return Err(PdfError::Font(
                "the font has no Chinese glyphs (检验报告); use a CJK font".to_owned(),
            ));
        }
        let font = writer::FontInfo::new(data, font_index)
            .ok_or_else(|| PdfError::Font(format!("the PDF writer cannot use face {font_index} of this font")))?;
        // Measured and embedded from the same standalone face (the file itself is not kept).
        Ok(Renderer {
            template,
            data: font.data.clone(),
            index: font.index,
            font,
        })
    }

    /// Reads a `.ttf`/`.otf`, or the first face of a `.ttc`.
    pub fn from_font_file(template: Template, path: &Path) -> Result<Renderer, PdfError> {
        let bytes = std::fs::read(path).map_err(|source| PdfError::FontFile {
            path: path.to_owned(),
            source,
        })?;
        Renderer::new(template, bytes, 0)
    }

    pub fn template(&self) -> &Template {
        &self.template
    }

    pub fn lab(&self, report: &LabReport, ctx: &Context) -> Result<Vec<u8>, PdfError> {
        let t = &self.template;
        let engine = self.engine()?;
        let g = Geometry::new(t, &engine);
        let values = fields::lab(report, ctx);
        let rows = report
            .items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                let cells = t
                    .lab
                    .table
                    .columns
                    .iter()
                    .map(|c| fields::item(i, it, &c.field, &t.flags))
                    .collect();
                (cells, t.flags.bold_abnormal && fields::is_abnormal(it))
            })
            .collect();
        let table = ItemsTable::new(&g, &t.lab.table.columns, rows, t.fonts.table_header, t.fonts.table);
        let frame = Frame {
            heading: &t.lab.heading,
            header_fields: &t.lab.header.fields,
            header_columns: t.lab.header.columns,
            footer: &t.lab.footer,
            values: &values,
            title: format!("检验报告单 {}", report.report_no),
        };
        render::render(&g, &self.font, &frame, &table)
    }

    pub fn exam(&self, report: &ExamReport, ctx: &Context) -> Result<Vec<u8>, PdfError> {
        let t = &self.template;
        let engine = self.engine()?;
        let g = Geometry::new(t, &engine);
        let values = fields::exam(report, ctx, &t.flags);
        let sections = t
            .exam
            .sections
            .iter()
            .map(|s| {
                (
                    s.label.clone(),
                    values.get(s.field.as_str()).cloned().unwrap_or_default(),
                )
            })
            .collect();
        let body = Sections::new(&g, sections, t.fonts.section_label, t.fonts.body);
        let frame = Frame {
            heading: &t.exam.heading,
            header_fields: &t.exam.header.fields,
            header_columns: t.exam.header.columns,
            footer: &t.exam.footer,
            values: &values,
            title: format!("检查报告单 {}", report.report_no),
        };
        render::render(&g, &self.font, &frame, &body)
    }

    /// Re-borrows the font tables; cheap (a table-directory parse), and keeps `Renderer` free of
    /// self-references.
    fn engine(&self) -> Result<TextEngine<'_>, PdfError> {
        TextEngine::new(&self.data, self.index).ok_or_else(|| PdfError::Font("font no longer parses".to_owned()))
    }
}
