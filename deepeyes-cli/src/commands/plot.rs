//! `deepeyes plot RUN_DIR`: draw a run's training curves from `metrics.jsonl` to PNG and SVG.
//!
//! Each metric group gets a panel (reward, reward terms, accuracy, tool calls per trajectory,
//! valid-crop rate, grounding IoU, response length, …); panels without data are left out. PNG
//! text uses a built-in pixel font and SVG text is left to the viewer, so no system fonts are
//! needed.

mod backend;
mod font;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

use self::backend::PixelFontBackend;

/// Which files to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum PlotFormat {
    /// A PNG image.
    Png,
    /// An SVG drawing.
    Svg,
    /// Both.
    Both,
}

/// Arguments of `deepeyes plot`.
#[derive(Debug, Args)]
pub(crate) struct PlotArgs {
    /// The run folder (the trainer's `output-dir`), holding `metrics.jsonl`.
    run_dir: PathBuf,
    /// The metrics file, when it is not `RUN_DIR/metrics.jsonl`.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Where to write `curves.png` / `curves.svg` (default: `RUN_DIR/plots`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Which files to write.
    #[arg(long, value_enum, default_value_t = PlotFormat::Both)]
    format: PlotFormat,
}

/// A panel: a title and the metric keys it draws (dotted keys reach into objects). A key ending
/// in `.*` draws every entry of that object.
struct PanelSpec {
    title: &'static str,
    series: &'static [(&'static str, &'static str)],
}

const PANELS: &[PanelSpec] = &[
    PanelSpec {
        title: "reward",
        series: &[
            ("reward_mean", "mean"),
            ("reward_max", "max"),
            ("reward_min", "min"),
        ],
    },
    PanelSpec {
        title: "reward terms (mean raw value)",
        series: &[("reward_terms.*", "")],
    },
    PanelSpec {
        title: "accuracy",
        series: &[("accuracy", "accuracy")],
    },
    PanelSpec {
        title: "tool calls per trajectory",
        series: &[
            ("tool_calls_mean", "mean"),
            ("looks_mean", "looks (crops returned)"),
            ("tool_calls_max", "max"),
        ],
    },
    PanelSpec {
        title: "valid crop rate",
        series: &[("valid_crop_rate", "valid crops")],
    },
    PanelSpec {
        title: "grounding IoU",
        series: &[("grounding_iou", "IoU")],
    },
    PanelSpec {
        title: "response length (tokens)",
        series: &[
            ("response_length_mean", "generated"),
            ("response_tokens_mean", "after prompt"),
        ],
    },
    PanelSpec {
        title: "format error rate",
        series: &[("format_error_rate", "format errors")],
    },
    PanelSpec {
        title: "zero-variance groups",
        series: &[("zero_variance_group_share", "share")],
    },
    PanelSpec {
        title: "episode ends",
        series: &[
            ("answered_rate", "answered"),
            ("max_turns_rate", "turn cap"),
            ("truncated_rate", "truncated"),
        ],
    },
    PanelSpec {
        title: "entropy",
        series: &[("entropy", "entropy")],
    },
    PanelSpec {
        title: "clip fraction",
        series: &[
            ("clip_fraction", "ratio clip"),
            ("dual_clip_fraction", "dual clip"),
        ],
    },
    PanelSpec {
        title: "KL",
        series: &[("approx_kl", "old vs new"), ("kl", "to reference")],
    },
    PanelSpec {
        title: "gradient norm",
        series: &[("grad_norm", "grad norm")],
    },
    PanelSpec {
        title: "learning rate",
        series: &[("lr", "lr")],
    },
    PanelSpec {
        title: "time per step (s)",
        series: &[
            ("time_weight_sync_s", "weight sync"),
            ("time_rollout_s", "rollout"),
            ("time_reward_s", "reward"),
            ("time_logprob_s", "log-prob"),
            ("time_update_s", "update"),
            ("time_step_s", "total"),
        ],
    },
];

const COLUMNS: usize = 3;
const PANEL_W: u32 = 600;
const PANEL_H: u32 = 360;
const TITLE_H: u32 = 56;
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One drawn line.
#[derive(Debug, Clone, PartialEq)]
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
}

/// A panel ready to draw.
#[derive(Debug, Clone, PartialEq)]
struct Panel {
    title: String,
    series: Vec<Series>,
}

/// Reads the metric records: one JSON object per line. A torn last line (a run killed while
/// writing) is skipped; any other bad line is an error naming it.
fn read_records(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading metrics from {}", path.display()))?;
    let lines: Vec<&str> = text.split('\n').collect();
    let mut records = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let last = i + 1 == lines.len();
        match serde_json::from_str::<Value>(line) {
            Ok(v) if v.is_object() => records.push(v),
            Ok(_) => bail!("{}: line {} is not a JSON object", path.display(), i + 1),
            Err(_) if last => {
                tracing::warn!(path = %path.display(), line = i + 1, "skipping a torn last line");
            }
            Err(e) => bail!("{}: line {}: {e}", path.display(), i + 1),
        }
    }
    if records.is_empty() {
        bail!("{} holds no metric records", path.display());
    }
    Ok(records)
}

