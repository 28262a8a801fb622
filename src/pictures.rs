//! Pictures: attention maps (`kiln attention`) and benchmark charts (`kiln bench --plot`), drawn
//! with plotters and a bundled font (DejaVu Sans, `assets/fonts/`), so they render the same on a
//! machine without fonts.

use crate::bench::BenchReport;
use crate::engine::batch::LayerAttention;
use crate::{KilnError, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;
use std::path::Path;
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is compiled in; registering it cannot fail for a valid TTF.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn draw_error<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> KilnError + '_ {
    move |e| KilnError::Request(format!("drawing {}: {e:?}", path.display()))
}

/// A token as an axis label: whitespace made visible, long ones shortened.
pub fn token_label(text: &str) -> String {
    let t: String = text
        .chars()
        .map(|c| match c {
            '\n' => '⏎',
            ' ' => '·',
            '\t' => '→',
            c if c.is_control() => '?',
            c => c,
        })
        .collect();
    if t.chars().count() > 10 {
        t.chars().take(9).chain(['…']).collect()
    } else {
        t
    }
}

/// One PNG for one layer: a grid of heatmaps, one per query head (labelled with its KV head),
/// query tokens down, key tokens across, and a colour scale from 0 to the largest probability.
pub fn attention_png(
    path: &Path,
    map: &LayerAttention,
    heads: &[usize],
    group: usize,
    labels: &[String],
) -> Result<()> {
    register_font();
    let (t, k) = (map.tokens, map.keys);
    let cols = (heads.len() as f64).sqrt().ceil().max(1.0) as usize;
    let rows = heads.len().div_ceil(cols);
    let cell = (220 + 10 * t.min(48) as u32).min(720);
    let (w, h) = (cols as u32 * cell + 90, rows as u32 * cell + 50);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    let err = draw_error(path);
    root.fill(&WHITE).map_err(&err)?;
    let (title, body) = root.split_vertically(40);
    title
        .titled(
            &format!("layer {}: attention probabilities (rows: queries, columns: keys)", map.layer),
            ("sans-serif", 20),
        )
        .map_err(&err)?;
    let (grid, scale) = body.split_horizontally(cols as u32 * cell);
    let max = heads
        .iter()
        .flat_map(|&head| map.probs[head * t * k..(head + 1) * t * k].iter().copied())
        .fold(0f32, f32::max)
        .max(1e-6);
    let every = t.div_ceil(24).max(1);
    for (area, &head) in grid.split_evenly((rows, cols)).iter().zip(heads) {
        heatmap(area, map, head, group, labels, max, every).map_err(&err)?;
    }
    colour_scale(&scale, max).map_err(&err)?;
    root.present().map_err(&err)?;
    Ok(())
}

fn heatmap<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    map: &LayerAttention,
    head: usize,
    group: usize,
    labels: &[String],
    max: f32,
    every: usize,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (t, k) = (map.tokens, map.keys);
    let first_key = k - t; // keys before the first query: earlier turns
    let mut chart = ChartBuilder::on(area)
        .caption(format!("head {head} (kv {})", head / group), ("sans-serif", 14))
        .margin(4)
        .x_label_area_size(64)
        .y_label_area_size(72)
        .build_cartesian_2d((0..k - 1).into_segmented(), (0..t - 1).into_segmented())?; // segments 0 ..= end
    let label = |i: usize| labels.get(i).cloned().unwrap_or_default();
    // Query i is drawn in row t - 1 - i, so the first token is at the top; labels sit at the
    // centre of their cell.
    let centre = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(c) => Some(*c),
        _ => None,
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(k.min(48))
        .y_labels(t.min(48))
        .x_label_formatter(&|v| centre(v).filter(|j| j % every == 0).map_or(String::new(), label))
        .y_label_formatter(&|v| {
            centre(v)
                .map(|y| t - 1 - y.min(t - 1))
                .filter(|i| i % every == 0)
                .map_or(String::new(), |i| label(first_key + i))
        })
        .x_label_style(("sans-serif", 10).into_font().transform(FontTransform::Rotate90))
        .y_label_style(("sans-serif", 10))
        .draw()?;
    let probs = &map.probs[head * t * k..(head + 1) * t * k];
    chart.draw_series((0..t).flat_map(|i| {
        (0..k).map(move |j| {
            let v = probs[i * k + j] / max;
            let (x0, y0) = (SegmentValue::Exact(j), SegmentValue::Exact(t - 1 - i));
            Rectangle::new(
                [(x0, y0), (SegmentValue::Exact(j + 1), SegmentValue::Exact(t - i))],
                ViridisRGB::get_color(v).filled(),
            )
        })
    }))?;
    Ok(())
}

