//! Measuring, wrapping and turning text into glyphs. CJK needs no shaping, so a cmap lookup and
//! the advance widths are enough; this keeps rustybuzz out of the build and makes measured widths
//! exactly the drawn ones.

use skrifa::charmap::Charmap;
use skrifa::instance::{LocationRef, Size};
use skrifa::metrics::GlyphMetrics;
use skrifa::{FontRef, MetadataProvider};

pub(crate) struct TextEngine<'a> {
    charmap: Charmap<'a>,
    metrics: GlyphMetrics<'a>,
    units_per_em: f32,
    /// Above the baseline, in em.
    pub(crate) ascent: f32,
    /// Below the baseline, in em, positive.
    pub(crate) descent: f32,
}

impl<'a> TextEngine<'a> {
    pub(crate) fn new(data: &'a [u8], index: u32) -> Option<TextEngine<'a>> {
        let font = FontRef::from_index(data, index).ok()?;
        let m = font.metrics(Size::unscaled(), LocationRef::default());
        let units_per_em = f32::from(m.units_per_em);
        if units_per_em <= 0.0 {
            return None;
        }
        Some(TextEngine {
            charmap: font.charmap(),
            metrics: font.glyph_metrics(Size::unscaled(), LocationRef::default()),
            units_per_em,
            ascent: m.ascent / units_per_em,
            descent: -m.descent / units_per_em,
        })
    }

    pub(crate) fn has_glyph(&self, c: char) -> bool {
        self.charmap.map(c).is_some()
    }

    /// Glyph and advance (in em); unmapped characters become `.notdef`.
    fn glyph(&self, c: char) -> (u32, f32) {
        let gid = self.charmap.map(c).unwrap_or(skrifa::GlyphId::NOTDEF);
        let advance = self.metrics.advance_width(gid).unwrap_or(0.0) / self.units_per_em;
        (gid.to_u32(), advance)
    }

    pub(crate) fn width(&self, text: &str, size: f32) -> f32 {
        text.chars().map(|c| self.glyph(c).1).sum::<f32>() * size
    }

    /// One glyph per char, with the char it shows (for the PDF's ToUnicode map, so the text
    /// can be searched and copied).
    pub(crate) fn glyphs(&self, text: &str) -> Vec<crate::writer::Glyph> {
        text.chars()
            .map(|c| {
                let (gid, advance) = self.glyph(c);
                (u16::try_from(gid).unwrap_or(0), advance, c)
            })
            .collect()
    }

    /// Breaks `text` into lines no wider than `max` (except a single character wider than `max`).
    /// Explicit newlines start a new line.
    pub(crate) fn wrap(&self, text: &str, size: f32, max: f32) -> Vec<String> {
        let mut lines = Vec::new();
        for para in text.split('\n') {
            self.wrap_paragraph(&clean(para), size, max, &mut lines);
        }
        lines
    }

    fn wrap_paragraph(&self, para: &str, size: f32, max: f32, lines: &mut Vec<String>) {
        let chars: Vec<(usize, char, f32)> = para
            .char_indices()
            .map(|(i, c)| (i, c, self.glyph(c).1 * size))
            .collect();
        let byte_at = |k: usize| chars.get(k).map_or(para.len(), |c| c.0);
        if chars.is_empty() {
            lines.push(String::new());
            return;
        }
        let mut start = 0;
        while start < chars.len() {
            let mut width = 0.0;
            let mut end = start;
            // Where a new line may begin: after a space, before or after a CJK character.
            let mut opportunity = None;
            while end < chars.len() {
                let (_, c, w) = chars[end];
                // Spaces may overhang: they are trimmed off the line's end.
                if width + w > max && end > start && c != ' ' {
                    break;
                }
                width += w;
                end += 1;
                if c == ' ' || is_cjk(c) || chars.get(end).is_some_and(|n| is_cjk(n.1)) {
                    opportunity = Some(end);
                }
            }
            if end == chars.len() {
                lines.push(para[byte_at(start)..].trim_end().to_owned());
                break;
            }
            let mut cut = match opportunity {
                Some(o) if o > start => o,
                _ => end,
            };
            // A line must not begin with closing punctuation: take the character before along.
            if is_closing(chars[cut].1) && cut > start + 1 {
                cut -= 1;
            }
            lines.push(para[byte_at(start)..byte_at(cut)].trim_end().to_owned());
            start = cut;
            while start < chars.len() && chars[start].1 == ' ' {
                start += 1;
            }
        }
    }
}

/// Tabs become spaces; other control characters would draw as boxes.
fn clean(s: &str) -> String {
    s.chars()
        .filter_map(|c| {
            if c == '\t' {
                Some(' ')
            } else if c.is_control() {
                None
            } else {
                Some(c)
            }
        })
        .collect()
}

fn is_cjk(c: char) -> bool {
    matches!(c, '\u{2E80}'..='\u{9FFF}' | '\u{AC00}'..='\u{D7AF}' | '\u{F900}'..='\u{FAFF}' | '\u{FF00}'..='\u{FFEF}')
}

fn is_closing(c: char) -> bool {
    "，。、；：？！）」』》】〕,.;:!?)]%".contains(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(data: &[u8]) -> TextEngine<'_> {
        TextEngine::new(data, 0).expect("font parses")
    }

    #[test]
    fn wraps_cjk_latin_and_punctuation() {
        let data = std::fs::read(crate::DEFAULT_FONT).unwrap_or_else(|e| {
            panic!(
                "cannot read {}: {e}; install the Debian/Ubuntu package fonts-wqy-microhei \
                 (scripts/bootstrap.sh installs it)",
                crate::DEFAULT_FONT
            )
        });
        let e = engine(&data);
        let w = e.width("检", 10.0);
        assert!(w > 8.0 && w <= 10.5, "CJK advance about 1em, got {w}");

        // Five CJK characters per line.
        let lines = e.wrap("肝脏大小形态正常包膜光滑", 10.0, w * 5.0 + 0.1);
        assert_eq!(lines, ["肝脏大小形", "态正常包膜", "光滑"]);
        // A comma would start line 2, so it pulls 形 down with it.
        let lines = e.wrap("肝脏大小形，态正常", 10.0, w * 5.0 + 0.1);
        assert_eq!(lines, ["肝脏大小", "形，态正常"]);
        // Latin words stay whole.
        let lines = e.wrap("alpha beta gamma", 10.0, e.width("alpha beta", 10.0) + 0.1);
        assert_eq!(lines, ["alpha beta", "gamma"]);
        // Newlines are kept, every line fits.
        let lines = e.wrap("第一行\n\n第三行很长很长很长很长很长很长", 10.0, w * 4.0 + 0.1);
        assert_eq!(lines[..3], ["第一行", "", "第三行很"]);
        assert!(lines.iter().all(|l| e.width(l, 10.0) <= w * 4.0 + 0.1));
    }
}
