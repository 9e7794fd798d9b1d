//! SVG line plots for the examples (plotters), shared with `#[path]` includes.

use anyhow::Result;
use std::path::Path;

/// One SVG chart of line series (with a dot at each point when `dots`).
pub fn plot(
    path: &Path,
    title: &str,
    axes: (&str, &str),
    series: &[(String, Vec<(f64, f64)>)],
    dots: bool,
) -> Result<()> {
    use plotters::prelude::*;
    let colors = [
        RED,
        BLUE,
        GREEN,
        MAGENTA,
        CYAN,
        BLACK,
        RGBColor(255, 140, 0),
        RGBColor(128, 128, 128),
    ];
    let pts = || series.iter().flat_map(|s| s.1.iter());
    let xmax = pts().map(|p| p.0).fold(1e-9, f64::max) * 1.05;
    let ymax = pts().map(|p| p.1).fold(1e-9, f64::max) * 1.1;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut ch = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    ch.configure_mesh().x_desc(axes.0).y_desc(axes.1).draw()?;
    for (i, (label, pts)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        ch.draw_series(LineSeries::new(pts.clone(), color))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        if dots {
            ch.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    let mut labels = ch.configure_series_labels();
    labels
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    eprintln!("plot: {}", path.display());
    Ok(())
}
