//! `bench-plot DIR`: draws PNG plots from the CSV files `bench/run` wrote
//! into DIR, next to them:
//!
//! - `raw.png` from `raw-*.csv`: block-store throughput by request size,
//!   per backend, direction and thread count, beside each backend's pinned
//!   DMA ceiling;
//! - `nbd-throughput.png`, `nbd-iops.png`, `nbd-latency.png` from
//!   `nbd-compare.csv`: every server against nbdkit's memory plugin;
//! - `nbd-vs-PEER.png` from `nbd-compare.csv`, one per peer of
//!   `nbd-compare --peer` (nbd-vram, nbdkit-vram): every shape's ratio of
//!   each vramswap server to that peer, from the same run;
//! - `scaling.png` from `scaling.csv`: start-up time and server memory by
//!   export size;
//! - `compress-ratio.png` and `compress-speed.png` from `compress.csv`
//!   (`benches/compress.rs --csv`): what each codec makes of 4 KiB pages,
//!   and how fast, on one CPU thread.
//!
//! Text is drawn with DejaVu Sans (Debian's fonts-dejavu-core); no Python,
//! no font service.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Splits one CSV line; a field in double quotes may hold commas.
fn fields(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(String::new()),
            c => out.last_mut().expect("one field at least").push(c),
        }
    }
    out
}

/// A CSV file as rows of column name → value.
fn read_csv(path: &Path) -> Result<Vec<BTreeMap<String, String>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut lines = text.lines();
    let header = fields(lines.next().context("empty CSV")?);
    Ok(lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| header.iter().cloned().zip(fields(l)).collect())
        .collect())
}

fn num(row: &BTreeMap<String, String>, key: &str) -> Result<f64> {
    row.get(key)
        .with_context(|| format!("no column {key}"))?
        .parse()
        .with_context(|| format!("column {key} is not a number"))
}

fn human(bytes: f64) -> String {
    match bytes as u64 {
        b if b >= 1 << 30 => format!("{}G", b >> 30),
        b if b >= 1 << 20 => format!("{}M", b >> 20),
        b if b >= 1 << 10 => format!("{}K", b >> 10),
        b => format!("{b}"),
    }
}

