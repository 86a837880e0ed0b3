//! SynthV* and generic JSONL.

use deepeyes_core::dataset::{
    DatasetError, DatasetKind, DatasetSpec, ItemReader, JsonlReader, JsonlSchema, LoadOptions,
    Position, SkipReason,
};

use super::{drain, fixture, skipped};

const SYNTHV: &str = "synthv/synthv_mini.jsonl";

#[test]
fn synthv_index_items_and_bad_rows_by_line() {
    let path = fixture(SYNTHV);
    let mut reader =
        JsonlReader::open(&path, JsonlSchema::SynthV, &LoadOptions::default()).unwrap();
    let (items, bad) = drain(&mut reader);

    let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["synthv-000000", "synthv-000001", "synthv-000009"]);
    let first = &items[0];
    assert_eq!(first.data_source, "synthv");
    assert_eq!(
        first.question,
        "What colour is the small square in picture 0?"
    );
    assert_eq!(first.options, ["red", "green", "blue", "yellow"]);
    assert_eq!(first.correct_option, Some(1));
    assert_eq!(first.answer, "green");
    assert_eq!(first.boxes.len(), 1);
    assert_eq!(first.boxes[0].bbox, [10.0, 12.0, 30.0, 28.0]);
    assert_eq!(first.category.as_deref(), Some("color"));
    assert_eq!(first.extra["difficulty"], 0);
    assert_eq!(first.extra.len(), 1);
    assert_eq!(first.position, Position::line(&path, 0, 1));
    let img = &first.images[0];
    assert_eq!((img.format(), img.width(), img.height()), ("png", 96, 64));
    assert!(img.origin().ends_with("synthv/images/000000.png"));

    // The answer given as a letter.
    assert_eq!(items[1].answer, "blue");
    assert_eq!(items[1].category.as_deref(), Some("count"));
    // answer_index and a list of boxes; the blank line 3 is not a row.
    assert_eq!(items[2].answer, "yellow");
    assert_eq!(items[2].answer_letter(), Some('D'));
    assert_eq!(items[2].boxes[0].bbox, [0.0, 0.0, 10.0, 10.0]);
    assert_eq!(items[2].position, Position::line(&path, 10, 12));

    let reported: Vec<_> = bad
        .iter()
        .map(|b| (b.position.row.unwrap(), b.position.line.unwrap(), b.reason))
        .collect();
    assert_eq!(
        reported,
        [
            (2, 4, SkipReason::MissingFile),
            (3, 5, SkipReason::InvalidValue),
            (4, 6, SkipReason::Malformed),
            (5, 7, SkipReason::MissingField),
            (6, 8, SkipReason::WrongType),
            (7, 9, SkipReason::BadImage),
            (8, 10, SkipReason::InvalidValue),
            (9, 11, SkipReason::MissingField),
        ]
    );
    let details: Vec<&str> = bad.iter().map(|b| b.detail.as_str()).collect();
    assert!(details[0].contains("images/absent.png"), "{}", details[0]);
    assert!(
        details[1].contains("outside the 96×64 image"),
        "{}",
        details[1]
    );
    assert!(details[2].contains("invalid JSON"), "{}", details[2]);
    assert!(details[3].contains("`question`"), "{}", details[3]);
    assert!(details[4].contains("`options`") && details[4].contains("a string"));
    assert!(details[5].contains("broken.png"), "{}", details[5]);
    assert!(details[6].contains("`purple`"), "{}", details[6]);
    assert!(details[7].contains("`bbox`"), "{}", details[7]);

    let s = reader.summary();
    assert_eq!((s.rows_read, s.items, s.skipped_total()), (11, 3, 8));
    assert_eq!(
        skipped(&reader),
        [
            (SkipReason::MissingField, 2),
            (SkipReason::WrongType, 1),
            (SkipReason::InvalidValue, 2),
            (SkipReason::BadImage, 1),
            (SkipReason::MissingFile, 1),
            (SkipReason::Malformed, 1),
        ]
    );
}

#[test]
fn the_generic_schema_is_lenient_about_boxes_and_options() {
    // The SynthV* file read as generic JSONL: the row without a box and the row whose box is
    // outside the image are accepted.
    let mut reader = JsonlReader::open(
        &fixture(SYNTHV),
        JsonlSchema::Generic,
        &LoadOptions::default(),
    )
    .unwrap();
    let (items, bad) = drain(&mut reader);
    assert_eq!(items.len(), 5);
    assert_eq!(bad.len(), 6);
    assert!(
        items
            .iter()
            .any(|i| i.id == "synthv-000008" && i.boxes.is_empty())
    );
    assert!(items.iter().all(|i| i.data_source == "synthv"));
}