fn lookup<'a>(record: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(record, |v, k| v.get(k))
}

fn points(records: &[Value], key: &str) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter_map(|r| {
            let x = r.get("step")?.as_f64()?;
            let y = lookup(r, key)?.as_f64()?;
            (x.is_finite() && y.is_finite()).then_some((x, y))
        })
        .collect()
}

/// The panels that have data, in the order of [`PANELS`].
fn panels(records: &[Value]) -> Vec<Panel> {
    let mut out = Vec::new();
    for spec in PANELS {
        let mut series = Vec::new();
        for &(key, label) in spec.series {
            if let Some(object_key) = key.strip_suffix(".*") {
                let mut names: Vec<String> = records
                    .iter()
                    .filter_map(|r| lookup(r, object_key)?.as_object())
                    .flat_map(|o| o.keys().cloned())
                    .collect();
                names.sort();
                names.dedup();
                for name in names {
                    let pts = points(records, &format!("{object_key}.{name}"));
                    if !pts.is_empty() {
                        series.push(Series {
                            label: name,
                            points: pts,
                        });
                    }
                }
            } else {
                let pts = points(records, key);
                if !pts.is_empty() {
                    series.push(Series {
                        label: label.to_string(),
                        points: pts,
                    });
                }
            }
        }
        if !series.is_empty() {
            out.push(Panel {
                title: spec.title.to_string(),
                series,
            });
        }
    }
    out
}

/// Tick labels: plain decimals in a readable range, scientific otherwise.
fn format_tick(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn padded(lo: f64, hi: f64) -> (f64, f64) {
    if hi > lo {
        let pad = (hi - lo) * 0.06;
        (lo - pad, hi + pad)
    } else {
        let pad = (lo.abs() * 0.1).max(1e-9);
        (lo - pad, hi + pad)
    }
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let all = panel.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let (x0, x1) = if x1 > x0 {
        (x0, x1)
    } else {
        (x0 - 1.0, x1 + 1.0)
    };
    let (y0, y1) = padded(y0, y1);
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(50)
        .y_label_area_size(72)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_labels(6)
        .y_labels(6)
        .x_label_formatter(&|v| format_tick(*v))
        .y_label_formatter(&|v| format_tick(*v))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 14))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for (i, s) in panel.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let line = chart.draw_series(LineSeries::new(
            s.points.iter().copied(),
            color.stroke_width(2),
        ))?;
        if panel.series.len() > 1 {
            line.label(s.label.as_str()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        }
        if s.points.len() <= 50 {
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    if panel.series.len() > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .draw()?;
    }
    Ok(())
}

fn draw_all<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    panels: &[Panel],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let body = root.titled(title, ("sans-serif", 28))?;
    let rows = panels.len().div_ceil(COLUMNS);
    let cells = body.split_evenly((rows, COLUMNS));
    for (panel, cell) in panels.iter().zip(&cells) {
        draw_panel(cell, panel)?;
    }
    root.present()?;
    Ok(())
}

fn canvas_size(panels: usize) -> (u32, u32) {
    let rows = panels.div_ceil(COLUMNS) as u32;
    (PANEL_W * COLUMNS as u32, TITLE_H + rows * PANEL_H)
}

/// Draws into an RGB buffer and writes it as PNG.
fn write_png(path: &Path, title: &str, panels: &[Panel]) -> anyhow::Result<()> {
    let (w, h) = canvas_size(panels.len());
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let backend = PixelFontBackend::new(BitMapBackend::with_buffer(&mut buf, (w, h)));
        draw_all(backend.into_drawing_area(), title, panels)?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).context("plot buffer has the wrong size")?;
    img.save_with_format(path, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", path.display()))
}

