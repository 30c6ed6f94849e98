//! A line chart of monthly cost against monthly volume, as a standalone SVG (no dependency:
//! a few dozen elements of text). Used by `ferrolm cost breakeven --chart FILE.svg`.

use std::fmt::Write;

/// One line: a name and its monthly cost at each x.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const W: f64 = 880.0;
const H: f64 = 520.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 230.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// 1, 2, 5 × 10^k steps giving about `n` ticks over `0..max`.
fn step(max: f64, n: f64) -> f64 {
    let raw = (max / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

fn label(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{}k", v / 1e3)
    } else {
        format!("{v}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The SVG text of `series` (x: requests a month, y: US dollars a month).
pub fn svg(title: &str, series: &[Series]) -> String {
    plot(
        title,
        ("requests a month", "US dollars a month", "$"),
        series,
    )
}

/// A line chart of `series` with axis titles `(x, y)` and a prefix for y tick labels.
pub fn plot(
    title: &str,
    (x_title, y_title, y_prefix): (&str, &str, &str),
    series: &[Series],
) -> String {
    let xmax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let ymax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let (xs, ys) = (step(xmax, 8.0), step(ymax, 6.0));
    let (xmax, ymax) = ((xmax / xs).ceil() * xs, (ymax / ys).ceil() * ys);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let px = |x: f64| LEFT + x / xmax * pw;
    let py = |y: f64| TOP + ph - y / ymax * ph;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        esc(title)
    );
    let mut x = 0.0;
    while x <= xmax + xs / 2.0 {
        let _ = writeln!(
            o,
            r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#ddd"/><text x="{0:.1}" y="{3}" text-anchor="middle">{4}</text>"##,
            px(x),
            TOP,
            TOP + ph,
            TOP + ph + 18.0,
            label(x)
        );
        x += xs;
    }
    let mut y = 0.0;
    while y <= ymax + ys / 2.0 {
        let _ = writeln!(
            o,
            r##"<line x1="{0}" y1="{1:.1}" x2="{2}" y2="{1:.1}" stroke="#ddd"/><text x="{3}" y="{4:.1}" text-anchor="end">{y_prefix}{5}</text>"##,
            LEFT,
            py(y),
            LEFT + pw,
            LEFT - 6.0,
            py(y) + 4.0,
            label(y)
        );
        y += ys;
    }
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text><text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">{}</text>"#,
        LEFT + pw / 2.0,
        H - 16.0,
        esc(x_title),
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        esc(y_title)
    );
    for (i, s) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y.min(ymax))))
            .collect();
        let _ = writeln!(
            o,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
        let ly = TOP + 10.0 + 20.0 * i as f64;
        let _ = writeln!(
            o,
            r#"<line x1="{0}" y1="{ly}" x2="{1}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{2}" y="{3}">{4}</text>"#,
            W - RIGHT + 15.0,
            W - RIGHT + 40.0,
            W - RIGHT + 46.0,
            ly + 4.0,
            esc(&s.name)
        );
    }
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_round_and_the_svg_has_one_line_per_series() {
        assert_eq!(step(95.0, 8.0), 20.0);
        assert_eq!(step(1000.0, 8.0), 200.0);
        let s = svg(
            "a <b>",
            &[
                Series {
                    name: "x".into(),
                    points: vec![(0.0, 0.0), (10.0, 5.0)],
                },
                Series {
                    name: "y&z".into(),
                    points: vec![(0.0, 3.0), (10.0, 3.0)],
                },
            ],
        );
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("a &lt;b&gt;") && s.contains("y&amp;z"));
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
    }
}