fn colour_scale<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    max: f32,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let mut chart = ChartBuilder::on(area)
        .margin_top(30)
        .margin_bottom(60)
        .margin_right(8)
        .y_label_area_size(46)
        .build_cartesian_2d(0f32..1f32, 0f32..max)?;
    chart.configure_mesh().disable_mesh().disable_x_axis().y_labels(6).y_label_style(("sans-serif", 11)).draw()?;
    let steps = 100;
    chart.draw_series((0..steps).map(|s| {
        let (a, b) = (s as f32 / steps as f32 * max, (s + 1) as f32 / steps as f32 * max);
        Rectangle::new([(0.0, a), (1.0, b)], ViridisRGB::get_color(a / max).filled())
    }))?;
    Ok(())
}

/// Charts of a `kiln bench` report, SVG or PNG by the file's extension: decode tok/s against KV
/// fill with the copy-bandwidth ceiling, and (with `--concurrency`) aggregate decode tok/s and
/// latency against the number of streams.
pub fn bench_chart(path: &Path, report: &BenchReport) -> Result<()> {
    register_font();
    let panels = if report.concurrency.is_empty() { 1 } else { 3 };
    let size = (560 * panels as u32, 420);
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("svg") => bench_panels(SVGBackend::new(path, size).into_drawing_area(), report, panels, path),
        Some("png") => bench_panels(BitMapBackend::new(path, size).into_drawing_area(), report, panels, path),
        _ => Err(KilnError::Request(format!("{}: the plot must be a .svg or .png file", path.display()))),
    }
}

fn bench_panels<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    r: &BenchReport,
    panels: usize,
    path: &Path,
) -> Result<()> {
    let err = draw_error(path);
    root.fill(&WHITE).map_err(&err)?;
    let areas = root.split_evenly((1, panels));
    // Decode against KV fill, and what the copy bandwidth would allow for the bytes each token reads.
    let fills: Vec<(f64, f64, f64)> = r
        .decode
        .iter()
        .map(|d| (d.fill as f64, d.tokens_per_second, r.copy_gb_s * 1e9 / d.bytes_per_token as f64))
        .collect();
    let x_max = fills.iter().map(|f| f.0).fold(1.0, f64::max) * 1.05;
    let y_max = fills.iter().map(|f| f.1.max(f.2)).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&areas[0])
        .caption("decode speed against KV-cache fill", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(&err)?;
    chart
        .configure_mesh()
        .x_desc("tokens in the KV cache")
        .y_desc("tokens per second")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(&err)?;
    chart
        .draw_series(LineSeries::new(fills.iter().map(|f| (f.0, f.2)), RED.stroke_width(2)))
        .map_err(&err)?
        .label(format!("copy-bandwidth ceiling ({:.1} GB/s)", r.copy_gb_s))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(fills.iter().map(|f| (f.0, f.1)), BLUE.stroke_width(2)).point_size(4))
        .map_err(&err)?
        .label("kiln decode")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE.stroke_width(2)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(&err)?;
    if panels == 3 {
        concurrency_panels(&areas[1], &areas[2], r).map_err(&err)?;
    }
    root.present().map_err(&err)?;
    Ok(())
}

fn concurrency_panels<DB: DrawingBackend>(
    left: &DrawingArea<DB, Shift>,
    right: &DrawingArea<DB, Shift>,
    r: &BenchReport,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let runs = &r.concurrency;
    let x_max = runs.iter().map(|c| c.streams).max().unwrap_or(1) as f64 * 1.1;
    let y_max = runs.iter().map(|c| c.decode_tok_s).fold(r.prefill_tok_s, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(left)
        .caption("aggregate decode against concurrent streams", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("concurrent greedy streams")
        .y_desc("tokens per second, all streams")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 12))
        .draw()?;
    chart
        .draw_series(LineSeries::new([(0.0, r.prefill_tok_s), (x_max, r.prefill_tok_s)], RED.stroke_width(2)))?
        .label(format!("prefill speed ({:.1} tok/s)", r.prefill_tok_s))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED.stroke_width(2)));
    chart
        .draw_series(
            LineSeries::new(runs.iter().map(|c| (c.streams as f64, c.decode_tok_s)), BLUE.stroke_width(2))
                .point_size(4),
        )?
        .label("kiln engine")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()?;

    let l_max = runs.iter().map(|c| c.ttft_p99_s.max(c.itl_p99_s)).fold(0.01, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(right)
        .caption("latency against concurrent streams", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..x_max, 0f64..l_max)?;
    chart
        .configure_mesh()
        .x_desc("concurrent greedy streams")
        .y_desc("seconds")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(("sans-serif", 12))
        .draw()?;
    type Series = (&'static str, fn(&crate::bench::ConcurrencyRun) -> f64, RGBColor);
    let series: [Series; 4] = [
        ("time to first token p50", |c| c.ttft_p50_s, GREEN),
        ("time to first token p99", |c| c.ttft_p99_s, RGBColor(0, 100, 0)),
        ("inter-token latency p50", |c| c.itl_p50_s, MAGENTA),
        ("inter-token latency p99", |c| c.itl_p99_s, RGBColor(120, 0, 120)),
    ];
    for (name, value, colour) in series {
        chart
            .draw_series(
                LineSeries::new(runs.iter().map(|c| (c.streams as f64, value(c))), colour.stroke_width(2))
                    .point_size(3),
            )?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()?;
    Ok(())
}
