//! Page composition: every page gets the heading, the header fields and the footer; the body
//! (items table or free-text sections) flows between them across as many pages as it needs.

use pdf_writer::Content;

use crate::fields::{self, Values};
use crate::template::{Align, Column, FieldSpec, Footer, HeadingLine, Template};
use crate::text::TextEngine;
use crate::writer::{Doc, FontInfo};
use crate::PdfError;

const PT_PER_MM: f32 = 72.0 / 25.4;
/// Line height as a multiple of the font size.
const LEADING: f32 = 1.35;
const CELL_PAD_X: f32 = 3.0;
const CELL_PAD_Y: f32 = 2.0;
const GAP: f32 = 4.0;
const THICK: f32 = 1.0;
const THIN: f32 = 0.5;

/// What is shared by every page of one report.
pub(crate) struct Frame<'a> {
    pub heading: &'a [HeadingLine],
    pub header_fields: &'a [FieldSpec],
    pub header_columns: usize,
    pub footer: &'a Footer,
    pub values: &'a Values,
    pub title: String,
}

/// The body of a report, laid out as rows of known height so it can be split into pages.
pub(crate) trait Body {
    /// Height above the rows that every page repeats (e.g. the table's column labels).
    fn repeat_height(&self) -> f32;
    fn row_heights(&self) -> Vec<f32>;
    /// A row that must not end a page when another row follows (a section label).
    fn keep_with_next(&self, _row: usize) -> bool {
        false
    }
    fn draw_repeat(&self, p: &mut Painter<'_, '_>, top: f32);
    fn draw_row(&self, p: &mut Painter<'_, '_>, row: usize, top: f32);
    /// Drawn under the last row of each page.
    fn draw_end(&self, p: &mut Painter<'_, '_>, y: f32);
}

/// Content box and text engine, independent of any page.
pub(crate) struct Geometry<'a> {
    pub text: &'a TextEngine<'a>,
    pub t: &'a Template,
    pub width: f32,
    pub height: f32,
    pub left: f32,
    pub right: f32,
    pub top: f32,
    pub bottom: f32,
}

impl<'a> Geometry<'a> {
    pub(crate) fn new(t: &'a Template, text: &'a TextEngine<'a>) -> Geometry<'a> {
        let p = &t.page;
        Geometry {
            text,
            t,
            width: p.width_mm * PT_PER_MM,
            height: p.height_mm * PT_PER_MM,
            left: p.margin_left_mm * PT_PER_MM,
            right: (p.width_mm - p.margin_right_mm) * PT_PER_MM,
            top: p.margin_top_mm * PT_PER_MM,
            bottom: (p.height_mm - p.margin_bottom_mm) * PT_PER_MM,
        }
    }

    pub(crate) fn content_width(&self) -> f32 {
        self.right - self.left
    }

    pub(crate) fn line_height(size: f32) -> f32 {
        size * LEADING
    }

    /// Baseline that centres a line of `size` vertically in a box of `height` starting at `top`.
    pub(crate) fn baseline(&self, top: f32, height: f32, size: f32) -> f32 {
        let (asc, desc) = (self.text.ascent * size, self.text.descent * size);
        top + (height - (asc + desc)) / 2.0 + asc
    }

    /// Lays out `label：value` cells `columns` to a row, left to right; a cell that would not fit
    /// the row's remaining columns starts the next row. Values wrap inside their cell.
    fn grid(&self, fields: &[FieldSpec], columns: usize, size: f32, values: &Values) -> Vec<GridRow> {
        let cell_w = self.content_width() / columns as f32;
        let mut rows: Vec<GridRow> = Vec::new();
        let mut col = columns; // forces a first row
        for f in fields {
            let empty = values.get(f.field.as_str()).is_none_or(|v| v.trim().is_empty());
            if empty && !f.always {
                continue;
            }
            let span = f.span.clamp(1, columns);
            if col + span > columns {
                rows.push(GridRow {
                    cells: Vec::new(),
                    height: Self::line_height(size),
                });
                col = 0;
            }
            let label = format!("{}：", f.label);
            let label_w = self.text.width(&label, size);
            let value = values.get(f.field.as_str()).map(String::as_str).unwrap_or_default();
            let max = (span as f32 * cell_w - label_w - CELL_PAD_X).max(size);
            let lines = self.text.wrap(value, size, max);
            if let Some(row) = rows.last_mut() {
                row.height = row.height.max(lines.len().max(1) as f32 * Self::line_height(size));
                row.cells.push(GridCell {
                    x: self.left + col as f32 * cell_w,
                    label,
                    label_w,
                    lines,
                });
            }
            col += span;
        }
        rows
    }
}

struct GridCell {
    x: f32,
    label: String,
    label_w: f32,
    lines: Vec<String>,
}

struct GridRow {
    cells: Vec<GridCell>,
    height: f32,
}

/// Draws on one page (y measured from the top of the page).
pub(crate) struct Painter<'s, 'f> {
    pub g: &'s Geometry<'s>,
    doc: &'s mut Doc<'f>,
    page: &'s mut Content,
}

impl Painter<'_, '_> {
    pub(crate) fn text(&mut self, x: f32, baseline: f32, size: f32, text: &str, bold: bool) {
        if text.is_empty() {
            return;
        }
        let glyphs = self.g.text.glyphs(text);
        self.doc.text(self.page, x, baseline, size, &glyphs, bold);
    }

