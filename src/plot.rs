//! Line charts as PNG (training curves): panels side by side with axes, grid, tick labels and a
//! legend, drawn into an RGB buffer with a built-in 3×5 pixel font.

use anyhow::{Context, Result};
use std::path::Path;

/// One line of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub colour: [u8; 3],
    /// (x, y) points in drawing order.
    pub points: Vec<(f64, f64)>,
}

/// One chart.
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

const PANEL_W: usize = 560;
const PANEL_H: usize = 400;
/// Font pixel size in image pixels.
const SCALE: usize = 2;
const MARGIN_L: usize = 70;
const MARGIN_R: usize = 20;
const MARGIN_T: usize = 36;
const MARGIN_B: usize = 40;

/// 3×5 glyphs, rows top to bottom, bit 2 = left column.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 3, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
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
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '_' => [0, 0, 0, 0, 7],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        _ => [0; 5],
    }
}

/// An RGB canvas.
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        for y in y0..y1 {
            for x in x0..x1 {
                self.set(x, y, c);
            }
        }
    }

    /// A line of width 2 (Bresenham with a square pen).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.rect(x, y, x + 2, y + 2, c);
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

    /// Text with its top-left corner at (x, y).
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        let s_ = SCALE as i64;
        for (k, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            let gx = x + k as i64 * 4 * s_;
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        let (px, py) = (gx + col * s_, y + row as i64 * s_);
                        self.rect(px, py, px + s_, py + s_, c);
                    }
                }
            }
        }
    }
}

fn text_width(s: &str) -> i64 {
    (s.chars().count() * 4 * SCALE) as i64
}

/// Round tick spacing covering `span` with about five steps.
fn tick_step(span: f64) -> f64 {
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let n = raw / mag;
    mag * if n < 1.5 {
        1.0
    } else if n < 3.5 {
        2.0
    } else if n < 7.5 {
        5.0
    } else {
        10.0
    }
}

fn tick_label(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    // A tick at zero reached by accumulating steps may be −tiny; print it as 0.
    let v = if v.abs() < step * 1e-6 { 0.0 } else { v };
    format!("{v:.decimals$}")
}

fn draw_panel(cv: &mut Canvas, ox: usize, panel: &Panel) {
    let (black, grey, light) = ([0, 0, 0], [110, 110, 110], [225, 225, 225]);
    let (x0, y0) = ((ox + MARGIN_L) as i64, MARGIN_T as i64);
    let (x1, y1) = (
        (ox + PANEL_W - MARGIN_R) as i64,
        (PANEL_H - MARGIN_B) as i64,
    );
    cv.text(x0, 10, &panel.title, black);
    let pts = panel.series.iter().flat_map(|s| s.points.iter());
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        xmin = xmin.min(x);
        xmax = xmax.max(x);
        ymin = ymin.min(y);
        ymax = ymax.max(y);
    }
    if xmin > xmax {
        (xmin, xmax, ymin, ymax) = (0.0, 1.0, 0.0, 1.0);
    }
    if xmax - xmin < 1e-12 {
        xmax = xmin + 1.0;
    }
    if ymax - ymin < 1e-12 {
        ymax = ymin + 1.0;
    }
    let pad = (ymax - ymin) * 0.05;
    let (ymin, ymax) = (ymin - pad, ymax + pad);
    let sx = |x: f64| x0 + ((x - xmin) / (xmax - xmin) * (x1 - x0) as f64).round() as i64;
    let sy = |y: f64| y1 - ((y - ymin) / (ymax - ymin) * (y1 - y0) as f64).round() as i64;
    let ystep = tick_step(ymax - ymin);
    let mut t = (ymin / ystep).ceil() * ystep;
    while t <= ymax {
        let y = sy(t);
        cv.rect(x0, y, x1, y + 1, light);
        let label = tick_label(t, ystep);
        cv.text(x0 - 6 - text_width(&label), y - 5, &label, grey);
        t += ystep;
    }
    let xstep = tick_step(xmax - xmin).max(1.0);
    let mut t = (xmin / xstep).ceil() * xstep;
    while t <= xmax {
        let x = sx(t);
        cv.rect(x, y0, x + 1, y1, light);
        let label = tick_label(t, xstep);
        cv.text(x - text_width(&label) / 2, y1 + 8, &label, grey);
        t += xstep;
    }
    cv.text(x1 - text_width("EPOCH"), y1 + 24, "EPOCH", grey);
    cv.rect(x0, y0, x1, y0 + 1, black);
    cv.rect(x0, y1, x1, y1 + 1, black);
    cv.rect(x0, y0, x0 + 1, y1, black);
    cv.rect(x1, y0, x1 + 1, y1 + 1, black);
    for s in &panel.series {
        let mut prev: Option<(i64, i64)> = None;
        for &(x, y) in &s.points {
            let p = (sx(x), sy(y));
            match prev {
                Some(q) => cv.line(q, p, s.colour),
                None => cv.rect(p.0 - 1, p.1 - 1, p.0 + 3, p.1 + 3, s.colour),
            }
            prev = Some(p);
        }
    }
    let mut ly = y0 + 8;
    for s in &panel.series {
        let lx = x1 - 8 - text_width(&s.name) - 26;
        cv.rect(lx, ly + 3, lx + 18, ly + 6, s.colour);
        cv.text(lx + 24, ly, &s.name, black);
        ly += 16;
    }
}

/// Writes the panels side by side as an RGB PNG (atomically).
pub fn write_line_charts(path: &Path, panels: &[Panel]) -> Result<()> {
    let mut cv = Canvas {
        w: PANEL_W * panels.len().max(1),
        h: PANEL_H,
        px: vec![255; PANEL_W * panels.len().max(1) * PANEL_H * 3],
    };
    for (i, p) in panels.iter().enumerate() {
        draw_panel(&mut cv, i * PANEL_W, p);
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, cv.w as u32, cv.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().context("PNG header")?;
        writer.write_image_data(&cv.px).context("PNG data")?;
    }
    crate::io::atomic::write_atomic(path, &bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}
