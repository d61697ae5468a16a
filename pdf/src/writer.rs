//! Writes the PDF file itself: pages of content streams and one embedded, subset CID font.
//!
//! Written directly with `pdf-writer` rather than through a general PDF library, because a
//! report needs little (text, lines, a shaded band) and the worker renders a report in well
//! under a millisecond this way: what the font needs is parsed once per `Renderer`
//! ([`FontInfo`]), glyphs are numbered as they are drawn, the font is subset once per
//! document, and streams are compressed at a fast zlib level.

use std::sync::Arc;

use pdf_writer::types::{CidFontType, FontFlags, SystemInfo, TextRenderingMode, UnicodeCmap};
use pdf_writer::{Content, Filter, Finish, Name, Pdf, Rect, Ref, Str, TextStr};
use skrifa::raw::TableProvider;
use skrifa::{FontRef, MetadataProvider};
use subsetter::GlyphRemapper;

use crate::PdfError;

/// zlib level for streams: 1 compresses a report's font to about the size level 6 does, in a
/// fraction of the time.
const ZLIB_LEVEL: u8 = 1;

const SYSTEM_INFO: SystemInfo = SystemInfo {
    registry: Str(b"Adobe"),
    ordering: Str(b"Identity"),
    supplement: 0,
};

/// The font as the PDF describes it, read once.
#[derive(Debug, Clone)]
pub(crate) struct FontInfo {
    pub data: Arc<Vec<u8>>,
    pub index: u32,
    /// PostScript name, without spaces.
    name: String,
    /// In PDF glyph space (1000 units per em).
    bbox: [f32; 4],
    ascent: f32,
    descent: f32,
    cap_height: f32,
}

impl FontInfo {
    /// `data`: the face `index` of a font file; what is embedded is a standalone copy of that
    /// face with only the tables a PDF reader uses (a collection's other faces, glyph names,
    /// layout tables left out), so the per-document subsetting reads no more than it must.
    pub(crate) fn new(data: Arc<Vec<u8>>, index: u32) -> Option<FontInfo> {
        let font = FontRef::from_index(&data, index).ok()?;
        let (data, index) = match standalone(&font) {
            Some(bytes) => (Arc::new(bytes), 0),
            None => (data.clone(), index),
        };
        let font = FontRef::from_index(&data, index).ok()?;
        let head = font.head().ok()?;
        let upem = f32::from(head.units_per_em());
        if upem <= 0.0 {
            return None;
        }
        let to_pdf = |v: f32| v * 1000.0 / upem;
        let hhea = font.hhea().ok()?;
        let ascent = to_pdf(f32::from(hhea.ascender().to_i16()));
        let descent = to_pdf(f32::from(hhea.descender().to_i16()));
        let cap_height = font
            .os2()
            .ok()
            .and_then(|os2| os2.s_cap_height())
            .map(|c| to_pdf(f32::from(c)))
            .unwrap_or(ascent);
        let name: String = font
            .localized_strings(skrifa::string::StringId::POSTSCRIPT_NAME)
            .english_or_first()
            .map(|s| s.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect())
            .filter(|s: &String| !s.is_empty())
            .unwrap_or_else(|| "Font".to_owned());
        let bbox = [
            to_pdf(f32::from(head.x_min())),
            to_pdf(f32::from(head.y_min())),
            to_pdf(f32::from(head.x_max())),
            to_pdf(f32::from(head.y_max())),
        ];
        Some(FontInfo {
            data,
            index,
            name,
            bbox,
            ascent,
            descent,
            cap_height,
        })
    }
}

/// A glyph as laid out: its id in the font, its advance in em, the character it shows.
pub(crate) type Glyph = (u16, f32, char);

/// One document being written: its finished pages and the glyphs they use.
pub(crate) struct Doc<'f> {
    font: &'f FontInfo,
    width: f32,
    height: f32,
    glyphs: GlyphRemapper,
    /// By glyph id in the subset: the character it shows and its advance (1000 units/em).
    used: Vec<(Option<char>, f32)>,
    pages: Vec<Vec<u8>>,
}

