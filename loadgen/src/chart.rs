//! The throughput and p99 latency over time, as a self-contained SVG file a browser opens.
//!
//! Owns: the chart layout. Written by hand (two panels of polylines, axes, labels) because that
//! is all it needs and it keeps plotting libraries out of the benchmark's build.

use std::fmt::Write;

use crate::report::Point;

const WIDTH: f64 = 960.0;
const PANEL_HEIGHT: f64 = 260.0;
const MARGIN_LEFT: f64 = 90.0;
const MARGIN_RIGHT: f64 = 150.0;
const MARGIN_TOP: f64 = 40.0;
const GAP: f64 = 60.0;

struct Series<'a> {
    label: &'a str,
    color: &'a str,
    values: Vec<f64>,
}

/// Renders the chart; `title` goes on top, `warmup_s` is marked with a dashed line.
pub fn render(title: &str, points: &[Point], warmup_s: f64) -> String {
    let height = MARGIN_TOP + 2.0 * PANEL_HEIGHT + GAP + 50.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(svg, r#"<text x="{MARGIN_LEFT}" y="22" font-size="15">{}</text>"#, escape(title));
    let t: Vec<f64> = points.iter().map(|p| p.t_s).collect();
    let t_max = t.iter().copied().fold(1.0, f64::max);
    let throughput = [
        Series {
            label: "produce msgs/s",
            color: "#1f77b4",
            values: points.iter().map(|p| p.produce_msgs_per_s).collect(),
        },
        Series {
            label: "consume msgs/s",
            color: "#2ca02c",
            values: points.iter().map(|p| p.consume_msgs_per_s).collect(),
        },
    ];
    let latency = [
        Series {
            label: "publish p99 µs",
            color: "#ff7f0e",
            values: points.iter().map(|p| p.publish_p99_us as f64).collect(),
        },
        Series {
            label: "e2e p99 µs",
            color: "#d62728",
            values: points.iter().map(|p| p.e2e_p99_us as f64).collect(),
        },
    ];
    panel(&mut svg, MARGIN_TOP, "throughput (msgs/s)", &t, t_max, &throughput, warmup_s);
    panel(&mut svg, MARGIN_TOP + PANEL_HEIGHT + GAP, "p99 latency (µs)", &t, t_max, &latency, warmup_s);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">seconds since start</text>"#,
        MARGIN_LEFT + (WIDTH - MARGIN_LEFT - MARGIN_RIGHT) / 2.0,
        height - 12.0
    );
    svg.push_str("</svg>\n");
    svg
}

fn panel(
    svg: &mut String,
    top: f64,
    title: &str,
    t: &[f64],
    t_max: f64,
    series: &[Series<'_>],
    warmup_s: f64,
) {
    let plot_width = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let y_max = nice_ceiling(series.iter().flat_map(|s| s.values.iter().copied()).fold(0.0, f64::max));
    let x = |v: f64| MARGIN_LEFT + v / t_max * plot_width;
    let y = |v: f64| top + PANEL_HEIGHT - v / y_max * PANEL_HEIGHT;
    let _ = writeln!(svg, r#"<text x="{MARGIN_LEFT}" y="{}">{}</text>"#, top - 8.0, escape(title));
    let _ = writeln!(
        svg,
        "<rect x=\"{MARGIN_LEFT}\" y=\"{top}\" width=\"{plot_width}\" height=\"{PANEL_HEIGHT}\" fill=\"none\" stroke=\"#888\"/>"
    );
    for i in 0..=4 {
        let v = y_max * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            "<line x1=\"{MARGIN_LEFT}\" x2=\"{}\" y1=\"{yy}\" y2=\"{yy}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            MARGIN_LEFT + plot_width,
            MARGIN_LEFT - 6.0,
            y(v) + 4.0,
            human(v),
            yy = y(v)
        );
    }
    let step = (t_max / 10.0).ceil().max(1.0);
    let mut tick = 0.0;
    while tick <= t_max {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{tick}</text>"#,
            x(tick),
            top + PANEL_HEIGHT + 16.0
        );
        tick += step;
    }
    if warmup_s > 0.0 && warmup_s < t_max {
        let _ = writeln!(
            svg,
            "<line x1=\"{xx}\" x2=\"{xx}\" y1=\"{top}\" y2=\"{}\" stroke=\"#999\" stroke-dasharray=\"4 4\"/><text x=\"{}\" y=\"{}\" fill=\"#999\">warm-up</text>",
            top + PANEL_HEIGHT,
            x(warmup_s) - 52.0,
            top + 14.0,
            xx = x(warmup_s)
        );
    }
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<String> =
            t.iter().zip(&s.values).map(|(tv, v)| format!("{:.1},{:.1}", x(*tv), y(*v))).collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            s.color,
            pts.join(" ")
        );
        let ly = top + 16.0 + 18.0 * i as f64;
        let lx = WIDTH - MARGIN_RIGHT + 12.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            lx + 18.0,
            s.color,
            lx + 24.0,
            ly + 4.0,
            escape(s.label)
        );
    }
}

/// A round axis maximum at or above `v` (1, 2 or 5 × a power of ten).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|c| *c >= v).unwrap_or(10.0 * magnitude)
}

fn human(v: f64) -> String {
    match v {
        v if v >= 1e9 => format!("{:.1}G", v / 1e9),
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_closed_svg_with_both_panels() {
        let points: Vec<Point> = (1..=5)
            .map(|i| Point {
                t_s: f64::from(i),
                produce_msgs_per_s: 1000.0 * f64::from(i),
                consume_msgs_per_s: 900.0,
                publish_p99_us: 200,
                e2e_p99_us: 400,
                backlog_msgs: 0,
            })
            .collect();
        let svg = render("run <1>", &points, 2.0);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert!(svg.contains("run &lt;1&gt;"));
        assert!(svg.contains("warm-up"));
    }

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(101.0), 200.0);
        assert_eq!(nice_ceiling(1000.0), 1000.0);
        assert_eq!(human(2_500_000.0), "2.5M");
    }
}