/// Reading outside the data's folder, as this fixture does (`../synthv/images/…`), is allowed.
fn outside_allowed() -> LoadOptions {
    LoadOptions {
        allow_paths_outside_root: true,
        ..LoadOptions::default()
    }
}

#[test]
fn generic_jsonl_open_answers_multi_image_and_defaults() {
    let path = fixture("jsonl/generic_mini.jsonl");
    let mut reader = JsonlReader::open(&path, JsonlSchema::Generic, &outside_allowed()).unwrap();
    let (items, bad) = drain(&mut reader);
    assert_eq!(items.len(), 3);

    let open = &items[0];
    assert_eq!(open.id, "generic_mini/0");
    assert_eq!(open.data_source, "jsonl");
    assert!(open.options.is_empty() && open.correct_option.is_none());
    assert_eq!(open.answer, "a square");
    assert!(open.boxes.is_empty());

    let two = &items[1];
    assert_eq!(two.id, "17");
    assert_eq!(two.images.len(), 2);
    assert_eq!(two.answer, "second");
    assert_eq!(two.extra["source_url"], "local");

    let custom = &items[2];
    assert_eq!(custom.data_source, "custom");
    assert_eq!(custom.category.as_deref(), Some("where"));
    assert_eq!(custom.boxes[0].bbox, [1.0, 2.0, 3.0, 4.0]);

    let reported: Vec<_> = bad
        .iter()
        .map(|b| (b.position.line.unwrap(), b.reason))
        .collect();
    assert_eq!(
        reported,
        [(3, SkipReason::MissingField), (5, SkipReason::WrongType)]
    );
    assert!(bad[0].detail.contains("`image`"), "{}", bad[0]);
    assert!(bad[1].detail.contains("a list"), "{}", bad[1]);
}

#[test]
fn answer_rules() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("synthv/images/000000.png"),
        dir.path().join("i.png"),
    )
    .unwrap();
    let rows = [
        // An option literally called "B": the text wins over the letter.
        r#"{"question": "q", "image": "i.png", "options": ["A", "B"], "answer": "B"}"#,
        // answer_index and a consistent letter.
        r#"{"question": "q", "image": "i.png", "options": ["x", "y"], "answer_index": 1, "answer": "B"}"#,
        // answer_index out of range.
        r#"{"question": "q", "image": "i.png", "options": ["x", "y"], "answer_index": 2}"#,
        // answer and answer_index disagree.
        r#"{"question": "q", "image": "i.png", "options": ["x", "y"], "answer_index": 0, "answer": "y"}"#,
        // a single option.
        r#"{"question": "q", "image": "i.png", "options": ["x"], "answer": "x"}"#,
        // both image and images.
        r#"{"question": "q", "image": "i.png", "images": ["i.png"], "answer": "x"}"#,
        // an open question without an answer.
        r#"{"question": "q", "image": "i.png"}"#,
        // a numeric answer.
        r#"{"question": "q", "image": "i.png", "answer": 12}"#,
    ];
    let path = dir.path().join("rules.jsonl");
    std::fs::write(&path, rows.join("\n")).unwrap();
    let mut reader =
        JsonlReader::open(&path, JsonlSchema::Generic, &LoadOptions::default()).unwrap();
    let (items, bad) = drain(&mut reader);
    let got: Vec<_> = items
        .iter()
        .map(|i| (i.position.row.unwrap(), i.answer.as_str(), i.correct_option))
        .collect();
    assert_eq!(got, [(0, "B", Some(1)), (1, "y", Some(1)), (7, "12", None)]);
    let reported: Vec<_> = bad
        .iter()
        .map(|b| (b.position.row.unwrap(), b.reason))
        .collect();
    assert_eq!(
        reported,
        [
            (2, SkipReason::InvalidValue),
            (3, SkipReason::InvalidValue),
            (4, SkipReason::InvalidValue),
            (5, SkipReason::InvalidValue),
            (6, SkipReason::MissingField),
        ]
    );
}

