//! The report's chart: each configuration's throughput as a ratio to `none`
//! (median bar, min–max whisker), new connections and request/response side
//! by side, with the 1.0 line. PNG through plotters' bitmap backend; text in
//! DejaVu Sans read from the system's font directory.
use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;
use serde_json::Value;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

pub fn draw(path: &Path, report: &Value) -> anyhow::Result<()> {
    let font = std::fs::read(FONT).with_context(|| {
        format!("reading {FONT} (Debian fonts-dejavu-core; `cargo xtask setup`)")
    })?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))?;

    let configs = super::CONFIGS;
    let series = [
        (
            "newConnections",
            "new connections/s",
            RGBColor(0x2b, 0x6c, 0xb0),
        ),
        (
            "requestResponse",
            "request/response/s",
            RGBColor(0xe0, 0x8e, 0x0b),
        ),
    ];
    let value = |fig: &str, cfg: &str, k: &str| {
        report["throughput"][fig][cfg]["ratioToNone"][k]
            .as_f64()
            .unwrap_or(0.0)
    };
    let top = configs
        .iter()
        .flat_map(|c| series.iter().map(move |s| value(s.0, c, "max")))
        .fold(1.1_f64, f64::max)
        * 1.1;

    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let m = &report["machine"];
    let title = format!(
        "Throughput relative to no enforcement (kernel {}, {} CPUs, {})",
        m["kernel"].as_str().unwrap_or_default(),
        m["cpus"],
        m["commit"].as_str().unwrap_or_default()
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..configs.len() as f64, 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        // Key points every 0.5: a configuration's name at its group's centre.
        .x_labels(configs.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let halves = (x * 2.0).round() as usize;
            if halves % 2 == 1 {
                configs
                    .get(halves / 2)
                    .map(|c| (*c).to_owned())
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("ratio to none (median, min–max)")
        .label_style(("sans-serif", 14))
        .draw()?;
    for (si, (fig, label, color)) in series.iter().enumerate() {
        let color = *color;
        let bars = configs.iter().enumerate().map(|(i, cfg)| {
            let x0 = i as f64 + 0.15 + si as f64 * 0.35;
            Rectangle::new(
                [(x0, 0.0), (x0 + 0.3, value(fig, cfg, "median"))],
                color.filled(),
            )
        });
        chart
            .draw_series(bars)?
            .label(*label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart.draw_series(configs.iter().enumerate().map(|(i, cfg)| {
            let x = i as f64 + 0.3 + si as f64 * 0.35;
            PathElement::new(
                vec![(x, value(fig, cfg, "min")), (x, value(fig, cfg, "max"))],
                BLACK.stroke_width(2),
            )
        }))?;
    }
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(0.0, 1.0), (configs.len() as f64, 1.0)],
        BLACK.mix(0.5).stroke_width(1),
    )))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}