    /// Text aligned inside `[x0, x1]`.
    pub(crate) fn text_in(
        &mut self,
        (x0, x1): (f32, f32),
        baseline: f32,
        size: f32,
        text: &str,
        align: Align,
        bold: bool,
    ) {
        let x = match align {
            Align::Left => x0,
            Align::Center => (x0 + x1 - self.g.text.width(text, size)) / 2.0,
            Align::Right => x1 - self.g.text.width(text, size),
        };
        self.text(x, baseline, size, text, bold);
    }

    pub(crate) fn hline(&mut self, y: f32, width: f32) {
        let y = self.doc.height() - y;
        self.page
            .set_line_width(width)
            .move_to(self.g.left, y)
            .line_to(self.g.right, y)
            .stroke();
    }

    pub(crate) fn shade(&mut self, top: f32, height: f32) {
        let bottom = self.doc.height() - top - height;
        self.page
            .save_state()
            .set_fill_rgb(232.0 / 255.0, 232.0 / 255.0, 232.0 / 255.0)
            .rect(self.g.left, bottom, self.g.content_width(), height)
            .fill_nonzero()
            .restore_state();
    }

    fn grid(&mut self, rows: &[GridRow], top: f32, size: f32) -> f32 {
        let lh = Geometry::line_height(size);
        let mut y = top;
        for row in rows {
            for cell in &row.cells {
                let baseline = self.g.baseline(y, lh, size);
                self.text(cell.x, baseline, size, &cell.label, false);
                for (k, line) in cell.lines.iter().enumerate() {
                    self.text(cell.x + cell.label_w, baseline + k as f32 * lh, size, line, false);
                }
            }
            y += row.height;
        }
        y
    }
}

/// Lays the report out and writes the PDF.
pub(crate) fn render(
    g: &Geometry<'_>,
    font: &FontInfo,
    frame: &Frame<'_>,
    body: &dyn Body,
) -> Result<Vec<u8>, PdfError> {
    let t = g.t;
    let values = frame.values;

    // Fixed parts: their heights are the same on every page.
    let heading_h: f32 = frame
        .heading
        .iter()
        .filter(|l| !l.inline)
        .map(|l| Geometry::line_height(l.size))
        .sum();
    let header_rows = g.grid(frame.header_fields, frame.header_columns, t.fonts.header, values);
    let header_h: f32 = header_rows.iter().map(|r| r.height).sum();
    let footer_rows = g.grid(&frame.footer.fields, frame.footer.columns, t.fonts.footer, values);
    let footer_lh = Geometry::line_height(t.fonts.footer);
    let notes: Vec<String> = frame
        .footer
        .notes
        .iter()
        .map(|n| fields::fill(n, values, 0, 0))
        // A note that fills to nothing (no 互认 statement configured) takes no line.
        .filter(|n| !n.trim().is_empty())
        .flat_map(|n| g.text.wrap(&n, t.fonts.footer, g.content_width()))
        .collect();
    let page_number_h = if frame.footer.page_number.is_empty() {
        0.0
    } else {
        footer_lh
    };
    let footer_h =
        GAP + footer_rows.iter().map(|r| r.height).sum::<f32>() + notes.len() as f32 * footer_lh + page_number_h;

    let body_top = g.top + heading_h + GAP + THICK + GAP + header_h + GAP;
    let body_bottom = g.bottom - footer_h - GAP;
    let rows_top = body_top + body.repeat_height();

    // Split rows into pages; each page takes at least one row so a huge row cannot stall us.
    let heights = body.row_heights();
    let mut pages: Vec<std::ops::Range<usize>> = Vec::new();
    let mut start = 0;
    while start < heights.len() {
        let mut y = rows_top;
        let mut end = start;
        while end < heights.len() && (end == start || y + heights[end] <= body_bottom) {
            y += heights[end];
            end += 1;
        }
        while end < heights.len() && end - start > 1 && body.keep_with_next(end - 1) {
            end -= 1;
        }
        pages.push(start..end);
        start = end;
    }
    if pages.is_empty() {
        pages.push(0..0);
    }

    if !(g.width > 0.0 && g.height > 0.0 && g.width.is_finite() && g.height.is_finite()) {
        return Err(PdfError::Template(format!(
            "page: invalid size {}×{} pt",
            g.width, g.height
        )));
    }
    let mut doc = Doc::new(font, g.width, g.height);
    let page_count = pages.len();
    for (n, rows) in pages.into_iter().enumerate() {
        let mut content = Content::new();
        let mut p = Painter {
            g,
            doc: &mut doc,
            page: &mut content,
        };

        // Heading lines; inline ones share the previous line's baseline.
        let mut y = g.top;
        let mut baseline = y;
        for line in frame.heading {
            if !line.inline {
                let h = Geometry::line_height(line.size);
                baseline = g.baseline(y, h, line.size);
                y += h;
            }
            let text = fields::fill(&line.text, values, n + 1, page_count);
            p.text_in((g.left, g.right), baseline, line.size, &text, line.align, line.bold);
        }
        y += GAP;
        p.hline(y, THICK);
        y += THICK + GAP;
        y = p.grid(&header_rows, y, t.fonts.header);
        p.hline(y + GAP / 2.0, THIN);

        body.draw_repeat(&mut p, body_top);
        let mut y = rows_top;
        for row in rows {
            body.draw_row(&mut p, row, y);
            y += heights[row];
        }
        body.draw_end(&mut p, y);

        // Footer, anchored to the bottom margin.
        let mut y = g.bottom - footer_h;
        p.hline(y, THIN);
        y = p.grid(&footer_rows, y + GAP, t.fonts.footer);
        for note in &notes {
            p.text(
                g.left,
                g.baseline(y, footer_lh, t.fonts.footer),
                t.fonts.footer,
                note,
                false,
            );
            y += footer_lh;
        }
        if !frame.footer.page_number.is_empty() {
            let text = fields::fill(&frame.footer.page_number, values, n + 1, page_count);
            let baseline = g.baseline(y, footer_lh, t.fonts.footer);
            p.text_in((g.left, g.right), baseline, t.fonts.footer, &text, Align::Center, false);
        }

        doc.finish_page(content);
    }
    doc.finish(&frame.title)
}

/// The lab items table.
pub(crate) struct ItemsTable<'a> {
    pub columns: &'a [Column],
    /// x range of each column.
    pub spans: Vec<(f32, f32)>,
    /// Wrapped lines per row and column.
    pub cells: Vec<Vec<Vec<String>>>,
    pub bold: Vec<bool>,
    pub header_size: f32,
    pub size: f32,
}

