//! Writes verl parquet files of a chosen size and measures the peak memory of streaming them.
//!
//! ```text
//! dataset_memory write PATH --rows N [--side PX] [--row-group R]
//! dataset_memory stream PATH [--check header|decode] [--batch-rows N]
//! ```
//!
//! `write` fills the rows with distinct random-pixel PNGs of `PX`×`PX` (incompressible, so the file is
//! about `N × PX² × 3` bytes). `stream` reads the file with `VerlParquetReader` and prints one
//! JSON line with the counts, the time and the process's peak resident set (`VmHWM`). Used by
//! `scripts/measure_dataset_memory.sh`.

use std::error::Error;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use deepeyes_core::Image;
use deepeyes_core::dataset::{
    ImageCheck, ItemReader, LoadOptions, PromptMessage, VerlParquetReader, VerlParquetWriter,
    VerlRow, VerlWriterConfig,
};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

fn noise_png(side: u32, seed: u64) -> Result<Vec<u8>> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let bytes = (0..side * side * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect();
    Ok(Image::from_raw(side, side, bytes)?.to_png()?)
}

fn peak_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmHWM in /proc/self/status".into())
}

fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs a value").into()),
    }
}

fn write(path: PathBuf, args: &[String]) -> Result<()> {
    let rows: usize = flag(args, "--rows", 100)?;
    let side: u32 = flag(args, "--side", 256)?;
    let row_group: usize = flag(args, "--row-group", 64)?;
    let start = Instant::now();
    let mut w = VerlParquetWriter::create(
        &path,
        VerlWriterConfig {
            row_group_rows: row_group,
            zstd: false,
        },
    )?;
    for i in 0..rows {
        w.write(VerlRow {
            data_source: "vstar".into(),
            prompt: vec![PromptMessage {
                role: "user".into(),
                content: format!("<image>\nWhat is in region {i}?"),
            }],
            // Every row its own image, as in the real data (a repeated one would be stored once).
            images: vec![noise_png(side, i as u64)?],
            ability: "visual_search".into(),
            env_name: "visual_toolbox_v2".into(),
            reward_style: "model".into(),
            ground_truth: format!("answer {i}"),
            split: "train".into(),
            index: i64::try_from(i)?,
            answer: format!("answer {i}"),
            question: format!("What is in region {i}?"),
        })?;
    }
    let written = w.finish()?;
    let size = std::fs::metadata(&path)?.len();
    writeln!(
        std::io::stdout().lock(),
        "{{\"wrote\": {path:?}, \"rows\": {written}, \"bytes\": {size}, \"seconds\": {:.2}}}",
        start.elapsed().as_secs_f64()
    )?;
    Ok(())
}

fn stream(path: PathBuf, args: &[String]) -> Result<()> {
    let check: String = flag(args, "--check", "header".to_string())?;
    let options = LoadOptions {
        image_check: match check.as_str() {
            "header" => ImageCheck::Header,
            "decode" => ImageCheck::Decode,
            other => return Err(format!("--check header|decode, not {other}").into()),
        },
        batch_rows: flag(args, "--batch-rows", LoadOptions::default().batch_rows)?,
        ..LoadOptions::default()
    };
    let start = Instant::now();
    let mut reader = VerlParquetReader::open(&path, &options)?;
    let mut image_bytes = 0u64;
    for item in reader.good_items() {
        image_bytes += item?
            .images
            .iter()
            .map(|i| i.bytes().len() as u64)
            .sum::<u64>();
    }
    let s = reader.summary();
    writeln!(
        std::io::stdout().lock(),
        "{{\"file\": {path:?}, \"file_bytes\": {}, \"rows\": {}, \"items\": {}, \"skipped\": {}, \
         \"image_bytes\": {image_bytes}, \"check\": {check:?}, \"batch_rows\": {}, \
         \"seconds\": {:.2}, \"peak_rss_kib\": {}}}",
        std::fs::metadata(&path)?.len(),
        s.rows_read,
        s.items,
        s.skipped_total(),
        options.batch_rows,
        start.elapsed().as_secs_f64(),
        peak_kib()?
    )?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(cmd), Some(path)) = (args.first(), args.get(1)) else {
        return Err("usage: dataset_memory write|stream PATH [options]".into());
    };
    let path = PathBuf::from(path);
    match cmd.as_str() {
        "write" => write(path, &args[2..]),
        "stream" => stream(path, &args[2..]),
        other => Err(format!("unknown command {other}; use write or stream").into()),
    }
}