impl<'f> Doc<'f> {
    pub(crate) fn new(font: &'f FontInfo, width: f32, height: f32) -> Doc<'f> {
        Doc {
            font,
            width,
            height,
            glyphs: GlyphRemapper::new(),
            used: vec![(None, 0.0)],
            pages: Vec::new(),
        }
    }

    pub(crate) fn height(&self) -> f32 {
        self.height
    }

    /// The glyphs as the bytes of a `Tj` string (two-byte ids of the subset, Identity-H).
    fn encode(&mut self, glyphs: &[Glyph]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(glyphs.len() * 2);
        for &(gid, advance, c) in glyphs {
            let new = self.glyphs.remap(gid);
            if usize::from(new) == self.used.len() {
                self.used.push((Some(c), advance * 1000.0));
            }
            bytes.extend_from_slice(&new.to_be_bytes());
        }
        bytes
    }

    /// Text on a baseline at `x` (y from the top of the page). Bold is the usual stand-in for
    /// a font without a bold face: fill plus a thin outline stroke.
    pub(crate) fn text(&mut self, page: &mut Content, x: f32, baseline: f32, size: f32, glyphs: &[Glyph], bold: bool) {
        let bytes = self.encode(glyphs);
        if bold {
            page.set_line_width(size * 0.035);
        }
        page.begin_text();
        page.set_font(Name(b"F0"), size);
        if bold {
            page.set_text_rendering_mode(TextRenderingMode::FillStroke);
        }
        page.set_text_matrix([1.0, 0.0, 0.0, 1.0, x, self.height - baseline]);
        page.show(Str(&bytes));
        if bold {
            // Text state outlives BT/ET.
            page.set_text_rendering_mode(TextRenderingMode::Fill);
        }
        page.end_text();
    }

    pub(crate) fn finish_page(&mut self, page: Content) {
        self.pages.push(page.finish().into_vec());
    }

    /// The whole file.
    pub(crate) fn finish(self, title: &str) -> Result<Vec<u8>, PdfError> {
        let subset = subsetter::subset(&self.font.data, self.font.index, &self.glyphs)
            .map_err(|e| PdfError::Font(format!("subsetting: {e}")))?;
        let mut pdf = Pdf::new();
        let mut next = Ref::new(1);
        let mut id = || next.bump();
        let (catalog, tree, info) = (id(), id(), id());
        let (type0, cid, descriptor, cmap, file) = (id(), id(), id(), id(), id());
        let pages: Vec<(Ref, Ref)> = self.pages.iter().map(|_| (id(), id())).collect();

        pdf.catalog(catalog).pages(tree).lang(TextStr("zh-CN"));
        pdf.document_info(info)
            .title(TextStr(title))
            .creator(TextStr("hmr-pdf"))
            .producer(TextStr("hmr-pdf"));
        pdf.pages(tree)
            .kids(pages.iter().map(|(p, _)| *p))
            .count(pages.len() as i32);
        for ((page_id, content_id), content) in pages.iter().zip(&self.pages) {
            let mut page = pdf.page(*page_id);
            page.media_box(Rect::new(0.0, 0.0, self.width, self.height))
                .parent(tree)
                .contents(*content_id);
            page.resources().fonts().pair(Name(b"F0"), type0);
            page.finish();
            pdf.stream(*content_id, &deflate(content)).filter(Filter::FlateDecode);
        }

        // A subset is named with a tag of six capitals (PDF 32000 9.6.4), here from its glyphs.
        let tag = subset_tag(&self.used);
        let base = format!("{tag}+{}", self.font.name);
        pdf.type0_font(type0)
            .base_font(Name(base.as_bytes()))
            .encoding_predefined(Name(b"Identity-H"))
            .descendant_font(cid)
            .to_unicode(cmap);
        let mut font = pdf.cid_font(cid);
        font.subtype(CidFontType::Type2)
            .base_font(Name(base.as_bytes()))
            .system_info(SYSTEM_INFO)
            .font_descriptor(descriptor)
            .default_width(0.0)
            .cid_to_gid_map_predefined(Name(b"Identity"));
        font.widths().consecutive(0, self.used.iter().map(|(_, w)| *w));
        font.finish();
        let [x0, y0, x1, y1] = self.font.bbox;
        pdf.font_descriptor(descriptor)
            .name(Name(base.as_bytes()))
            .flags(FontFlags::SYMBOLIC)
            .bbox(Rect::new(x0, y0, x1, y1))
            .italic_angle(0.0)
            .ascent(self.font.ascent)
            .descent(self.font.descent)
            .cap_height(self.font.cap_height)
            .stem_v(80.0)
            .font_file2(file);

        // Glyph → character, so the text can be searched and copied.
        let mut map = UnicodeCmap::new(Name(b"Custom"), SYSTEM_INFO);
        for (gid, (c, _)) in self.used.iter().enumerate().skip(1) {
            if let Some(c) = c {
                map.pair(gid as u16, *c);
            }
        }
        let map = map.finish().into_vec();
        let map = deflate(&map);
        let mut cmap = pdf.cmap(cmap, &map);
        cmap.name(Name(b"Custom")).system_info(SYSTEM_INFO);
        cmap.filter(Filter::FlateDecode);
        cmap.finish();

        let packed = deflate(&subset);
        let mut stream = pdf.stream(file, &packed);
        stream.filter(Filter::FlateDecode);
        stream.pair(Name(b"Length1"), subset.len() as i32);
        stream.finish();
        Ok(pdf.finish())
    }
}

/// The face as a standalone TrueType file with the tables a PDF's FontFile2 needs (glyph
/// outlines, metrics, hinting, cmap, name, OS/2) and a `post` table without glyph names.
/// `None` for a font without TrueType outlines (then the face is used as it is).
fn standalone(font: &FontRef<'_>) -> Option<Vec<u8>> {
    use skrifa::raw::types::Tag;
    const KEEP: [&[u8; 4]; 12] = [
        b"OS/2", b"cmap", b"cvt ", b"fpgm", b"glyf", b"head", b"hhea", b"hmtx", b"loca", b"maxp", b"name", b"prep",
    ];
    font.table_data(Tag::new(b"glyf"))?;
    let post = font.table_data(Tag::new(b"post"))?;
    // post 3.0: the header only (no glyph names).
    let mut post3 = post.as_bytes().get(..32)?.to_vec();
    post3[..4].copy_from_slice(&0x0003_0000u32.to_be_bytes());
    let mut tables: Vec<([u8; 4], Vec<u8>)> = KEEP
        .iter()
        .filter_map(|tag| Some((**tag, font.table_data(Tag::new(tag))?.as_bytes().to_vec())))
        .collect();
    tables.push((*b"post", post3));
    tables.sort_by_key(|t| t.0);
    let n = tables.len() as u16;
    let entry_selector = 15 - n.leading_zeros() as u16;
    let search_range = (1u16 << entry_selector) * 16;
    let mut out = Vec::new();
    out.extend_from_slice(&0x0001_0000u32.to_be_bytes());
    for v in [n, search_range, entry_selector, n * 16 - search_range] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    let mut offset = 12 + 16 * tables.len();
    for (tag, bytes) in &tables {
        out.extend_from_slice(tag);
        out.extend_from_slice(&checksum(bytes).to_be_bytes());
        out.extend_from_slice(&(offset as u32).to_be_bytes());
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        offset += bytes.len().div_ceil(4) * 4;
    }
    for (_, bytes) in &tables {
        out.extend_from_slice(bytes);
        out.resize(out.len().div_ceil(4) * 4, 0);
    }
    Some(out)
}

fn checksum(bytes: &[u8]) -> u32 {
    bytes.chunks(4).fold(0u32, |sum, c| {
        let mut word = [0u8; 4];
        word[..c.len()].copy_from_slice(c);
        sum.wrapping_add(u32::from_be_bytes(word))
    })
}

fn deflate(data: &[u8]) -> Vec<u8> {
    miniz_oxide::deflate::compress_to_vec_zlib(data, ZLIB_LEVEL)
}

/// Six capital letters from the glyphs used (FNV-1a of the characters).
fn subset_tag(used: &[(Option<char>, f32)]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (c, _) in used {
        hash ^= u64::from(c.map_or(0, u32::from));
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (0..6)
        .map(|i| char::from(b'A' + ((hash >> (i * 8)) % 26) as u8))
        .collect()
}