impl<'a> ItemsTable<'a> {
    pub(crate) fn new(
        g: &Geometry<'_>,
        columns: &'a [Column],
        rows: Vec<(Vec<String>, bool)>,
        header_size: f32,
        size: f32,
    ) -> ItemsTable<'a> {
        let total: f32 = columns.iter().map(|c| c.width).sum();
        let mut x = g.left;
        let spans: Vec<(f32, f32)> = columns
            .iter()
            .map(|c| {
                let w = c.width / total * g.content_width();
                x += w;
                (x - w, x)
            })
            .collect();
        let (cells, bold) = rows
            .into_iter()
            .map(|(values, bold)| {
                let cells = values
                    .iter()
                    .zip(&spans)
                    .map(|(v, (x0, x1))| g.text.wrap(v, size, (x1 - x0 - 2.0 * CELL_PAD_X).max(size)))
                    .collect();
                (cells, bold)
            })
            .unzip();
        ItemsTable {
            columns,
            spans,
            cells,
            bold,
            header_size,
            size,
        }
    }
}

impl Body for ItemsTable<'_> {
    fn repeat_height(&self) -> f32 {
        Geometry::line_height(self.header_size) + 2.0 * CELL_PAD_Y
    }

    fn row_heights(&self) -> Vec<f32> {
        let lh = Geometry::line_height(self.size);
        self.cells
            .iter()
            .map(|row| row.iter().map(|c| c.len().max(1)).max().unwrap_or(1) as f32 * lh + 2.0 * CELL_PAD_Y)
            .collect()
    }

    fn draw_repeat(&self, p: &mut Painter<'_, '_>, top: f32) {
        let h = self.repeat_height();
        p.shade(top, h);
        let baseline = p.g.baseline(top, h, self.header_size);
        for (c, (x0, x1)) in self.columns.iter().zip(&self.spans) {
            let span = (x0 + CELL_PAD_X, x1 - CELL_PAD_X);
            p.text_in(span, baseline, self.header_size, &c.label, c.align, true);
        }
        p.hline(top + h, THIN);
    }

    fn draw_row(&self, p: &mut Painter<'_, '_>, row: usize, top: f32) {
        let lh = Geometry::line_height(self.size);
        let baseline = p.g.baseline(top + CELL_PAD_Y, lh, self.size);
        for ((c, (x0, x1)), lines) in self.columns.iter().zip(&self.spans).zip(&self.cells[row]) {
            // Only the result and its mark are emphasised, not the whole row.
            let bold = self.bold[row] && matches!(c.field.as_str(), "result" | "flag");
            for (k, line) in lines.iter().enumerate() {
                let b = baseline + k as f32 * lh;
                p.text_in((x0 + CELL_PAD_X, x1 - CELL_PAD_X), b, self.size, line, c.align, bold);
            }
        }
    }

    fn draw_end(&self, p: &mut Painter<'_, '_>, y: f32) {
        p.hline(y + CELL_PAD_Y, THIN);
    }
}

