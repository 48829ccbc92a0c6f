//! A small SVG line chart, so a job can draw its own learning curve without a plotting stack.

use std::fmt::Write;

/// One line of the chart.
pub struct Series<'a> {
    /// Legend label.
    pub label: &'a str,
    /// y values, one per x = 1, 2, ...
    pub values: &'a [f64],
    /// Stroke colour.
    pub color: &'a str,
    /// Dashed line.
    pub dashed: bool,
}

/// An SVG chart of `series` against round number, y in [y_min, 1].
pub fn chart(title: &str, x_label: &str, y_label: &str, y_min: f64, series: &[Series<'_>]) -> String {
    let (w, h) = (720.0, 400.0);
    let (left, right, top, bottom) = (60.0, 230.0, 40.0, 50.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let n = series.iter().map(|s| s.values.len()).max().unwrap_or(1).max(2);
    let x = |i: usize| left + pw * (i as f64) / ((n - 1) as f64);
    let y = |v: f64| top + ph * (1.0 - ((v - y_min) / (1.0 - y_min)).clamp(0.0, 1.0));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        left + pw / 2.0,
        esc(title)
    );
    // Grid and y ticks every 0.1.
    let mut t = (y_min * 10.0).ceil() / 10.0;
    while t <= 1.0 + 1e-9 {
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#ddd"/><text x="{2}" y="{3:.1}" text-anchor="end">{t:.1}</text>"##,
            y(t),
            left + pw,
            left - 6.0,
            y(t) + 4.0
        );
        t += 0.1;
    }
    for i in 0..n {
        if i == 0 || (i + 1) % 5 == 0 {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                x(i),
                top + ph + 18.0,
                i + 1
            );
        }
    }
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        h - 10.0,
        esc(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
        top + ph / 2.0,
        top + ph / 2.0,
        esc(y_label)
    );
    for (k, se) in series.iter().enumerate() {
        let points: Vec<String> = se
            .values
            .iter()
            .enumerate()
            .map(|(i, &v)| format!("{:.1},{:.1}", x(i), y(v)))
            .collect();
        let dash = if se.dashed { r#" stroke-dasharray="6 4""# } else { "" };
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
            points.join(" "),
            se.color
        );
        let ly = top + 10.0 + 20.0 * k as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{0}" y1="{ly}" x2="{1}" y2="{ly}" stroke="{2}" stroke-width="2"{dash}/><text x="{3}" y="{4}">{5}</text>"#,
            left + pw + 10.0,
            left + pw + 34.0,
            se.color,
            left + pw + 40.0,
            ly + 4.0,
            esc(se.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_series_and_escapes_text() {
        let svg = chart(
            "a < b",
            "round",
            "accuracy",
            0.0,
            &[
                Series {
                    label: "fl",
                    values: &[0.1, 0.5, 0.9],
                    color: "red",
                    dashed: false,
                },
                Series {
                    label: "local",
                    values: &[0.7, 0.7, 0.7],
                    color: "blue",
                    dashed: true,
                },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a &lt; b"));
    }
}