#[test]
fn over_long_lines_are_skipped_and_a_folder_is_refused() {
    let opts = LoadOptions {
        max_row_bytes: 100,
        ..LoadOptions::default()
    };
    let mut reader = JsonlReader::open(&fixture(SYNTHV), JsonlSchema::SynthV, &opts).unwrap();
    let (items, bad) = drain(&mut reader);
    assert!(items.is_empty());
    // Every row but the 86-byte invalid-JSON one is over 100 bytes.
    let malformed = bad
        .iter()
        .filter(|b| b.detail.contains("over max-row-bytes"))
        .count();
    assert_eq!((bad.len(), malformed), (11, 10));

    let err = JsonlReader::open(
        &fixture("synthv"),
        JsonlSchema::SynthV,
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, DatasetError::Format { .. } | DatasetError::Io { .. }),
        "{err}"
    );
}

#[test]
fn spec_from_toml_opens_the_right_reader() {
    let spec: DatasetSpec = toml::from_str(&format!(
        "kind = \"synthv\"\npath = {:?}\n[options]\nimage-check = \"decode\"\nkeep-bad-rows = 2\n",
        fixture(SYNTHV)
    ))
    .unwrap();
    assert_eq!(spec.kind, DatasetKind::SynthV);
    let mut reader = spec.open().unwrap();
    let good: Vec<_> = reader.good_items().collect::<Result<_, _>>().unwrap();
    assert_eq!(good.len(), 3);
    assert!(good.iter().all(|i| i.images[0].is_decoded()));
    let s = reader.summary();
    assert_eq!(s.skipped_total(), 8);
    assert_eq!(s.bad_rows.len(), 2, "keep-bad-rows caps the kept reports");
}

/// By default a row reads only files under the data's folder: `..` above it and absolute paths
/// are refused by name (the rows are skipped, the rest read on), unless allowed.
#[test]
fn image_paths_outside_the_data_folder_are_refused_unless_allowed() {
    let (items, bad) = drain(
        &mut JsonlReader::open(
            &fixture("jsonl/generic_mini.jsonl"),
            JsonlSchema::Generic,
            &LoadOptions::default(),
        )
        .unwrap(),
    );
    assert!(items.is_empty(), "{items:?}");
    let outside: Vec<_> = bad
        .iter()
        .filter(|b| b.reason == SkipReason::InvalidValue)
        .collect();
    assert_eq!(outside.len(), 3, "{bad:?}");
    assert!(
        outside[0].detail.contains("../synthv/images/000000.png")
            && outside[0].detail.contains("climbs above it")
            && outside[0].detail.contains("allow-paths-outside-root"),
        "{}",
        outside[0]
    );

    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let image = elsewhere.path().join("secret.png");
    std::fs::copy(fixture("synthv/images/000000.png"), &image).unwrap();
    std::fs::create_dir(dir.path().join("images")).unwrap();
    std::fs::copy(
        fixture("synthv/images/000000.png"),
        dir.path().join("images/ok.png"),
    )
    .unwrap();
    let rows = [
        serde_json::json!({"question": "q", "answer": "a", "image": image}),
        serde_json::json!({"question": "q", "answer": "a", "image": "images/../images/ok.png"}),
    ];
    let index = dir.path().join("index.jsonl");
    let text: Vec<String> = rows.iter().map(ToString::to_string).collect();
    std::fs::write(&index, text.join("\n") + "\n").unwrap();
    let read = |options: &LoadOptions| {
        drain(&mut JsonlReader::open(&index, JsonlSchema::Generic, options).unwrap())
    };
    let (items, bad) = read(&LoadOptions::default());
    assert_eq!(items.len(), 1, "a `..` that stays inside is fine");
    assert_eq!(bad.len(), 1);
    assert!(bad[0].detail.contains("is absolute"), "{}", bad[0]);
    let (items, bad) = read(&outside_allowed());
    assert_eq!((items.len(), bad.len()), (2, 0), "{bad:?}");
}

/// An image file over `max-file-bytes` is refused without being read, naming the cap.
#[test]
fn image_files_over_the_size_cap_are_refused() {
    let mut options = outside_allowed();
    options.image_limits.max_file_bytes = 200;
    let (items, bad) =
        drain(&mut JsonlReader::open(&fixture(SYNTHV), JsonlSchema::SynthV, &options).unwrap());
    assert!(items.is_empty(), "the fixture's images are over 200 bytes");
    assert!(
        bad.iter().any(|b| b.reason == SkipReason::BadImage
            && b.detail.contains("over the limit of 200 (max-file-bytes)")),
        "{bad:?}"
    );
}
