//! SVG plots of a bench run (plotters, SVG backend only): latency against offered load, resident
//! memory against idle connections, and server CPU per operation per target.
//!
//! Owns: drawing from plain data ([`Series`], [`BarPanel`]); it knows nothing about how the data
//! was measured. Text is laid out with plotters' built-in approximate font metrics (no font
//! files), which is enough for labels; viewers render the `<text>` elements with their own font.

use super::stats::fmt_num;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

/// One line on a line chart: a target's points, x ascending.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One bar: (median, min, max).
pub type Bar = (f64, f64, f64);

/// One bar chart panel: for each target, one bar per method with its min–max range.
#[derive(Debug, Clone)]
pub struct BarPanel {
    pub title: String,
    pub y_desc: String,
    /// (target name, one bar per method); a target with no data has an empty list.
    pub groups: Vec<(String, Vec<Bar>)>,
}

/// Colours by series index, readable on white and distinct in greyscale print.
const PALETTE: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plotting failed: {e}")
}

/// Upper end of an axis: a little above the largest value, never zero.
fn axis_max(values: impl Iterator<Item = f64>) -> f64 {
    let m = values.filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    if m > 0.0 {
        m * 1.12
    } else {
        1.0
    }
}

/// A line chart with one line (and point markers) per series; several panels side by side
/// share the x axis description (e.g. p50 and p99 of the same runs).
pub fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    panels: &[(&str, &[Series])],
) -> Result<()> {
    let width = (560 * panels.len().max(1) as u32).max(760);
    let root = SVGBackend::new(path, (width, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(err)?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for ((y_desc, series), area) in panels.iter().zip(areas.iter()) {
        let x_max = axis_max(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
        let y_max = axis_max(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(*y_desc)
            .x_label_formatter(&|v| fmt_num(*v))
            .y_label_formatter(&|v| fmt_num(*v))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        for (i, s) in series.iter().enumerate() {
            let c = colour(i);
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))
                .map_err(err)?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, c.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Grouped bar panels side by side; `methods` names the bars within a group (legend).
pub fn bar_chart(path: &Path, title: &str, methods: &[&str], panels: &[BarPanel]) -> Result<()> {
    let width = 420 * panels.len().max(1) as u32;
    let root = SVGBackend::new(path, (width, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(err)?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        let n = panel.groups.len().max(1);
        // Extra headroom above the tallest bar keeps the legend clear of the bars.
        let y_max = 1.3
            * axis_max(
                panel
                    .groups
                    .iter()
                    .flat_map(|(_, bars)| bars.iter().map(|b| b.2.max(b.0))),
            );
        let names: Vec<String> = panel.groups.iter().map(|(n, _)| n.clone()).collect();
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 15))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5..(n as f64 - 0.5), 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 0.01 && i >= 0.0 {
                    names.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc(panel.y_desc.as_str())
            .y_label_formatter(&|v| fmt_num(*v))
            .draw()
            .map_err(err)?;
        // A target without figures gets an explicit "n/a" rather than an empty slot.
        chart
            .draw_series(
                panel
                    .groups
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, bars))| bars.is_empty())
                    .map(|(g, _)| {
                        Text::new(
                            "n/a",
                            (g as f64 - 0.1, y_max * 0.05),
                            ("sans-serif", 14).into_font().color(&BLACK.mix(0.6)),
                        )
                    }),
            )
            .map_err(err)?;
        let per = methods.len().max(1) as f64;
        let width = 0.8 / per;
        for (m, method) in methods.iter().enumerate() {
            let c = colour(m);
            let mut rects = Vec::new();
            let mut ranges = Vec::new();
            for (g, (_, bars)) in panel.groups.iter().enumerate() {
                let Some(&(median, min, max)) = bars.get(m) else {
                    continue;
                };
                let x0 = g as f64 - 0.4 + m as f64 * width;
                let x1 = x0 + width * 0.9;
                rects.push(Rectangle::new(
                    [(x0, 0.0), (x1, median)],
                    c.mix(0.8).filled(),
                ));
                let xm = (x0 + x1) / 2.0;
                ranges.push(PathElement::new(
                    vec![(xm, min), (xm, max)],
                    BLACK.stroke_width(1),
                ));
            }
            chart
                .draw_series(rects)
                .map_err(err)?
                .label(*method)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
            chart.draw_series(ranges).map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_tests::rig::TempDir;

    #[test]
    fn charts_are_written_as_svg() {
        let dir = TempDir::new("plots");
        let series = vec![
            Series {
                name: "tern-kernel".into(),
                points: vec![(1000.0, 0.5), (2000.0, 0.9)],
            },
            Series {
                name: "hitch".into(),
                points: vec![(1000.0, 0.7), (2000.0, 1.6)],
            },
        ];
        let lat = dir.join("latency.svg");
        line_chart(
            &lat,
            "latency",
            "offered conn/s",
            &[("p50 ms", &series), ("p99 ms", &series)],
        )
        .expect("line chart");
        let text = std::fs::read_to_string(&lat).expect("svg written");
        assert!(
            text.starts_with("<svg"),
            "not an SVG: {}",
            &text[..40.min(text.len())]
        );
        assert!(
            text.contains("tern-kernel") && text.contains("hitch"),
            "legend missing"
        );

        let bars = dir.join("cpu.svg");
        let panel = BarPanel {
            title: "new connection".into(),
            y_desc: "µs".into(),
            groups: vec![
                (
                    "tern-kernel".into(),
                    vec![(100.0, 90.0, 110.0), (150.0, 140.0, 160.0)],
                ),
                ("tern-bypass".into(), vec![]),
            ],
        };
        bar_chart(&bars, "cpu", &["(a)", "(b)"], &[panel]).expect("bar chart");
        let text = std::fs::read_to_string(&bars).expect("svg written");
        assert!(text.contains("<rect"), "no bars drawn");
        assert!(text.contains("tern-bypass"), "empty group's label missing");
        assert!(text.contains("n/a"), "empty group not marked n/a");

        // Empty input still makes a valid (empty) chart rather than failing.
        let empty = dir.join("empty.svg");
        line_chart(&empty, "nothing", "x", &[("y", &[])]).expect("empty chart");
        assert!(std::fs::read_to_string(&empty)
            .expect("svg")
            .starts_with("<svg"));
    }
}
