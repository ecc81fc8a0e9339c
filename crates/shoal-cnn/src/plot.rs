//! A small PNG chart of a compression report: top-1 accuracy against compression ratio
//! (log scale), one marker per configuration, with tick labels in a built-in 3x5 font.
//! The PNG is written by hand (IHDR, zlib IDAT, IEND): no plotting dependency.

use std::io::Write;

const W: usize = 640;
const H: usize = 420;
const LEFT: usize = 60;
const RIGHT: usize = 20;
const TOP: usize = 20;
const BOTTOM: usize = 50;

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
        _ => [0; 5],
    }
}

struct Canvas {
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn set(&mut self, x: usize, y: usize, c: [u8; 3]) {
        if x < W && y < H {
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

/// The chart of `points` (compression ratio, top-1 in [0, 1]); the first point is the
/// dense model (drawn black).
pub fn accuracy_vs_ratio_png(points: &[(f64, f64)]) -> Vec<u8> {
    let mut c = Canvas {
        px: vec![[255, 255, 255]; W * H],
    };
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let max_ratio = points.iter().map(|p| p.0).fold(2.0f64, f64::max);
    let xmax = max_ratio.log2().ceil().max(1.0);
    let lo = points.iter().map(|p| p.1).fold(1.0f64, f64::min);
    let hi = points.iter().map(|p| p.1).fold(0.0f64, f64::max);
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
    for (i, &(r, a)) in points.iter().enumerate() {
        let col = if i == 0 {
            [0, 0, 0]
        } else {
            COLOURS[(i - 1) % COLOURS.len()]
        };
        let (x, y) = (xpos(r), ypos(a));
        c.rect(x.saturating_sub(4), y.saturating_sub(4), x + 4, y + 4, col);
    }
    png(&c.px)
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

/// An 8-bit RGB PNG of `W x H` pixels.
fn png(px: &[[u8; 3]]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(H * (1 + 3 * W));
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
    ihdr.extend((H as u32).to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid PNG: signature, chunk CRCs, and the pixels back through zlib.
    #[test]
    fn writes_a_png_with_the_markers() {
        let b = accuracy_vs_ratio_png(&[(1.0, 0.913), (4.0, 0.912), (40.0, 0.905)]);
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
        let mut at = 8;
        let mut idat = Vec::new();
        while at < b.len() {
            let n = u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize;
            let kind = &b[at + 4..at + 8];
            let data = &b[at + 8..at + 8 + n];
            let crc = u32::from_be_bytes(b[at + 8 + n..at + 12 + n].try_into().unwrap());
            let mut h = crc32fast::Hasher::new();
            h.update(kind);
            h.update(data);
            assert_eq!(h.finalize(), crc);
            if kind == b"IDAT" {
                idat.extend_from_slice(data);
            }
            at += 12 + n;
        }
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::ZlibDecoder::new(&idat[..]), &mut raw)
            .unwrap();
        assert_eq!(raw.len(), H * (1 + 3 * W));
        // Some pixels carry the markers' colours (each row after its filter byte).
        let pixels: Vec<&[u8]> = raw
            .chunks(1 + 3 * W)
            .flat_map(|r| r[1..].chunks(3))
            .collect();
        assert!(pixels.contains(&&COLOURS[0][..]));
        assert!(pixels.contains(&&COLOURS[1][..]));
    }
}
