//! A small PNG chart of a compression report: top-1 accuracy against compression ratio
//! (log scale), one numbered marker per configuration, a title, named axes and a legend
//! that gives each number its configuration, ratio and accuracy, in a built-in 3x5 font
//! (capitals). The PNG is written by hand (IHDR, zlib IDAT, IEND): no plotting
//! dependency.

use std::io::Write;

const W: usize = 640;
/// The plot area's height; the picture is taller by the title, the x axis and the legend.
const PH: usize = 330;
const LEFT: usize = 60;
const RIGHT: usize = 20;
const TOP: usize = 44;
/// Below the plot area: tick labels, the x axis's name, then the legend.
const BOTTOM: usize = 54;
/// One legend line.
const LINE: usize = 14;

/// 3x5 glyphs, rows top to bottom, bits left to right.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '%' => [5, 1, 2, 4, 5],
        'x' => [0, 5, 2, 5, 0],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        ',' => [0, 0, 0, 2, 4],
        ':' => [0, 2, 0, 2, 0],
        '/' => [1, 1, 2, 4, 4],
        '=' => [0, 7, 0, 7, 0],
        '_' => [0, 0, 0, 0, 7],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        // Lower case in capitals (but `x`, the multiplication sign of ratios).
        c if c.is_ascii_lowercase() => glyph(c.to_ascii_uppercase()),
        _ => [0; 5],
    }
}

struct Canvas {
    px: Vec<[u8; 3]>,
    h: usize,
}

impl Canvas {
    fn set(&mut self, x: usize, y: usize, c: [u8; 3]) {
        if x < W && y < self.h {
            self.px[y * W + x] = c;
        }
    }

    fn rect(&mut self, x0: usize, y0: usize, x1: usize, y1: usize, c: [u8; 3]) {
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.set(x, y, c);
            }
        }
    }

    /// Text at (x, y) (top left), each font pixel `s` screen pixels.
    fn text(&mut self, x: usize, y: usize, s: &str, scale: usize) {
        for (i, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            for (r, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        let (px, py) = (x + (i * 4 + col) * scale, y + r * scale);
                        self.rect(px, py, px + scale - 1, py + scale - 1, [0, 0, 0]);
                    }
                }
            }
        }
    }
}

/// Marker colours, one per configuration in turn.
const COLOURS: [[u8; 3]; 6] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
];

/// One configuration of the chart: its label, compression ratio and top-1 in [0, 1].
pub struct Point<'a> {
    pub label: &'a str,
    pub ratio: f64,
    pub top1: f64,
}

/// The chart of `points` over the `images` test images; the first point is the dense
/// model (drawn black). Each marker carries its number, which the legend below the
/// axes explains.
pub fn accuracy_vs_ratio_png(points: &[Point], images: usize) -> Vec<u8> {
    let h = TOP + PH + BOTTOM + points.len() * LINE + 8;
    let mut c = Canvas {
        px: vec![[255, 255, 255]; W * h],
        h,
    };
    let (pw, ph) = (W - LEFT - RIGHT, PH);
    let max_ratio = points.iter().map(|p| p.ratio).fold(2.0f64, f64::max);
    let xmax = max_ratio.log2().ceil().max(1.0);
    let lo = points.iter().map(|p| p.top1).fold(1.0f64, f64::min);
    let hi = points.iter().map(|p| p.top1).fold(0.0f64, f64::max);
    let (ylo, yhi) = (
        ((lo * 100.0).floor() - 1.0) / 100.0,
        ((hi * 100.0).ceil() + 1.0) / 100.0,
    );
    let xpos = |r: f64| LEFT + ((r.max(1.0).log2() / xmax) * pw as f64).round() as usize;
    let ypos = |a: f64| {
        TOP + ph
            - (((a - ylo) / (yhi - ylo)) * ph as f64)
                .round()
                .clamp(0.0, ph as f64) as usize
    };
    c.text(
        LEFT,
        6,
        &format!("top-1 accuracy vs compression ratio ({images} test images)"),
        2,
    );
    c.text(4, TOP - 16, "top-1", 2);
    // Axes, ticks and labels.
    c.rect(LEFT, TOP, LEFT, TOP + ph, [0, 0, 0]);
    c.rect(LEFT, TOP + ph, LEFT + pw, TOP + ph, [0, 0, 0]);
    for k in 0..=(xmax as u32) {
        let r = 2f64.powi(k as i32);
        let x = xpos(r);
        c.rect(x, TOP, x, TOP + ph, [225, 225, 225]);
        c.rect(x, TOP + ph, x, TOP + ph + 4, [0, 0, 0]);
        let label = format!("{}x", r as u64);
        c.text(x.saturating_sub(label.len() * 4), TOP + ph + 10, &label, 2);
    }
    let steps = ((yhi - ylo) * 100.0).round() as usize;
    let every = steps.div_ceil(8).max(1);
    for k in (0..=steps).step_by(every) {
        let a = ylo + k as f64 / 100.0;
        let y = ypos(a);
        c.rect(LEFT + 1, y, LEFT + pw, y, [225, 225, 225]);
        c.rect(LEFT - 4, y, LEFT, y, [0, 0, 0]);
        c.text(4, y.saturating_sub(5), &format!("{:.0}%", a * 100.0), 2);
    }
    c.text(
        LEFT,
        TOP + ph + 30,
        "compression ratio (dense bytes / bytes, log scale)",
        2,
    );
    let legend = TOP + ph + BOTTOM;
    for (i, p) in points.iter().enumerate() {
        let col = colour(i);
        let (x, y) = (xpos(p.ratio), ypos(p.top1));
        c.rect(x.saturating_sub(4), y.saturating_sub(4), x + 4, y + 4, col);
        let n = (i + 1).to_string();
        c.text(x + 7, y.saturating_sub(12), &n, 2);
        let ly = legend + i * LINE;
        c.rect(LEFT, ly, LEFT + 8, ly + 8, col);
        c.text(
            LEFT + 16,
            ly,
            &format!("{n} {}: {:.1}x, {:.2}%", p.label, p.ratio, p.top1 * 100.0),
            2,
        );
    }
    png(&c.px, h)
}

