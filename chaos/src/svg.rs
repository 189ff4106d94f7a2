//! The timeline picture: injected faults as bands per node, against throughput and errors.

use std::fmt::Write;

use crate::history::{Event, FaultRecord, Outcome};

const WIDTH: f64 = 1200.0;
const LEFT: f64 = 90.0;
const ROW: f64 = 22.0;
const CHART: f64 = 180.0;
const BUCKET_MS: u64 = 500;

fn color(kind: &str) -> &'static str {
    match kind {
        "kill" | "kill_leader" => "#d62728",
        "pause" => "#ff7f0e",
        "partition" | "isolate_leader" => "#9467bd",
        "one_way" => "#8c564b",
        "slow_links" => "#bcbd22",
        "flaky_link" => "#17becf",
        "clock_offset" => "#1f77b4",
        "rolling_restart" => "#e377c2",
        _ => "#7f7f7f",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub fn render(
    history: &[Event],
    faults: &[FaultRecord],
    nodes: u64,
    start_ms: u64,
    end_ms: u64,
) -> String {
    let span = (end_ms.saturating_sub(start_ms)).max(1) as f64;
    let x = |t: u64| LEFT + (t.saturating_sub(start_ms) as f64 / span) * (WIDTH - LEFT - 20.0);
    let rows_h = ROW * nodes as f64;
    let chart_top = 30.0 + rows_h + 30.0;
    let height = chart_top + CHART + 50.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="18" font-size="13">faults per node, and operations per {BUCKET_MS} ms (green: ok, red: failed or unknown)</text>"#
    );
    for n in 1..=nodes {
        let y = 30.0 + ROW * (n - 1) as f64;
        let _ = writeln!(s, r#"<text x="10" y="{}">node {n}</text>"#, y + 15.0);
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{y}" width="{}" height="{}" fill="#f4f4f4"/>"##,
            WIDTH - LEFT - 20.0,
            ROW - 4.0
        );
    }
    for f in faults {
        for n in &f.nodes {
            let y = 30.0 + ROW * (*n - 1) as f64;
            let (x0, x1) = (x(f.start_ms), x(f.end_ms.max(f.start_ms + 1)));
            let _ = writeln!(
                s,
                r#"<rect x="{x0:.1}" y="{y}" width="{:.1}" height="{}" fill="{}" opacity="0.8"><title>{} {}</title></rect>"#,
                (x1 - x0).max(1.0),
                ROW - 4.0,
                color(&f.kind),
                esc(&f.kind),
                esc(&f.detail)
            );
        }
    }
    // Throughput and errors per bucket, by completion time.
    let buckets = ((end_ms.saturating_sub(start_ms)) / BUCKET_MS + 1) as usize;
    let mut ok = vec![0u64; buckets];
    let mut bad = vec![0u64; buckets];
    for e in history {
        let b = ((e.complete_ms.saturating_sub(start_ms)) / BUCKET_MS) as usize;
        if b < buckets {
            match e.outcome {
                Outcome::Ok => ok[b] += 1,
                _ => bad[b] += 1,
            }
        }
    }
    let max = ok
        .iter()
        .chain(bad.iter())
        .copied()
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let y = |v: u64| chart_top + CHART - (v as f64 / max) * CHART;
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" y1="{}" x2="{}" y2="{}" stroke="#999"/>"##,
        chart_top + CHART,
        WIDTH - 20.0,
        chart_top + CHART
    );
    let _ = writeln!(
        s,
        r#"<text x="10" y="{}">{max:.0}/bucket</text>"#,
        chart_top + 10.0
    );
    for (series, colour) in [(&ok, "#2ca02c"), (&bad, "#d62728")] {
        let pts: Vec<String> = series
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x(start_ms + i as u64 * BUCKET_MS), y(*v)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
            pts.join(" ")
        );
    }
    let secs = (end_ms.saturating_sub(start_ms)) / 1000;
    for t in (0..=secs).step_by(5) {
        let xt = x(start_ms + t * 1000);
        let _ = writeln!(
            s,
            r#"<text x="{xt:.1}" y="{}" text-anchor="middle">{t}s</text>"#,
            chart_top + CHART + 15.0
        );
    }
    let mut lx = LEFT;
    for kind in [
        "kill",
        "pause",
        "partition",
        "one_way",
        "slow_links",
        "flaky_link",
        "clock_offset",
        "rolling_restart",
    ] {
        let ly = height - 15.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{ly}">{kind}</text>"#,
            ly - 9.0,
            color(kind),
            lx + 14.0
        );
        lx += 125.0;
    }
    s.push_str("</svg>\n");
    s
}
