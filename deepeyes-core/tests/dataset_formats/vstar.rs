//! V* Bench folders.

use deepeyes_core::dataset::{
    DatasetError, GroundTruthBox, ItemReader, LoadOptions, Position, SkipReason, VStarReader,
};

use super::{drain, fixture, skipped};

#[test]
fn vstar_folder_yields_items_with_first_option_correct_and_boxes() {
    let root = fixture("vstar");
    let mut reader = VStarReader::open(&root, &LoadOptions::default()).unwrap();
    assert_eq!(reader.len_hint(), Some(7));
    let (items, bad) = drain(&mut reader);

    let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "direct_attributes/sa_10001",
            "direct_attributes/sa_10002",
            "relative_position/sa_20001"
        ]
    );
    let umbrella = &items[0];
    assert_eq!(umbrella.data_source, "vstar");
    assert_eq!(umbrella.category.as_deref(), Some("direct_attributes"));
    assert_eq!(umbrella.question, "What is the color of the umbrella?");
    assert_eq!(umbrella.options.len(), 4);
    assert_eq!(umbrella.correct_option, Some(0));
    assert_eq!(umbrella.answer_letter(), Some('A'));
    assert_eq!(umbrella.answer, "The color of the umbrella is red.");
    // [x, y, w, h] = [10, 8, 12, 9] becomes [x1, y1, x2, y2].
    assert_eq!(
        umbrella.boxes,
        [GroundTruthBox {
            bbox: [10.0, 8.0, 22.0, 17.0],
            label: Some("umbrella".into()),
            image: 0
        }]
    );
    assert_eq!(
        umbrella.position,
        Position::file(root.join("direct_attributes/sa_10001.json"))
    );
    let img = &umbrella.images[0];
    assert_eq!((img.format(), img.width(), img.height()), ("jpeg", 64, 48));
    assert!(umbrella.extra.is_empty());

    let spatial = &items[2];
    assert_eq!(spatial.category.as_deref(), Some("relative_position"));
    assert_eq!(spatial.options.len(), 2);
    let boxes: Vec<_> = spatial
        .boxes
        .iter()
        .map(|b| (b.bbox, b.label.as_deref()))
        .collect();
    assert_eq!(
        boxes,
        [
            ([2.0, 3.0, 12.0, 13.0], Some("cat")),
            ([40.0, 20.0, 52.0, 34.0], Some("dog"))
        ]
    );

    let reported: Vec<_> = bad
        .iter()
        .map(|b| {
            (
                b.position.file.strip_prefix(&root).unwrap().to_path_buf(),
                b.reason,
            )
        })
        .collect();
    assert_eq!(
        reported,
        [
            (
                "direct_attributes/sa_10003.json".into(),
                SkipReason::Malformed
            ),
            (
                "direct_attributes/sa_10004.json".into(),
                SkipReason::MissingField
            ),
            (
                "direct_attributes/sa_10005.jpg".into(),
                SkipReason::MissingFile
            ),
            (
                "relative_position/sa_20002.json".into(),
                SkipReason::BadImage
            ),
        ]
    );
    assert!(bad.iter().all(|b| b.position.row.is_none()));
    assert!(bad[1].detail.contains("`options`"), "{}", bad[1]);
    assert!(bad[2].detail.contains("sa_10005.json"), "{}", bad[2]);
    assert!(bad[3].detail.contains("sa_20002.jpg"), "{}", bad[3]);

    let s = reader.summary();
    assert_eq!((s.rows_read, s.items, s.skipped_total()), (7, 3, 4));
    assert_eq!(
        skipped(&reader),
        [
            (SkipReason::MissingField, 1),
            (SkipReason::BadImage, 1),
            (SkipReason::MissingFile, 1),
            (SkipReason::Malformed, 1),
        ]
    );
}

#[test]
fn a_single_category_folder_is_read_as_one_category() {
    let dir = fixture("vstar/relative_position");
    let mut reader = VStarReader::open(&dir, &LoadOptions::default()).unwrap();
    let (items, bad) = drain(&mut reader);
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].id, "relative_position/sa_20001");
    assert_eq!(bad.len(), 1);
}

#[test]
fn folders_without_annotations_and_plain_files_are_refused() {
    let empty = tempfile::tempdir().unwrap();
    std::fs::create_dir(empty.path().join("direct_attributes")).unwrap();
    let err = VStarReader::open(empty.path(), &LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("no V* annotation"), "{err}");
    let err = VStarReader::open(
        &fixture("vstar/direct_attributes/sa_10001.json"),
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, DatasetError::Format { .. }), "{err}");
    assert!(err.to_string().contains("not a folder"), "{err}");
    let err = VStarReader::open(&fixture("vstar-absent"), &LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("no such folder"), "{err}");
}

#[test]
fn box_format_errors_name_the_box() {
    let dir = tempfile::tempdir().unwrap();
    let cat = dir.path().join("direct_attributes");
    std::fs::create_dir(&cat).unwrap();
    std::fs::copy(
        fixture("vstar/direct_attributes/sa_10001.jpg"),
        cat.join("a.jpg"),
    )
    .unwrap();
    std::fs::write(
        cat.join("a.json"),
        r#"{"question": "q?", "options": ["x", "y"], "bbox": [[1, 2, 3, 4], [5, 5, 0, 2]]}"#,
    )
    .unwrap();
    // A flat single box is accepted too.
    std::fs::copy(cat.join("a.jpg"), cat.join("b.jpg")).unwrap();
    std::fs::write(
        cat.join("b.json"),
        r#"{"question": "q?", "options": ["x", "y"], "bbox": [1, 2, 3, 4], "note": 1}"#,
    )
    .unwrap();
    let mut reader = VStarReader::open(dir.path(), &LoadOptions::default()).unwrap();
    let (items, bad) = drain(&mut reader);
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].reason, SkipReason::InvalidValue);
    assert!(bad[0].detail.contains("bbox[1]"), "{}", bad[0]);
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].boxes[0].bbox, [1.0, 2.0, 4.0, 6.0]);
    assert_eq!(items[0].extra["note"], 1);
}