/// The dense model black, then the configurations' colours in turn.
fn colour(i: usize) -> [u8; 3] {
    match i {
        0 => [0, 0, 0],
        i => COLOURS[(i - 1) % COLOURS.len()],
    }
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(kind);
    h.update(data);
    out.extend(kind);
    out.extend(data);
    out.extend(h.finalize().to_be_bytes());
}

/// An 8-bit RGB PNG of `W x h` pixels.
fn png(px: &[[u8; 3]], h: usize) -> Vec<u8> {
    let mut raw = Vec::with_capacity(h * (1 + 3 * W));
    for row in px.chunks(W) {
        raw.push(0);
        for p in row {
            raw.extend(p);
        }
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = z.write_all(&raw);
    let idat = z.finish().unwrap_or_default();
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend((W as u32).to_be_bytes());
    ihdr.extend((h as u32).to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PNG's chunks (CRC-checked) and its pixels back through zlib.
    fn decode(b: &[u8]) -> (usize, usize, Vec<[u8; 3]>) {
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
        let mut at = 8;
        let mut idat = Vec::new();
        let (mut w, mut h) = (0, 0);
        while at < b.len() {
            let n = u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize;
            let kind = &b[at + 4..at + 8];
            let data = &b[at + 8..at + 8 + n];
            let crc = u32::from_be_bytes(b[at + 8 + n..at + 12 + n].try_into().unwrap());
            let mut hs = crc32fast::Hasher::new();
            hs.update(kind);
            hs.update(data);
            assert_eq!(hs.finalize(), crc);
            if kind == b"IHDR" {
                w = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
                h = u32::from_be_bytes(data[4..8].try_into().unwrap()) as usize;
            }
            if kind == b"IDAT" {
                idat.extend_from_slice(data);
            }
            at += 12 + n;
        }
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::ZlibDecoder::new(&idat[..]), &mut raw)
            .unwrap();
        assert_eq!(raw.len(), h * (1 + 3 * w));
        let px = raw
            .chunks(1 + 3 * w)
            .flat_map(|r| r[1..].chunks(3).map(|p| [p[0], p[1], p[2]]))
            .collect();
        (w, h, px)
    }

    /// A valid PNG with a title, the axes' names, a numbered marker per configuration
    /// and a legend line per configuration in its marker's colour.
    #[test]
    fn writes_a_png_with_title_axes_and_legend() {
        let points = [
            Point {
                label: "dense",
                ratio: 1.0,
                top1: 0.913,
            },
            Point {
                label: "int8",
                ratio: 4.0,
                top1: 0.912,
            },
            Point {
                label: "prune-fc 0.95 + quant 4",
                ratio: 40.0,
                top1: 0.905,
            },
        ];
        let (w, h, px) = decode(&accuracy_vs_ratio_png(&points, 10_000));
        assert_eq!((w, h), (W, TOP + PH + BOTTOM + 3 * LINE + 8));
        let at = |x: usize, y: usize| px[y * w + x];
        let black_in = |x0: usize, x1: usize, y0: usize, y1: usize| {
            (y0..y1).any(|y| (x0..x1).any(|x| at(x, y) == [0, 0, 0]))
        };
        // Title, the y axis's name, the x axis's name: black text where each is drawn.
        assert!(black_in(LEFT, W, 6, 16), "no title");
        assert!(black_in(0, LEFT, TOP - 16, TOP - 6), "no y-axis name");
        assert!(
            black_in(LEFT, W, TOP + PH + 30, TOP + PH + 40),
            "no x-axis name"
        );
        let legend = TOP + PH + BOTTOM;
        for i in 0..points.len() {
            let y = legend + i * LINE;
            // The legend's swatch in the marker's colour, then its text.
            assert_eq!(at(LEFT + 4, y + 4), colour(i), "legend line {i}");
            assert!(
                black_in(LEFT + 16, W, y, y + 10),
                "legend line {i} has no text"
            );
            // The marker itself, in the same colour, somewhere in the plot area.
            assert!(
                (TOP..TOP + PH).any(|y| (LEFT..W).any(|x| at(x, y) == colour(i))),
                "marker {i}"
            );
        }
        // Below the last legend line: nothing.
        assert!(!black_in(0, W, legend + 3 * LINE, h));
    }

    /// Every character a label or the axes use has a glyph (a label is drawn in full).
    #[test]
    fn labels_characters_have_glyphs() {
        for ch in "abcdefghijklmnopqrstuvwxyz0123456789.%-+(),:/=_".chars() {
            assert_ne!(glyph(ch), [0; 5], "'{ch}'");
        }
    }
}
