//! DeepEyes-47k / verl parquet.

use deepeyes_core::dataset::{
    self, DatasetError, DatasetKind, ImageCheck, ItemReader, LoadOptions, Position, SkipReason,
    VerlParquetReader,
};

use super::{drain, fixture, rows_and_reasons, skipped};

const SAMPLE: &str = "verl/deepeyes_sample.parquet";

#[test]
fn sample_parquet_yields_good_rows_and_reports_bad_ones_by_row() {
    let path = fixture(SAMPLE);
    let mut reader = VerlParquetReader::open(&path, &LoadOptions::default()).unwrap();
    assert_eq!(reader.row_groups(), 4, "the fixture has 4-row row groups");
    assert_eq!(reader.len_hint(), Some(13));
    let (items, bad) = drain(&mut reader);

    let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "deepeyes_sample/0",
            "deepeyes_sample/1",
            "deepeyes_sample/3",
            "deepeyes_sample/5",
            "deepeyes_sample/6",
            "deepeyes_sample/9",
            "deepeyes_sample/10",
            "deepeyes_sample/12"
        ]
    );
    assert_eq!(
        rows_and_reasons(&bad),
        [
            (Some(2), SkipReason::BadImage),
            (Some(4), SkipReason::MissingField),
            (Some(7), SkipReason::MissingFile),
            (Some(8), SkipReason::MissingField),
            (Some(11), SkipReason::MissingField),
        ]
    );
    assert!(bad.iter().all(|b| b.position.file == path));
    assert!(
        bad[1].detail.contains("reward_model.ground_truth"),
        "{}",
        bad[1]
    );
    assert!(bad[2].detail.contains("images/missing.png"), "{}", bad[2]);
    assert!(bad[3].detail.contains("`images`"), "{}", bad[3]);
    assert!(bad[4].detail.contains("`prompt`"), "{}", bad[4]);
    assert_eq!(
        bad[0].to_string(),
        format!("{} (row 2): bad-image: {}", path.display(), bad[0].detail)
    );

    let s = reader.summary();
    assert_eq!((s.rows_read, s.items, s.skipped_total()), (13, 8, 5));
    assert_eq!(
        skipped(&reader),
        [
            (SkipReason::MissingField, 3),
            (SkipReason::BadImage, 1),
            (SkipReason::MissingFile, 1),
        ]
    );
    assert!(s.completed());
    assert_eq!(s.bad_rows, bad);
}

#[test]
fn sample_parquet_fields() {
    let path = fixture(SAMPLE);
    let mut reader = VerlParquetReader::open(&path, &LoadOptions::default()).unwrap();
    let (items, _) = drain(&mut reader);
    let by_id = |id: &str| {
        items
            .iter()
            .find(|i| i.id == format!("deepeyes_sample/{id}"))
            .unwrap()
    };

    let first = by_id("0");
    assert_eq!(first.data_source, "vstar");
    assert_eq!(first.question, "What is the color of the umbrella?");
    assert_eq!(first.answer, "red");
    assert!(first.options.is_empty() && first.correct_option.is_none());
    assert_eq!(first.position, Position::row(&path, 0));
    assert_eq!(first.images.len(), 1);
    let img = &first.images[0];
    assert_eq!((img.format(), img.width(), img.height()), ("jpeg", 48, 32));
    assert!(!img.is_decoded());
    assert_eq!(img.decode(&Default::default()).unwrap().width(), 48);
    assert_eq!(first.prompt.len(), 2);
    assert_eq!(first.prompt[0].role, "system");
    assert!(
        first.prompt[1]
            .content
            .starts_with("<image>\nWhat is the color")
    );
    assert_eq!(first.extra["ability"], "visual_search");
    assert_eq!(first.extra["env_name"], "visual_toolbox_v2");
    assert_eq!(first.extra["reward_model"]["style"], "model");
    assert_eq!(first.extra["extra_info"]["split"], "train");
    assert_eq!(first.extra["extra_info"]["index"], 0);
    assert!(!first.extra.contains_key("prompt") && !first.extra.contains_key("images"));

    assert_eq!(by_id("1").images[0].format(), "png");

    // No extra_info.question: the last user message, without the image marker.
    let thinklite = by_id("5");
    assert_eq!(thinklite.data_source, "thinklite_eureka");
    assert_eq!(
        thinklite.question,
        "Solve it.\nQuestion:\nFind x if 2x = 6."
    );
    assert_eq!(thinklite.answer, "\\boxed{3}");
    assert!(thinklite.extra["env_name"].is_null());

    // An image stored by path, relative to the parquet file.
    let by_path = by_id("6");
    assert_eq!(
        (by_path.images[0].width(), by_path.images[0].height()),
        (40, 30)
    );
    assert!(by_path.images[0].origin().ends_with("images/side_0.png"));

    // Two images, in order.
    let two = by_id("9");
    assert_eq!(two.images.len(), 2);
    assert_eq!(two.images[0].format(), "jpeg");
    assert_eq!(two.images[1].format(), "png");

    // Ground truth only in extra_info.answer.
    assert_eq!(by_id("10").answer, "42");
}