/// Throughput against request size (log scale), one line per backend,
/// direction and thread count; dashed: each backend's DMA ceiling.
fn raw(dir: &Path) -> Result<Option<PathBuf>> {
    let mut rows = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.starts_with("raw-") && name.ends_with(".csv")
        })
        .collect();
    entries.sort();
    for path in entries {
        rows.extend(read_csv(&path)?);
    }
    if rows.is_empty() {
        return Ok(None);
    }
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut ceilings: BTreeMap<String, f64> = BTreeMap::new();
    let mut top = 0f64;
    for row in &rows {
        let key = format!(
            "{} {} x{}",
            row["backend"], row["direction"], row["threads"]
        );
        let x = num(row, "request_bytes")?.log2();
        let y = num(row, "gb_per_s")?;
        let ceiling = num(row, "ceiling_gb_per_s")?;
        top = top.max(y).max(ceiling);
        series.entry(key).or_default().push((x, y));
        ceilings.insert(
            format!("{} {} ceiling", row["backend"], row["direction"]),
            ceiling,
        );
    }
    let xs: Vec<f64> = series.values().flatten().map(|p| p.0).collect();
    let (x0, x1) = (
        xs.iter().cloned().fold(f64::MAX, f64::min),
        xs.iter().cloned().fold(f64::MIN, f64::max),
    );
    let out = dir.join("raw.png");
    let root = BitMapBackend::new(&out, (1200, 750)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Block-store copies vs the pinned DMA ceiling",
            ("sans-serif", 26),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((x0 - 0.3)..(x1 + 0.3), 0f64..(top * 1.1))?;
    chart
        .configure_mesh()
        .x_desc("request size")
        .y_desc("GB/s")
        .x_label_formatter(&|x| human(x.exp2().round()))
        .draw()?;
    for (i, (name, points)) in series.iter_mut().enumerate() {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)).point_size(4))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    for (i, (name, ceiling)) in ceilings.iter().enumerate() {
        let color = PALETTE[(i + 5) % PALETTE.len()];
        let dashes: Vec<(f64, f64)> = vec![(x0 - 0.3, *ceiling), (x1 + 0.3, *ceiling)];
        chart
            .draw_series(DashedLineSeries::new(dashes, 8, 6, color.stroke_width(2)))?
            .label(format!("{name} {ceiling:.1}"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(Some(out.clone()))
}

/// Bars for `tests` (groups), one per server, from `nbd-compare.csv`.
fn bars(
    dir: &Path,
    rows: &[BTreeMap<String, String>],
    file: &str,
    title: &str,
    unit: &str,
    tests: &[&str],
) -> Result<Option<PathBuf>> {
    let mut servers: Vec<String> = Vec::new();
    for row in rows {
        if !servers.contains(&row["server"]) {
            servers.push(row["server"].clone());
        }
    }
    let value = |test: &str, server: &str| -> Option<f64> {
        rows.iter()
            .find(|r| r["test"] == test && r["server"] == server)
            .and_then(|r| r["value"].parse().ok())
    };
    let tests: Vec<&str> = tests
        .iter()
        .copied()
        .filter(|t| servers.iter().any(|s| value(t, s).is_some()))
        .collect();
    if tests.is_empty() {
        return Ok(None);
    }
    let top = tests
        .iter()
        .flat_map(|t| servers.iter().filter_map(move |s| value(t, s)))
        .fold(0f64, f64::max);
    let out = dir.join(file);
    let root = BitMapBackend::new(&out, (1200, 650)).into_drawing_area();
    root.fill(&WHITE)?;
    let groups = tests.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..groups, 0f64..(top * 1.15).max(1e-9))?;
    let names: Vec<String> = tests.iter().map(|t| t.to_string()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(tests.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < names.len() {
                names[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc(unit)
        .y_label_formatter(&|y| {
            if top >= 1000.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.1}")
            }
        })
        .draw()?;
    let width = 0.8 / servers.len() as f64;
    for (k, server) in servers.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let rects: Vec<Rectangle<(f64, f64)>> = tests
            .iter()
            .enumerate()
            .filter_map(|(g, t)| {
                let v = value(t, server)?;
                let x = g as f64 + 0.1 + width * k as f64;
                Some(Rectangle::new(
                    [(x, 0.0), (x + width * 0.95, v)],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(rects)?
            .label(server.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(Some(out.clone()))
}

/// Units of the shapes held against another server: throughput and IOPS
/// (higher is better), latency and longest requests (lower is better).
const HIGHER: [&str; 2] = ["GB/s", "IOPS"];
const LOWER: [&str; 2] = ["us", "ms"];

/// The vramswap servers and the peers among `servers` (see [`versus`]).
fn split_servers(
    dir: &Path,
    servers: &[String],
    rows: &[BTreeMap<String, String>],
) -> (Vec<String>, Vec<String>) {
    let logged: Vec<&String> = servers
        .iter()
        .filter(|s| dir.join(format!("peer-{s}.log")).is_file())
        .collect();
    let is_peer = |s: &String| match logged.is_empty() {
        true => !rows
            .iter()
            .any(|r| &r["server"] == s && r["test"].starts_with("server-rss-lazy-")),
        false => logged.contains(&s),
    };
    let (peers, ours) = servers
        .iter()
        .filter(|s| *s != "memory")
        .cloned()
        .partition(is_peer);
    (ours, peers)
}

/// One `nbd-vs-PEER.png` per peer in `nbd-compare.csv`: for every shape,
/// how each vramswap server compares with the peer from the same run, as a
/// horizontal bar on a log scale around parity: ours / theirs for
/// throughput and IOPS, theirs / ours for latency, so right of 1 is better
/// for us either way. Peers are the servers `nbd-compare --peer` ran: it
/// keeps each one's log as `DIR/peer-NAME.log`. In a directory without
/// such logs, vramswap servers are the ones with lazy-export memory rows
/// (`server-rss-lazy-*`, which a run with `--shapes` but not `huge` lacks)
/// and peers every other server but `memory`.
fn versus(dir: &Path, rows: &[BTreeMap<String, String>]) -> Result<Vec<PathBuf>> {
    let mut servers: Vec<String> = Vec::new();
    let mut tests: Vec<(String, String)> = Vec::new();
    for row in rows {
        if !servers.contains(&row["server"]) {
            servers.push(row["server"].clone());
        }
        if !tests.iter().any(|t| t.0 == row["test"]) {
            tests.push((row["test"].clone(), row["unit"].clone()));
        }
    }
    let (ours, peers) = split_servers(dir, &servers, rows);
    let value = |test: &str, server: &str| -> Option<f64> {
        rows.iter()
            .find(|r| r["test"] == test && r["server"] == server)
            .and_then(|r| r["value"].parse().ok())
            .filter(|v: &f64| *v > 0.0)
    };
    let mut drawn = Vec::new();
    if ours.is_empty() {
        return Ok(drawn);
    }
    for peer in &peers {
        // (shape, one ratio per server where both have a figure)
        let shapes: Vec<(String, Vec<Option<f64>>)> = tests
            .iter()
            .filter(|(_, u)| HIGHER.contains(&u.as_str()) || LOWER.contains(&u.as_str()))
            .filter_map(|(t, u)| {
                let theirs = value(t, peer)?;
                let ratios: Vec<Option<f64>> = ours
                    .iter()
                    .map(|s| {
                        value(t, s).map(|v| {
                            if HIGHER.contains(&u.as_str()) {
                                v / theirs
                            } else {
                                theirs / v
                            }
                        })
                    })
                    .collect();
                ratios
                    .iter()
                    .any(Option::is_some)
                    .then(|| (t.clone(), ratios))
            })
            .collect();
        if shapes.is_empty() {
            continue;
        }
        let logs = shapes
            .iter()
            .flat_map(|s| s.1.iter().flatten().map(|r| r.log2()));
        let (lo, hi) = logs.fold((-1f64, 1f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
        let (x0, x1) = ((lo - 0.4).max(-7.0), (hi + 0.4).min(7.0));
        let out = dir.join(format!("nbd-vs-{peer}.png"));
        let height = 140 + 26 * shapes.len() as u32 * ours.len().max(2) as u32 / 2;
        let root = BitMapBackend::new(&out, (1200, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let n = shapes.len() as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "vramswap vs {peer}, per shape, same run (right of 1x: better than {peer})"
                ),
                ("sans-serif", 24),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(230)
            .build_cartesian_2d(x0..x1, 0f64..n)?;
        let names: Vec<String> = shapes.iter().map(|s| s.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(shapes.len() * 2 + 1)
            .y_label_formatter(&|y| {
                // Shapes run top to bottom; a label at each row's middle.
                let i = (n - y).floor() as usize;
                if (y - y.floor() - 0.5).abs() < 0.01 && i < names.len() {
                    names[i].clone()
                } else {
                    String::new()
                }
            })
            .x_desc(format!(
                "ours / {peer}'s throughput or IOPS, {peer}'s / ours latency (log scale)"
            ))
            .x_label_formatter(&|x| {
                let r = x.exp2();
                if r >= 1.0 {
                    format!("{r:.1}x")
                } else if (1.0 / r - (1.0 / r).round()).abs() < 0.01 {
                    format!("1/{:.0}x", 1.0 / r)
                } else {
                    format!("{r:.2}x")
                }
            })
            .draw()?;
        let height = 0.8 / ours.len() as f64;
        for (k, server) in ours.iter().enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            let bars: Vec<Rectangle<(f64, f64)>> = shapes
                .iter()
                .enumerate()
                .filter_map(|(i, (_, ratios))| {
                    let x = ratios[k]?.log2().clamp(x0, x1);
                    let top = n - i as f64 - 0.1 - height * k as f64;
                    Some(Rectangle::new(
                        [(0.0, top), (x, top - height * 0.9)],
                        color.filled(),
                    ))
                })
                .collect();
            chart
                .draw_series(bars)?
                .label(server.clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled())
                });
            let labels: Vec<Text<(f64, f64), String>> = shapes
                .iter()
                .enumerate()
                .filter_map(|(i, (_, ratios))| {
                    let r = ratios[k]?;
                    let x = r.log2().clamp(x0, x1);
                    let y = n - i as f64 - 0.1 - height * k as f64 - height * 0.1;
                    let at = if x >= 0.0 {
                        x + 0.03
                    } else {
                        // Left of a bar that goes left; inside one cut
                        // off at the left edge.
                        (x - 0.03 - 0.048 * (x1 - x0)).max(x0 + 0.02)
                    };
                    let text = if r < 0.1 {
                        format!("{r:.3}x")
                    } else {
                        format!("{r:.2}x")
                    };
                    Some(Text::new(text, (at, y), ("sans-serif", 13).into_font()))
                })
                .collect();
            chart.draw_series(labels)?;
        }
        chart.draw_series(std::iter::once(PathElement::new(
            [(0.0, 0.0), (0.0, n)],
            BLACK.stroke_width(2),
        )))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        drawn.push(out.clone());
    }
    Ok(drawn)
}

/// Start-up time and server memory against export size, per backend.
fn scaling(dir: &Path) -> Result<Option<PathBuf>> {
    let path = dir.join("scaling.csv");
    if !path.exists() {
        return Ok(None);
    }
    let rows = read_csv(&path)?;
    let out = dir.join("scaling.png");
    let root = BitMapBackend::new(&out, (1200, 550)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);
    for (area, column, title, unit) in [
        (&left, "startup_s", "Start-up (eager allocation)", "seconds"),
        (&right, "rss_kib", "Server memory (RSS)", "KiB"),
    ] {
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for row in &rows {
            series
                .entry(row["backend"].clone())
                .or_default()
                .push((num(row, "size_bytes")?.log2(), num(row, column)?));
        }
        let xs: Vec<f64> = series.values().flatten().map(|p| p.0).collect();
        let ys: Vec<f64> = series.values().flatten().map(|p| p.1).collect();
        let (x0, x1) = (
            xs.iter().cloned().fold(f64::MAX, f64::min),
            xs.iter().cloned().fold(f64::MIN, f64::max),
        );
        let top = ys.iter().cloned().fold(0f64, f64::max).max(1e-9);
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((x0 - 0.5)..(x1 + 0.5), 0f64..top * 1.2)?;
        chart
            .configure_mesh()
            .x_desc("export size")
            .y_desc(unit)
            .x_label_formatter(&|x| human(x.exp2().round()))
            .draw()?;
        for (i, (name, mut points)) in series.into_iter().enumerate() {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(4))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart.configure_series_labels().border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(Some(out.clone()))
}

fn main() -> Result<()> {
    let dir = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => bail!("usage: bench-plot DIR   (the directory bench/run wrote)"),
    };
    let font: &'static [u8] = Box::leak(
        std::fs::read(FONT)
            .with_context(|| format!("{FONT} (install fonts-dejavu-core)"))?
            .into_boxed_slice(),
    );
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("{FONT}: not a usable font"))?;

    let mut drawn = Vec::new();
    drawn.extend(raw(&dir)?);
    let nbd = dir.join("nbd-compare.csv");
    if nbd.exists() {
        let rows = read_csv(&nbd)?;
        drawn.extend(bars(
            &dir,
            &rows,
            "nbd-throughput.png",
            "Sequential throughput over NBD (nbdcopy, fio 1 MiB)",
            "GB/s",
            &[
                "seq-write-1conn",
                "seq-write-4conn",
                "seq-write-8conn",
                "seq-read-1conn",
                "seq-read-4conn",
                "seq-read-8conn",
                "seqread-1m-4jobs-qd16",
            ],
        )?);
        drawn.extend(bars(
            &dir,
            &rows,
            "nbd-iops.png",
            "4 KiB random IOPS over NBD (fio)",
            "IOPS",
            &[
                "randread-4k-qd1",
                "randread-4k-qd32",
                "randwrite-4k-qd32",
                "randread-4k-4jobs-qd32",
            ],
        )?);
        drawn.extend(bars(
            &dir,
            &rows,
            "nbd-latency.png",
            "4 KiB QD1 latency over NBD (fio completion latency)",
            "microseconds",
            &[
                "randread-4k-qd1-p50",
                "randread-4k-qd1-p99",
                "randread-4k-qd1-p99.9",
                "randwrite-4k-qd1-p50",
                "randwrite-4k-qd1-p99",
            ],
        )?);
        drawn.extend(versus(&dir, &rows)?);
    }
    drawn.extend(scaling(&dir)?);
    let compress = dir.join("compress.csv");
    if compress.exists() {
        let rows = read_csv(&compress)?;
        drawn.extend(bars(
            &dir,
            &rows,
            "compress-ratio.png",
            "4 KiB pages: original over compressed bytes, and over their slots",
            "ratio",
            &["ratio", "ratio-in-slots"],
        )?);
        drawn.extend(bars(
            &dir,
            &rows,
            "compress-speed.png",
            "4 KiB pages: one CPU thread",
            "MB/s",
            &["compress", "decompress"],
        )?);
    }
    if drawn.is_empty() {
        bail!("{}: no bench/run CSV files to plot", dir.display());
    }
    for path in drawn {
        println!("{}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(test: &str, server: &str) -> BTreeMap<String, String> {
        [
            ("test", test),
            ("server", server),
            ("value", "1"),
            ("unit", "IOPS"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn peers_are_the_servers_nbd_compare_kept_a_log_for() {
        let dir = std::env::temp_dir().join(format!("bench-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let servers: Vec<String> = ["memory", "cuda", "vulkan", "nbd-vram"]
            .map(String::from)
            .to_vec();
        // A run without the huge shapes has no lazy-export rows: with no
        // logs either, nothing would be told apart as ours.
        let rows: Vec<_> = servers.iter().map(|s| row("randread-4k-qd32", s)).collect();
        assert!(split_servers(&dir, &servers, &rows).0.is_empty());
        std::fs::write(dir.join("peer-nbd-vram.log"), "").unwrap();
        let (ours, peers) = split_servers(&dir, &servers, &rows);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(ours, ["cuda", "vulkan"]);
        assert_eq!(peers, ["nbd-vram"]);
    }

    #[test]
    fn without_peer_logs_lazy_export_rows_mark_our_servers() {
        let dir = std::env::temp_dir().join("bench-plot-test-no-such-dir");
        let servers: Vec<String> = ["memory", "cuda", "nbd-vram"].map(String::from).to_vec();
        let mut rows: Vec<_> = servers.iter().map(|s| row("randread-4k-qd32", s)).collect();
        rows.push(row("server-rss-lazy-256M", "cuda"));
        let (ours, peers) = split_servers(&dir, &servers, &rows);
        assert_eq!(ours, ["cuda"]);
        assert_eq!(peers, ["nbd-vram"]);
    }
}