/// Exam free text: each section is a label line followed by wrapped text lines.
pub(crate) struct Sections {
    /// (text, is_label)
    pub lines: Vec<(String, bool)>,
    pub label_size: f32,
    pub body_size: f32,
    pub indent: f32,
}

impl Sections {
    pub(crate) fn new(g: &Geometry<'_>, sections: Vec<(String, String)>, label_size: f32, body_size: f32) -> Sections {
        let indent = 2.0 * body_size;
        let mut lines = Vec::new();
        for (label, text) in sections {
            lines.push((label, true));
            for l in g.text.wrap(text.trim_end(), body_size, g.content_width() - indent) {
                lines.push((l, false));
            }
        }
        Sections {
            lines,
            label_size,
            body_size,
            indent,
        }
    }
}

impl Body for Sections {
    fn repeat_height(&self) -> f32 {
        GAP
    }

    fn row_heights(&self) -> Vec<f32> {
        self.lines
            .iter()
            .enumerate()
            .map(|(i, (_, label))| {
                if *label {
                    // Space above every label but the first.
                    let above = if i == 0 { 0.0 } else { self.body_size };
                    above + Geometry::line_height(self.label_size)
                } else {
                    Geometry::line_height(self.body_size) * 1.1
                }
            })
            .collect()
    }

    fn keep_with_next(&self, row: usize) -> bool {
        self.lines[row].1
    }

    fn draw_repeat(&self, _: &mut Painter<'_, '_>, _: f32) {}

    fn draw_row(&self, p: &mut Painter<'_, '_>, row: usize, top: f32) {
        let (text, label) = &self.lines[row];
        if *label {
            let h = Geometry::line_height(self.label_size);
            let top = if row == 0 { top } else { top + self.body_size };
            let baseline = p.g.baseline(top, h, self.label_size);
            p.text(p.g.left, baseline, self.label_size, text, true);
        } else {
            let h = Geometry::line_height(self.body_size) * 1.1;
            let baseline = p.g.baseline(top, h, self.body_size);
            p.text(p.g.left + self.indent, baseline, self.body_size, text, false);
        }
    }

    fn draw_end(&self, _: &mut Painter<'_, '_>, _: f32) {}
}
