//! The trade-off as an SVG: every layout that fits as a point of throughput per node against per-user speed, the
//! Pareto set joined by a line, co-located layouts apart from disaggregated ones, the answer ringed.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{PlanError, Result};
use crate::plan::Plan;

pub fn write_svg(plan: &Plan, title: &str, path: &Path) -> Result<()> {
    let err = |e: String| PlanError::Io { path: path.to_owned(), message: e };
    let fits: Vec<_> = plan.candidates.iter().filter(|c| c.router_memory.fits && !c.outcome.saturated).collect();
    let max_x = fits.iter().map(|c| c.output_tokens_per_s_per_node).fold(1.0, f64::max) * 1.1;
    let max_y = fits.iter().map(|c| c.user_tokens_per_s).fold(1.0, f64::max) * 1.1;
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..max_x, 0.0..max_y)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("output tokens/s per node")
        .y_desc("tokens/s per user (1 / median TPOT)")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let point = |c: &&crate::plan::Candidate| (c.output_tokens_per_s_per_node, c.user_tokens_per_s);
    chart
        .draw_series(fits.iter().filter(|c| !c.colocated).map(|c| Circle::new(point(c), 4, BLUE.filled())))
        .map_err(|e| err(e.to_string()))?
        .label("expert nodes")
        .legend(|(x, y)| Circle::new((x, y), 4, BLUE.filled()));
    chart
        .draw_series(fits.iter().filter(|c| c.colocated).map(|c| TriangleMarker::new(point(c), 6, RED.filled())))
        .map_err(|e| err(e.to_string()))?
        .label("co-located")
        .legend(|(x, y)| TriangleMarker::new((x, y), 6, RED.filled()));
    let mut front: Vec<(f64, f64)> = fits.iter().filter(|c| c.pareto).map(point).collect();
    front.sort_by(|a, b| a.0.total_cmp(&b.0));
    chart
        .draw_series(LineSeries::new(front, BLACK.stroke_width(1)))
        .map_err(|e| err(e.to_string()))?
        .label("Pareto set")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
    if let Some(best) = plan.best.and_then(|i| plan.candidates.get(i)) {
        chart
            .draw_series(std::iter::once(Circle::new(point(&best), 9, GREEN.stroke_width(2))))
            .map_err(|e| err(e.to_string()))?
            .label("cheapest meeting the SLO")
            .legend(|(x, y)| Circle::new((x, y), 6, GREEN.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
