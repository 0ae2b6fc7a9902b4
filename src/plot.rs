//! Line charts of a run's metrics as PNG files (`lmforge plot`): one panel per metric, stacked,
//! sharing the step axis. Everything is drawn here — a 5×7 bitmap font, lines, the PNG chunks
//! (deflate by `miniz_oxide`) — with no system fonts or libraries: plotters draws text through
//! font-kit/fontconfig or a TTF file the project would have to ship, for a few labels.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// One curve: (x, y) points in order.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const W: usize = 860;
const PANEL: usize = 230;
const LEFT: usize = 78;
const RIGHT: usize = 24;
const TOP: usize = 34;
const BOTTOM: usize = 40;
const COLORS: [[u8; 3]; 6] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [255, 127, 14],
    [148, 103, 189],
    [140, 86, 75],
];

/// An RGB canvas.
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Self {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.set(x, y, c);
            }
        }
    }

    /// A line two pixels wide (Bresenham, each point drawn as a 2×2 block).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3], thick: bool) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            if thick {
                self.set(x + 1, y, c);
                self.set(x, y + 1, c);
                self.set(x + 1, y + 1, c);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text in the 5×7 font at `scale`, top-left at (x, y); returns its width.
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3], scale: i64) -> i64 {
        let mut cx = x;
        for ch in s.chars() {
            let g = glyph(ch);
            for (r, row) in g.iter().enumerate() {
                for (col, b) in row.bytes().enumerate() {
                    if b == b'#' {
                        self.rect(
                            cx + col as i64 * scale,
                            y + r as i64 * scale,
                            cx + col as i64 * scale + scale - 1,
                            y + r as i64 * scale + scale - 1,
                            c,
                        );
                    }
                }
            }
            cx += 6 * scale;
        }
        cx - x
    }
}

/// Width in pixels of `s` at scale 1.
fn text_width(s: &str) -> i64 {
    6 * s.chars().count() as i64
}

/// Tick values for [lo, hi]: about five "nice" steps (1, 2, 5 × 10^k).
/// About five round values (1, 2 or 5 × 10^k apart) within [lo, hi].
pub(crate) fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    // Multiples of the step, computed (not accumulated) so labels stay round.
    (first..=last).map(|i| i as f64 * step).collect()
}

/// A tick's text, one format per axis: as many decimals as the ticks' spacing needs (2.31000
/// and 2.31002 differ in print), or scientific notation when the axis's largest tick is below
/// 1e-3 or from 1e6 on.
pub(crate) fn label(v: f64, ticks: &[f64]) -> String {
    let step = match ticks {
        [a, b, ..] => (b - a).abs(),
        _ => v.abs(),
    };
    let top = ticks.iter().fold(v.abs(), |m, t| m.max(t.abs()));
    if v == 0.0 {
        return "0".to_string();
    }
    if !(1e-3..1e6).contains(&top) {
        let digits = ((v.abs().log10().floor() - step.log10().floor()).max(0.0) as usize).min(6);
        return format!("{v:.digits$e}");
    }
    let decimals = (-step.log10().floor()).clamp(0.0, 8.0) as usize;
    format!("{v:.decimals$}")
}

/// Writes `panels` (a title and its curves each) stacked in one PNG, x labelled `x_label`.
pub fn chart(panels: &[(String, Vec<Series>)], x_label: &str, path: &Path) -> Result<()> {
    if panels.is_empty()
        || panels
            .iter()
            .all(|(_, s)| s.iter().all(|s| s.points.is_empty()))
    {
        bail!("nothing to plot");
    }
    let h = panels.len() * PANEL + BOTTOM;
    let mut cv = Canvas::new(W, h);
    let (x_lo, x_hi) = range(
        panels
            .iter()
            .flat_map(|p| &p.1)
            .flat_map(|s| &s.points)
            .map(|p| p.0),
    );
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (PANEL - TOP - 16) as f64);
    for (k, (title, series)) in panels.iter().enumerate() {
        let top = (k * PANEL + TOP) as i64;
        let (y_lo, y_hi) = range(series.iter().flat_map(|s| &s.points).map(|p| p.1));
        let px = |x: f64| LEFT as i64 + ((x - x_lo) / (x_hi - x_lo) * pw).round() as i64;
        let py = |y: f64| top + ph as i64 - ((y - y_lo) / (y_hi - y_lo) * ph).round() as i64;
        cv.text(LEFT as i64, top - 24, title, [0, 0, 0], 2);
        let ys = ticks(y_lo, y_hi);
        for &t in &ys {
            let y = py(t);
            cv.line(
                (LEFT as i64, y),
                ((W - RIGHT) as i64, y),
                [228, 228, 228],
                false,
            );
            let s = label(t, &ys);
            cv.text(LEFT as i64 - 6 - text_width(&s), y - 3, &s, [60, 60, 60], 1);
        }
        let xs = ticks(x_lo, x_hi);
        for &t in &xs {
            let x = px(t);
            cv.line((x, top), (x, top + ph as i64), [228, 228, 228], false);
            let s = label(t, &xs);
            cv.text(
                x - text_width(&s) / 2,
                top + ph as i64 + 5,
                &s,
                [60, 60, 60],
                1,
            );
        }
        let (l, r, b) = (LEFT as i64, (W - RIGHT) as i64, top + ph as i64);
        cv.line((l, top), (l, b), [0, 0, 0], false);
        cv.line((l, b), (r, b), [0, 0, 0], false);
        let mut lx = r;
        for (i, s) in series.iter().enumerate().rev() {
            let c = COLORS[i % COLORS.len()];
            for w in s.points.windows(2) {
                cv.line((px(w[0].0), py(w[0].1)), (px(w[1].0), py(w[1].1)), c, true);
            }
            if s.points.len() == 1 {
                let (x, y) = (px(s.points[0].0), py(s.points[0].1));
                cv.rect(x - 2, y - 2, x + 2, y + 2, c);
            }
            if series.len() > 1 {
                lx -= text_width(&s.name) + 22;
                cv.rect(lx, top - 18, lx + 10, top - 12, c);
                cv.text(lx + 14, top - 19, &s.name, [0, 0, 0], 1);
            }
        }
    }
    let s = x_label;
    cv.text(
        (W as i64 - text_width(s)) / 2,
        h as i64 - 16,
        s,
        [0, 0, 0],
        1,
    );
    write_png(&cv, path)
}

