//! `misbehaving_tool`, a test-only plugin written with the safe `ToolImpl` API that misbehaves on
//! demand, to check the host survives: the call's `mode` argument picks a panic, an oversized
//! text or image, an error status, or a normal answer. Its configuration can make `create` fail.

use std::sync::atomic::{AtomicU64, Ordering};

use deepeyes_tools::abi::{
    CallError, ImageRef, Reply, RgbImage, ToolImpl, ToolSpec, Value, serde_json,
};

/// The tool; counts its calls so tests can see when the host recreated the instance.
#[derive(Debug)]
pub struct Misbehaving {
    calls: AtomicU64,
    greeting: String,
}

impl ToolImpl for Misbehaving {
    const NAME: &'static std::ffi::CStr = c"misbehaving_tool";

    fn spec() -> ToolSpec {
        ToolSpec {
            name: "misbehaving_tool".into(),
            description: "Misbehaves as asked (test only).".into(),
            parameters: serde_json::json!({
                "type": "object",
                "properties": {
                    "mode": {"type": "string", "enum": ["ok", "panic", "huge-text", "huge-image", "fail", "bad-args", "unsupported", "echo-image"]},
                    "bytes": {"type": "integer"},
                    "side": {"type": "integer"}
                },
                "required": ["mode"]
            }),
        }
    }

    fn new(config: &Value) -> Result<Self, String> {
        if config.get("fail-create").and_then(Value::as_bool) == Some(true) {
            return Err("refusing to start: fail-create is set".into());
        }
        if config.get("panic-create").and_then(Value::as_bool) == Some(true) {
            panic!("panicking in create as configured");
        }
        let greeting = config
            .get("greeting")
            .and_then(Value::as_str)
            .unwrap_or("ok")
            .to_string();
        Ok(Self {
            calls: AtomicU64::new(0),
            greeting,
        })
    }

    fn call(&self, args: &Value, image: Option<ImageRef<'_>>) -> Result<Reply, CallError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let size =
            |key: &str, default: u64| args.get(key).and_then(Value::as_u64).unwrap_or(default);
        match args.get("mode").and_then(Value::as_str) {
            Some("ok") => Ok(Reply::text(format!(
                "{} (call {n} of this instance)",
                self.greeting
            ))),
            Some("panic") => panic!("deliberate panic in misbehaving_tool"),
            Some("huge-text") => Ok(Reply::text("x".repeat(size("bytes", 2 << 20) as usize))),
            Some("huge-image") => {
                let side = size("side", 64) as u32;
                Ok(Reply::image(RgbImage::new(side, side)))
            }
            Some("fail") => Err(CallError::Failed("deliberate failure".into())),
            Some("bad-args") => Err(CallError::BadArguments(
                "this mode always refuses its arguments".into(),
            )),
            Some("unsupported") => Err(CallError::Unsupported("nothing is supported here".into())),
            Some("echo-image") => {
                let image = image.ok_or_else(|| CallError::Failed("no input image".into()))?;
                Ok(Reply::image(image.to_rgb_image()).with_text(format!(
                    "{}x{} first pixel {:?}",
                    image.width(),
                    image.height(),
                    image.pixel(0, 0)
                )))
            }
            _ => Err(CallError::BadArguments(format!("unknown mode in {args}"))),
        }
    }
}

deepeyes_tools::export_tool!(Misbehaving);
