//! HR-Bench TSV.

use deepeyes_core::dataset::{
    self, DatasetError, DatasetKind, HrBenchReader, ItemReader, LoadOptions, Position, SkipReason,
};

use super::{drain, fixture, skipped};

const MINI: &str = "hrbench/hr_bench_mini.tsv";

#[test]
fn hrbench_tsv_items_fields_and_bad_rows_by_line() {
    let path = fixture(MINI);
    let mut reader = HrBenchReader::open(&path, &LoadOptions::default()).unwrap();
    assert_eq!(reader.columns().len(), 10);
    let (items, bad) = drain(&mut reader);

    let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "hr_bench_mini/0",
            "hr_bench_mini/1",
            "hr_bench_mini/2",
            "hr_bench_mini/7"
        ]
    );
    let first = &items[0];
    assert_eq!(first.data_source, "hrbench");
    assert_eq!(
        first.question,
        "What is the number displayed above the entrance?"
    );
    assert_eq!(first.options, ["27B", "37B", "27D", "27E"]);
    assert_eq!(first.correct_option, Some(0));
    assert_eq!(first.answer, "27B");
    assert_eq!(first.category.as_deref(), Some("single"));
    assert_eq!(first.extra["cycle_category"], "0");
    assert_eq!(first.extra.len(), 1);
    assert_eq!(first.position, Position::line(&path, 0, 2));
    let img = &first.images[0];
    assert_eq!((img.format(), img.width(), img.height()), ("jpeg", 80, 45));

    assert_eq!(items[1].answer_letter(), Some('C'));
    assert_eq!(items[1].answer, "yellow");
    assert_eq!(items[1].images[0].format(), "png");

    // Quoted over two lines, with a tab and doubled quotes inside.
    let quoted = &items[2];
    assert_eq!(
        quoted.question,
        "Which sign reads \"EXIT\tNOW\"?\nPick one."
    );
    assert_eq!(quoted.category.as_deref(), Some("cross"));
    assert_eq!(quoted.answer, "the right one");
    assert_eq!(quoted.position, Position::line(&path, 2, 4));

    // A lower-case answer letter; the row after the two-line one starts two lines later.
    let clock = &items[3];
    assert_eq!(clock.answer, "4:20");
    assert_eq!(clock.position, Position::line(&path, 8, 11));

    let reported: Vec<_> = bad
        .iter()
        .map(|b| (b.position.row, b.position.line, b.reason))
        .collect();
    assert_eq!(
        reported,
        [
            (Some(3), Some(6), SkipReason::BadImage),
            (Some(4), Some(7), SkipReason::BadImage),
            (Some(5), Some(8), SkipReason::InvalidValue),
            (Some(6), Some(9), SkipReason::Malformed),
            (Some(7), Some(10), SkipReason::MissingField),
        ]
    );
    assert!(bad[0].detail.contains("not base64"), "{}", bad[0]);
    assert!(
        bad[1].detail.contains("not a recognised image format"),
        "{}",
        bad[1]
    );
    assert!(bad[2].detail.contains("`E`"), "{}", bad[2]);
    assert!(bad[3].detail.contains("8 fields") && bad[3].detail.contains("10 columns"));
    assert!(bad[4].detail.contains("`question`"), "{}", bad[4]);
    assert_eq!(
        bad[2].to_string(),
        format!(
            "{}:8 (row 5): invalid-value: {}",
            path.display(),
            bad[2].detail
        )
    );

    let s = reader.summary();
    assert_eq!((s.rows_read, s.items, s.skipped_total()), (9, 4, 5));
    assert_eq!(
        skipped(&reader),
        [
            (SkipReason::MissingField, 1),
            (SkipReason::InvalidValue, 1),
            (SkipReason::BadImage, 2),
            (SkipReason::Malformed, 1),
        ]
    );
}

#[test]
fn over_long_rows_are_skipped_without_losing_the_line_count() {
    let opts = LoadOptions {
        max_row_bytes: 200,
        ..LoadOptions::default()
    };
    let mut reader = HrBenchReader::open(&fixture(MINI), &opts).unwrap();
    let (items, bad) = drain(&mut reader);
    assert!(items.is_empty());
    let reported: Vec<_> = bad
        .iter()
        .map(|b| (b.position.line.unwrap(), b.reason))
        .collect();
    // Only the two rows without a real image are short enough to be parsed.
    assert_eq!(
        reported,
        [
            (2, SkipReason::Malformed),
            (3, SkipReason::Malformed),
            (4, SkipReason::Malformed),
            (6, SkipReason::BadImage),
            (7, SkipReason::BadImage),
            (8, SkipReason::Malformed),
            (9, SkipReason::Malformed),
            (10, SkipReason::Malformed),
            (11, SkipReason::Malformed),
        ]
    );
    assert!(bad[0].detail.contains("over max-row-bytes"), "{}", bad[0]);
    assert_eq!(reader.summary().rows_read, 9);
}

#[test]
fn a_tsv_without_required_columns_is_refused_naming_them() {
    let err = HrBenchReader::open(
        &fixture("hrbench/no_image_column.tsv"),
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, DatasetError::Format { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("`image`") && msg.contains("no_image_column.tsv"),
        "{msg}"
    );
    assert!(!msg.contains("`question`"), "{msg}");
}

#[test]
fn edge_cases_of_the_tsv_layout() {
    let dir = tempfile::tempdir().unwrap();
    let png = {
        use base64::Engine as _;
        let bytes = std::fs::read(fixture("synthv/images/000000.png")).unwrap();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    // BOM, CRLF line ends, blank lines, no index or category column, three options, an answer
    // given as the option text, and an unclosed quote at the end.
    let text = format!(
        "\u{feff}question\tA\tB\tC\tanswer\timage\textra\r\n\
         \r\n\
         Q one?\tx\ty\tz\tB\t{png}\tkeep\r\n\
         Q two?\tx\ty\t\tz\t{png}\t\r\n\
         Q three?\tx\t\tz\tA\t{png}\t\r\n\
         \"Q four\tx\ty\tz\tA\t{png}\t\n"
    );
    let path = dir.path().join("custom.tsv");
    std::fs::write(&path, text).unwrap();
    let mut reader = dataset::open(DatasetKind::HrBench, &path, &LoadOptions::default()).unwrap();
    let (items, bad) = drain(reader.as_mut());
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].id, "custom/row0");
    assert_eq!(items[0].position.line, Some(3));
    assert_eq!(items[0].options, ["x", "y", "z"]);
    assert_eq!(items[0].answer, "y");
    assert_eq!(items[0].extra["extra"], "keep");
    assert!(items[0].category.is_none());
    let reported: Vec<_> = bad
        .iter()
        .map(|b| (b.position.row.unwrap(), b.position.line.unwrap(), b.reason))
        .collect();
    assert_eq!(
        reported,
        [
            // `z` is neither a letter of the two filled options nor one of their texts.
            (1, 4, SkipReason::InvalidValue),
            // Option B is empty while C is filled.
            (2, 5, SkipReason::InvalidValue),
            (3, 6, SkipReason::Malformed),
        ]
    );
    assert!(bad[2].detail.contains("never closed"), "{}", bad[2]);
}
