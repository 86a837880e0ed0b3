//! `deepeyes tools list|call`, run as the built binary.

use std::path::Path;
use std::process::{Command, Output};

use deepeyes_core::{Image, ImageLimits};

fn deepeyes(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepeyes"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("running deepeyes")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("UTF-8 stdout")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A 640×480 PNG with distinct pixels, and its decoded image.
fn test_png(dir: &Path) -> (std::path::PathBuf, Image) {
    let mut raw = Vec::with_capacity(640 * 480 * 3);
    for y in 0..480u32 {
        for x in 0..640u32 {
            raw.extend_from_slice(&[(x % 256) as u8, (y % 256) as u8, ((x / 3 + y) % 256) as u8]);
        }
    }
    let image = Image::from_raw(640, 480, raw).unwrap();
    let path = dir.join("input.png");
    image.save_png(&path).unwrap();
    (path, image)
}

#[test]
fn tools_list_shows_built_ins() {
    let out = deepeyes(&["tools", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    insta::assert_snapshot!("tools_list", stdout(&out));
}

#[test]
fn tools_list_names_a_missing_plugin() {
    let out = deepeyes(&["tools", "list", "--plugin", "/no/such/libplugin.so"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("plugin /no/such/libplugin.so: file not found"),
        "{err}"
    );
}

#[test]
fn zoom_in_call_writes_the_crop_of_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let (input, image) = test_png(dir.path());
    let crop_path = dir.path().join("crop.png");
    let out = deepeyes(&[
        "tools",
        "call",
        "image_zoom_in_tool",
        "--image",
        input.to_str().unwrap(),
        "--args",
        r#"{"bbox_2d": [100.5, 50, 300.5, 200], "label": "x"}"#,
        "--out",
        crop_path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // round(100.5) = 100, round(300.5) = 300 (half to even, as Pillow).
    assert_eq!(
        stdout(&out),
        "{\"ok\":true,\"text\":null,\"images\":[{\"width\":200,\"height\":150}]}\n"
    );
    let crop = Image::open(&crop_path, &ImageLimits::default()).unwrap();
    assert_eq!((crop.width(), crop.height()), (200, 150));
    for (x, y) in [(0, 0), (199, 149), (57, 91)] {
        assert_eq!(
            crop.rgb().get_pixel(x, y),
            image.rgb().get_pixel(x + 100, y + 50)
        );
    }
}

#[test]
fn other_frames_select_the_same_region() {
    let dir = tempfile::tempdir().unwrap();
    let (input, _) = test_png(dir.path());
    for (frame, bbox) in [
        ("relative", "[250, 250, 750, 750]"),
        ("relative-unit", "[0.25, 0.25, 0.75, 0.75]"),
        // 640×480 is shown to the model as 644×476.
        ("resized", "[161, 119, 483, 357]"),
    ] {
        let out = deepeyes(&[
            "tools",
            "call",
            "image_zoom_in_tool",
            "--image",
            input.to_str().unwrap(),
            "--frame",
            frame,
            "--args",
            &format!("{{\"bbox_2d\": {bbox}}}"),
        ]);
        assert_eq!(out.status.code(), Some(0), "{frame}: {}", stderr(&out));
        assert_eq!(
            stdout(&out),
            "{\"ok\":true,\"text\":null,\"images\":[{\"width\":320,\"height\":240}]}\n",
            "{frame}"
        );
    }
    let out = deepeyes(&[
        "tools",
        "call",
        "image_zoom_in_tool",
        "--image",
        input.to_str().unwrap(),
        "--frame",
        "pixels",
        "--args",
        "{}",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown coordinate frame 'pixels'"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn rejected_call_exits_2_with_the_model_visible_error() {
    let dir = tempfile::tempdir().unwrap();
    let (input, _) = test_png(dir.path());
    let out_path = dir.path().join("never.png");
    let out = deepeyes(&[
        "tools",
        "call",
        "image_zoom_in_tool",
        "--image",
        input.to_str().unwrap(),
        "--args",
        r#"{"bbox_2d": [10, 10, 40, 300]}"#,
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    insta::assert_snapshot!("zoom_rejected", stdout(&out));
    assert!(!out_path.exists());
    for args in [
        r#"{"bbox_2d": [1, 2, 3]}"#,
        r#"{"bbox_2d": [1, 2, 3, "4"]}"#,
        r#"{"box": [1, 2, 3, 4]}"#,
    ] {
        let out = deepeyes(&[
            "tools",
            "call",
            "image_zoom_in_tool",
            "--image",
            input.to_str().unwrap(),
            "--args",
            args,
        ]);
        assert_eq!(out.status.code(), Some(2), "{args}");
        let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(json["ok"], false);
        assert!(
            json["error"].as_str().unwrap().contains("bbox_2d"),
            "{json}"
        );
    }
}

#[test]
fn rotate_call_returns_a_same_size_image() {
    let dir = tempfile::tempdir().unwrap();
    let (input, _) = test_png(dir.path());
    let out = deepeyes(&[
        "tools",
        "call",
        "image_rotate_tool",
        "--image",
        input.to_str().unwrap(),
        "--args",
        r#"{"angle": 30}"#,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "{\"ok\":true,\"text\":null,\"images\":[{\"width\":640,\"height\":480}]}\n"
    );
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn over_limit_image_is_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let (input, _) = test_png(dir.path());
    // Rewrite the IHDR to claim 20000×20000 (400 Mpx, over the 100 Mpx limit), checksum intact.
    let mut png = std::fs::read(&input).unwrap();
    png[16..20].copy_from_slice(&20000u32.to_be_bytes());
    png[20..24].copy_from_slice(&20000u32.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    let bomb = dir.path().join("bomb.png");
    std::fs::write(&bomb, png).unwrap();
    let out = deepeyes(&[
        "tools",
        "call",
        "image_zoom_in_tool",
        "--image",
        bomb.to_str().unwrap(),
        "--args",
        r#"{"bbox_2d": [0, 0, 100, 100]}"#,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("bomb.png") && err.contains("20000×20000"),
        "{err}"
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (input, _) = test_png(dir.path());
    let input = input.to_str().unwrap();
    let bytes = std::fs::read(input).unwrap();
    let cut = dir.path().join("cut.png");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "image_zoom_in_tool",
                "--image",
                cut.to_str().unwrap(),
                "--args",
                "{}",
            ],
            "cut.png",
        ),
        (
            &[
                "image_zoom_in_tool",
                "--image",
                "/no/such.png",
                "--args",
                "{}",
            ],
            "/no/such.png",
        ),
        (
            &["image_zoom_in_tool", "--image", input, "--args", "{bbox_2d"],
            "--args is not valid JSON",
        ),
        (
            &["no_such_tool", "--image", input, "--args", "{}"],
            "no tool named 'no_such_tool' (registered: image_zoom_in_tool, image_rotate_tool)",
        ),
    ];
    for (args, needle) in cases {
        let mut full = vec!["tools", "call"];
        full.extend_from_slice(args);
        let out = deepeyes(&full);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stdout(&out).is_empty());
        let err = stderr(&out);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