/// The span of the values, widened a little (and made non-empty).
fn range(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in v.filter(|x| x.is_finite()) {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.04;
    (lo - pad, hi + pad)
}

/// PNG's CRC-32.
fn crc32(bytes: &[u8]) -> u32 {
    reflected_crc32(0xEDB8_8320, bytes)
}

/// A reflected CRC-32 with polynomial `poly`, bitwise (PNG chunks and TensorBoard records are
/// small and written rarely): 0xEDB88320 is CRC-32, 0x82F63B78 CRC-32C.
pub(crate) fn reflected_crc32(poly: u32, bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { poly ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

fn write_png(cv: &Canvas, path: &Path) -> Result<()> {
    let mut raw = Vec::with_capacity(cv.h * (cv.w * 3 + 1));
    for row in cv.px.chunks(cv.w * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        png.extend_from_slice(&body);
        png.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(cv.w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(cv.h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    chunk(b"IHDR", &ihdr);
    chunk(
        b"IDAT",
        &miniz_oxide::deflate::compress_to_vec_zlib(&raw, 8),
    );
    chunk(b"IEND", &[]);
    crate::fsutil::write_file(path, &png).with_context(|| format!("writing {}", path.display()))
}

/// Curves of `metrics` from a run's `metrics.jsonl` (read as `lmforge report` reads it), one
/// panel per metric: (step, value) of every line that has it (eval metrics included).
pub fn from_metrics(run: &Path, metrics: &[String]) -> Result<Vec<(String, Vec<Series>)>> {
    let r = crate::view::report::Run::load(run)?;
    metrics
        .iter()
        .map(|m| match r.curve(m) {
            Some(p) if !p.is_empty() => Ok((
                m.clone(),
                vec![Series {
                    name: m.clone(),
                    points: p.to_vec(),
                }],
            )),
            _ => bail!(
                "{}: no step has the metric {m:?}",
                run.join("metrics.jsonl").display()
            ),
        })
        .collect()
}

/// The 5×7 glyph of a character (upper case drawn as lower case; unknown: a box).
fn glyph(c: char) -> [&'static str; 7] {
    match c.to_ascii_lowercase() {
        '0' => [
            ".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###.",
        ],
        '1' => [
            "..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###.",
        ],
        '2' => [
            ".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####",
        ],
        '3' => [
            "####.", "....#", "....#", ".###.", "....#", "....#", "####.",
        ],
        '4' => [
            "...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#.",
        ],
        '5' => [
            "#####", "#....", "####.", "....#", "....#", "#...#", ".###.",
        ],
        '6' => [
            ".###.", "#....", "#....", "####.", "#...#", "#...#", ".###.",
        ],
        '7' => [
            "#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#...",
        ],
        '8' => [
            ".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###.",
        ],
        '9' => [
            ".###.", "#...#", "#...#", ".####", "....#", "....#", ".###.",
        ],
        'a' => [
            ".....", ".....", ".###.", "....#", ".####", "#...#", ".####",
        ],
        'b' => [
            "#....", "#....", "####.", "#...#", "#...#", "#...#", "####.",
        ],
        'c' => [
            ".....", ".....", ".###.", "#....", "#....", "#...#", ".###.",
        ],
        'd' => [
            "....#", "....#", ".####", "#...#", "#...#", "#...#", ".####",
        ],
        'e' => [
            ".....", ".....", ".###.", "#...#", "#####", "#....", ".###.",
        ],
        'f' => [
            "..##.", ".#...", "####.", ".#...", ".#...", ".#...", ".#...",
        ],
        'g' => [
            ".....", ".....", ".####", "#...#", ".####", "....#", ".###.",
        ],
        'h' => [
            "#....", "#....", "####.", "#...#", "#...#", "#...#", "#...#",
        ],
        'i' => [
            "..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###.",
        ],
        'j' => [
            "...#.", ".....", "..##.", "...#.", "...#.", "#..#.", ".##..",
        ],
        'k' => [
            "#....", "#....", "#..#.", "#.#..", "##...", "#.#..", "#..#.",
        ],
        'l' => [
            ".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###.",
        ],
        'm' => [
            ".....", ".....", "##.#.", "#.#.#", "#.#.#", "#.#.#", "#...#",
        ],
        'n' => [
            ".....", ".....", "####.", "#...#", "#...#", "#...#", "#...#",
        ],
        'o' => [
            ".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###.",
        ],
        'p' => [
            ".....", ".....", "####.", "#...#", "####.", "#....", "#....",
        ],
        'q' => [
            ".....", ".....", ".####", "#...#", ".####", "....#", "....#",
        ],
        'r' => [
            ".....", ".....", "#.##.", "##..#", "#....", "#....", "#....",
        ],
        's' => [
            ".....", ".....", ".####", "#....", ".###.", "....#", "####.",
        ],
        't' => [
            ".#...", ".#...", "####.", ".#...", ".#...", ".#..#", "..##.",
        ],
        'u' => [
            ".....", ".....", "#...#", "#...#", "#...#", "#..##", ".##.#",
        ],
        'v' => [
            ".....", ".....", "#...#", "#...#", "#...#", ".#.#.", "..#..",
        ],
        'w' => [
            ".....", ".....", "#...#", "#...#", "#.#.#", "#.#.#", ".#.#.",
        ],
        'x' => [
            ".....", ".....", "#...#", ".#.#.", "..#..", ".#.#.", "#...#",
        ],
        'y' => [
            ".....", ".....", "#...#", "#...#", ".####", "....#", ".###.",
        ],
        'z' => [
            ".....", ".....", "#####", "...#.", "..#..", ".#...", "#####",
        ],
        ' ' => [
            ".....", ".....", ".....", ".....", ".....", ".....", ".....",
        ],
        '.' => [
            ".....", ".....", ".....", ".....", ".....", ".##..", ".##..",
        ],
        ',' => [
            ".....", ".....", ".....", ".....", ".##..", "..#..", ".#...",
        ],
        ':' => [
            ".....", ".##..", ".##..", ".....", ".##..", ".##..", ".....",
        ],
        '-' => [
            ".....", ".....", ".....", "#####", ".....", ".....", ".....",
        ],
        '+' => [
            ".....", "..#..", "..#..", "#####", "..#..", "..#..", ".....",
        ],
        '=' => [
            ".....", ".....", "#####", ".....", "#####", ".....", ".....",
        ],
        '_' => [
            ".....", ".....", ".....", ".....", ".....", ".....", "#####",
        ],
        '/' => [
            ".....", "....#", "...#.", "..#..", ".#...", "#....", ".....",
        ],
        '(' => [
            "...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#.",
        ],
        ')' => [
            ".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#...",
        ],
        '%' => [
            "##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##",
        ],
        '>' => [
            ".#...", "..#..", "...#.", "....#", "...#.", "..#..", ".#...",
        ],
        '<' => [
            "...#.", "..#..", ".#...", "#....", ".#...", "..#..", "...#.",
        ],
        _ => [
            "#####", "#...#", "#...#", "#...#", "#...#", "#...#", "#####",
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_nice_and_cover_the_range() {
        let t = ticks(0.0, 1.0);
        assert_eq!(t.len(), 6);
        assert!(t
            .iter()
            .zip([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
            .all(|(a, b)| (a - b).abs() < 1e-12));
        let t = ticks(-3.2, 47.0);
        assert!(
            t.first().is_some_and(|&x| x >= -3.2) && t.len() >= 4,
            "{t:?}"
        );
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
    }

    #[test]
    fn a_chart_is_a_png() {
        let d = std::env::temp_dir().join(format!("lmforge-plot-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let s = Series {
            name: "reward".into(),
            points: (0..20)
                .map(|i| (i as f64, (i as f64 / 5.0).sin()))
                .collect(),
        };
        let p = d.join("c.png");
        chart(&[("reward".into(), vec![s])], "step", &p).unwrap();
        let b = std::fs::read(&p).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
        assert!(b.len() > 1000 && b.len() < 200_000, "{}", b.len());
        let _ = std::fs::remove_dir_all(&d);
    }
}