fn write_svg(path: &Path, title: &str, panels: &[Panel]) -> anyhow::Result<()> {
    let size = canvas_size(panels.len());
    let mut svg = String::new();
    draw_all(
        SVGBackend::with_string(&mut svg, size).into_drawing_area(),
        title,
        panels,
    )?;
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

/// Draws the curves of the metrics JSONL at `metrics` into the PNG `path`.
pub(crate) fn write_curves_png(metrics: &Path, path: &Path, title: &str) -> anyhow::Result<()> {
    let records = read_records(metrics)?;
    let panels = panels(&records);
    if panels.is_empty() {
        bail!("{}: no plottable metrics", metrics.display());
    }
    write_png(path, title, &panels)
}

/// Draws the curves of a run.
pub(crate) fn run(args: PlotArgs) -> anyhow::Result<ExitCode> {
    let metrics = args
        .metrics
        .clone()
        .unwrap_or_else(|| args.run_dir.join("metrics.jsonl"));
    let records = read_records(&metrics)?;
    let panels = panels(&records);
    if panels.is_empty() {
        bail!(
            "{}: no plottable metrics (records need a `step` and numeric values)",
            metrics.display()
        );
    }
    let out_dir = args.out.unwrap_or_else(|| args.run_dir.join("plots"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let name = args
        .run_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| args.run_dir.display().to_string());
    let title = format!("deepeyes run {name}: {} steps", records.len());
    let mut written = Vec::new();
    if matches!(args.format, PlotFormat::Png | PlotFormat::Both) {
        let path = out_dir.join("curves.png");
        write_png(&path, &title, &panels)?;
        written.push(path);
    }
    if matches!(args.format, PlotFormat::Svg | PlotFormat::Both) {
        let path = out_dir.join("curves.svg");
        write_svg(&path, &title, &panels)?;
        written.push(path);
    }
    let mut out = std::io::stdout().lock();
    for path in written {
        writeln!(out, "wrote {}", path.display())?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small synthetic run shaped like DeepEyes' curves, ending in a torn line.
    fn write_metrics(path: &Path, steps: u64) {
        let mut text = String::new();
        for s in 0..steps {
            let t = s as f64;
            let rec = serde_json::json!({
                "step": s,
                "reward_mean": 0.4 + 0.02 * t, "reward_min": -0.2, "reward_max": 2.0,
                "reward_terms": {"accuracy": 0.5 + 0.01 * t, "format": -0.1, "tool": 0.2 + 0.02 * t},
                "accuracy": 0.5 + 0.01 * t,
                "tool_calls_mean": 0.65 + 0.05 * t, "tool_calls_max": 4,
                "grounding_iou": 0.25 + 0.005 * t,
                "response_length_mean": 190.0 + 3.0 * t,
                "clip_fraction": 0.0, "lr": 1e-6, "grad_norm": 0.3,
                "time_rollout_s": 2.0, "time_update_s": 1.0, "time_step_s": 3.5,
            });
            text.push_str(&rec.to_string());
            text.push('\n');
        }
        text.push_str("{\"step\": 99, \"rew");
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn writes_png_and_svg_that_decode() {
        let dir = tempfile::tempdir().unwrap();
        write_metrics(&dir.path().join("metrics.jsonl"), 12);
        run(PlotArgs {
            run_dir: dir.path().to_path_buf(),
            metrics: None,
            out: None,
            format: PlotFormat::Both,
        })
        .unwrap();
        let png = dir.path().join("plots/curves.png");
        let img = image::open(&png).unwrap().to_rgb8();
        // reward, terms, accuracy, tool calls, IoU, response length, clip, grad norm, lr, time.
        assert_eq!(img.dimensions(), canvas_size(10));
        let count = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
        let blue = count([31, 119, 180]);
        assert!(blue > 2000, "first-series colour drawn {blue} times");
        // The title is drawn in black in the top band.
        let dark_title = (0..TITLE_H)
            .flat_map(|y| (0..img.width()).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0 == [0, 0, 0])
            .count();
        assert!(dark_title > 300, "title pixels: {dark_title}");
        let svg = std::fs::read_to_string(dir.path().join("plots/curves.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("tool calls per trajectory"));
    }

    #[test]
    fn panels_follow_the_data() {
        let records: Vec<Value> = vec![
            serde_json::json!({"step": 0, "reward_mean": 1.0, "reward_terms": {"b": 1.0, "a": 0.0}}),
            serde_json::json!({"step": 1, "reward_mean": 2.0, "reward_terms": {"a": 1.0}, "entropy": null}),
            serde_json::json!({"reward_mean": 3.0}),
        ];
        let p = panels(&records);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].series[0].points, vec![(0.0, 1.0), (1.0, 2.0)]);
        let labels: Vec<&str> = p[1].series.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, vec!["a", "b"]);
        assert_eq!(format_tick(1e-6), "1.0e-6");
        assert_eq!(format_tick(0.25), "0.25");
        assert_eq!(format_tick(190.0), "190");
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let args = |metrics: &str| PlotArgs {
            run_dir: dir.path().to_path_buf(),
            metrics: Some(dir.path().join(metrics)),
            out: None,
            format: PlotFormat::Png,
        };
        let err = run(args("absent.jsonl")).unwrap_err();
        assert!(format!("{err:#}").contains("absent.jsonl"), "{err:#}");
        std::fs::write(dir.path().join("empty.jsonl"), "\n").unwrap();
        assert!(
            format!("{:#}", run(args("empty.jsonl")).unwrap_err()).contains("no metric records")
        );
        std::fs::write(
            dir.path().join("bad.jsonl"),
            "{\"step\":0}\nnope\n{\"step\":1}\n",
        )
        .unwrap();
        assert!(format!("{:#}", run(args("bad.jsonl")).unwrap_err()).contains("line 2"));
        std::fs::write(dir.path().join("none.jsonl"), "{\"step\":0,\"x\":\"a\"}\n").unwrap();
        assert!(format!("{:#}", run(args("none.jsonl")).unwrap_err()).contains("no plottable"));
    }
}