#[test]
fn batch_size_and_eager_decoding_do_not_change_the_result() {
    let path = fixture(SAMPLE);
    let reference = {
        let mut r = VerlParquetReader::open(&path, &LoadOptions::default()).unwrap();
        let (items, bad) = drain(&mut r);
        (items, bad)
    };
    for (batch_rows, check) in [
        (1, ImageCheck::Header),
        (3, ImageCheck::Decode),
        (100, ImageCheck::Header),
    ] {
        let opts = LoadOptions {
            batch_rows,
            image_check: check,
            ..LoadOptions::default()
        };
        let mut r = VerlParquetReader::open(&path, &opts).unwrap();
        let (items, bad) = drain(&mut r);
        assert_eq!(bad, reference.1, "batch_rows={batch_rows}");
        let ids: Vec<_> = items.iter().map(|i| (&i.id, &i.position)).collect();
        let want: Vec<_> = reference.0.iter().map(|i| (&i.id, &i.position)).collect();
        assert_eq!(ids, want, "batch_rows={batch_rows}");
        let decoded = check == ImageCheck::Decode;
        assert!(items.iter().all(|i| i.images[0].is_decoded() == decoded));
    }
}

#[test]
fn tight_image_limits_turn_rows_into_bad_images() {
    let opts = LoadOptions {
        image_limits: deepeyes_core::ImageLimits {
            max_pixels: 45 * 30,
            ..Default::default()
        },
        ..LoadOptions::default()
    };
    let mut r = VerlParquetReader::open(&fixture(SAMPLE), &opts).unwrap();
    let (items, bad) = drain(&mut r);
    // Only the 40×30 image read by path is under 45×30 pixels; rows 0,1,3,5,9,10,12 have 48×32.
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].id, "deepeyes_sample/6");
    assert_eq!(
        bad.iter()
            .filter(|b| b.reason == SkipReason::BadImage && b.detail.contains("exceeds"))
            .count(),
        7
    );
}

#[test]
fn a_parquet_without_verl_columns_is_refused_naming_them() {
    let err = VerlParquetReader::open(&fixture("verl/not_verl.parquet"), &LoadOptions::default())
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DatasetError::Format { .. }), "{msg}");
    for col in ["`prompt`", "`images`", "`data_source`", "`reward_model`"] {
        assert!(msg.contains(col), "{msg}");
    }
    assert!(msg.contains("not_verl.parquet"), "{msg}");
}

#[test]
fn a_file_that_is_not_parquet_is_refused() {
    let path = fixture("hrbench/no_image_column.tsv");
    let err = VerlParquetReader::open(&path, &LoadOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("not a readable parquet file"),
        "{err}"
    );
    let err = VerlParquetReader::open(&fixture("verl/absent.parquet"), &LoadOptions::default())
        .unwrap_err();
    assert!(matches!(err, DatasetError::Io { .. }), "{err}");
}

#[test]
fn a_corrupt_row_group_is_skipped_as_a_whole_and_reading_goes_on() {
    use parquet::file::reader::{FileReader, SerializedFileReader};

    let src = fixture(SAMPLE);
    let mut bytes = std::fs::read(&src).unwrap();
    // Find the first page of row group 1's image-bytes column and overwrite its header.
    let reader = SerializedFileReader::new(std::fs::File::open(&src).unwrap()).unwrap();
    let group = reader.metadata().row_group(1);
    let column = group
        .columns()
        .iter()
        .find(|c| c.column_path().string().contains("bytes"))
        .unwrap();
    let start = column
        .dictionary_page_offset()
        .unwrap_or(column.data_page_offset());
    let start = usize::try_from(start).unwrap();
    bytes[start..start + 16].fill(0xFF);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.parquet");
    std::fs::write(&path, bytes).unwrap();

    let mut r = VerlParquetReader::open(&path, &LoadOptions::default()).unwrap();
    let (items, bad) = drain(&mut r);
    let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "corrupt/0",
            "corrupt/1",
            "corrupt/3",
            "corrupt/9",
            "corrupt/10",
            "corrupt/12"
        ]
    );
    assert_eq!(
        rows_and_reasons(&bad),
        [
            (Some(2), SkipReason::BadImage),
            (Some(4), SkipReason::CorruptData),
            (Some(8), SkipReason::MissingField),
            (Some(11), SkipReason::MissingField),
        ]
    );
    assert_eq!(bad[1].rows, 4);
    assert!(
        bad[1].detail.contains("row group 1 (rows 4..8)"),
        "{}",
        bad[1]
    );
    let s = r.summary();
    assert_eq!((s.rows_read, s.items, s.skipped_total()), (13, 6, 7));
    assert_eq!(s.skipped[&SkipReason::CorruptData], 4);
}

#[test]
fn open_dispatches_by_kind_and_good_items_skips_bad_rows() {
    let path = fixture(SAMPLE);
    let mut reader = dataset::open(DatasetKind::Verl, &path, &LoadOptions::default()).unwrap();
    let good: Vec<_> = reader.good_items().collect::<Result<_, _>>().unwrap();
    assert_eq!(good.len(), 8);
    assert_eq!(reader.summary().skipped_total(), 5);
    // Exhausted: the reader yields nothing more and the summary stays.
    assert!(reader.next().is_none());
    assert_eq!(reader.summary().rows_read, 13);
    assert!(matches!(
        dataset::open(
            DatasetKind::Verl,
            &fixture("verl/not_verl.parquet"),
            &Default::default()
        ),
        Err(DatasetError::Format { .. })
    ));
}
