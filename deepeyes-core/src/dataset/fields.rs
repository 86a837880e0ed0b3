//! Typed access to the fields of one JSON row, with errors that name the field and the row.

use serde_json::{Map, Value};

use super::item::{GroundTruthBox, Position};
use super::report::{BadRow, SkipReason};

/// One JSON object being turned into an item. Every accessor returns a [`BadRow`] that names
/// the field (with `prefix`, e.g. `reward_model.`) and the row.
pub(crate) struct Fields<'a> {
    obj: &'a Map<String, Value>,
    position: &'a Position,
    prefix: &'a str,
}

/// JSON's name for the type of `v`, for error messages.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl<'a> Fields<'a> {
    pub(crate) fn new(obj: &'a Map<String, Value>, position: &'a Position) -> Self {
        Self {
            obj,
            position,
            prefix: "",
        }
    }

    /// The fields of the nested object `key`, if present and not null.
    #[cfg_attr(not(feature = "parquet"), allow(dead_code))]
    pub(crate) fn object(&self, key: &str, prefix: &'a str) -> Result<Option<Fields<'a>>, BadRow> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(obj)) => Ok(Some(Fields {
                obj,
                position: self.position,
                prefix,
            })),
            Some(other) => Err(self.wrong_type(key, "an object", other)),
        }
    }

    pub(crate) fn bad(&self, reason: SkipReason, detail: impl Into<String>) -> BadRow {
        BadRow::new(self.position.clone(), reason, detail)
    }

    fn name(&self, key: &str) -> String {
        format!("`{}{key}`", self.prefix)
    }

    pub(crate) fn missing(&self, key: &str) -> BadRow {
        self.bad(
            SkipReason::MissingField,
            format!("field {} is missing", self.name(key)),
        )
    }

    pub(crate) fn wrong_type(&self, key: &str, expected: &str, got: &Value) -> BadRow {
        self.bad(
            SkipReason::WrongType,
            format!(
                "field {} should be {expected}, got {}",
                self.name(key),
                type_name(got)
            ),
        )
    }

    pub(crate) fn invalid(&self, key: &str, why: impl std::fmt::Display) -> BadRow {
        self.bad(
            SkipReason::InvalidValue,
            format!("field {}: {why}", self.name(key)),
        )
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    /// A non-empty string.
    pub(crate) fn req_str(&self, key: &str) -> Result<String, BadRow> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }

    /// A string if present; an empty or blank string counts as absent.
    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<String>, BadRow> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.wrong_type(key, "a string", other)),
        }
    }

    /// A string or a number, as text (ids, indices, ground truths such as `42`).
    pub(crate) fn opt_text(&self, key: &str) -> Result<Option<String>, BadRow> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(Value::Bool(b)) => Ok(Some(b.to_string())),
            Some(other) => Err(self.wrong_type(key, "a string or a number", other)),
        }
    }

    /// A list of strings (options), if present.
    pub(crate) fn opt_str_list(&self, key: &str) -> Result<Option<Vec<String>>, BadRow> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let Value::Array(items) = v else {
            return Err(self.wrong_type(key, "a list of strings", v));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                other => Err(self.wrong_type(&format!("{key}[{i}]"), "a string", other)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// A list of 4 finite numbers.
    pub(crate) fn four_numbers(&self, key: &str, v: &Value) -> Result<[f64; 4], BadRow> {
        let Value::Array(items) = v else {
            return Err(self.wrong_type(key, "a list of 4 numbers", v));
        };
        if items.len() != 4 {
            return Err(self.invalid(key, format!("expected 4 numbers, got {}", items.len())));
        }
        let mut out = [0.0; 4];
        for (slot, item) in out.iter_mut().zip(items) {
            match item.as_f64() {
                Some(x) if x.is_finite() => *slot = x,
                _ => return Err(self.wrong_type(key, "a list of 4 numbers", v)),
            }
        }
        Ok(out)
    }

    /// A `[x1, y1, x2, y2]` box with positive area.
    pub(crate) fn xyxy(&self, key: &str, v: &Value) -> Result<[f64; 4], BadRow> {
        let b = self.four_numbers(key, v)?;
        if b[2] <= b[0] || b[3] <= b[1] {
            return Err(self.invalid(
                key,
                format!("box {b:?} is not [x1, y1, x2, y2] with x1 < x2 and y1 < y2"),
            ));
        }
        Ok(b)
    }

    /// The boxes of `bbox` (one box) and/or `bboxes` (a list of boxes), all in image 0.
    pub(crate) fn boxes(&self) -> Result<Vec<GroundTruthBox>, BadRow> {
        let mut out = Vec::new();
        if let Some(v) = self.get("bbox") {
            out.push(GroundTruthBox {
                bbox: self.xyxy("bbox", v)?,
                label: None,
                image: 0,
            });
        }
        if let Some(v) = self.get("bboxes") {
            let Value::Array(list) = v else {
                return Err(self.wrong_type("bboxes", "a list of boxes", v));
            };
            for (i, b) in list.iter().enumerate() {
                out.push(GroundTruthBox {
                    bbox: self.xyxy(&format!("bboxes[{i}]"), b)?,
                    label: None,
                    image: 0,
                });
            }
        }
        Ok(out)
    }

    /// Every field not in `used`, for [`Item::extra`](super::Item::extra).
    pub(crate) fn rest(&self, used: &[&str]) -> Map<String, Value> {
        self.obj
            .iter()
            .filter(|(k, _)| !used.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with<T>(v: Value, f: impl FnOnce(&Fields<'_>) -> T) -> T {
        let pos = Position::line("x.jsonl", 0, 1);
        let Value::Object(obj) = v else { panic!() };
        f(&Fields::new(&obj, &pos))
    }

    #[test]
    fn strings_and_types() {
        with(json!({"a": "x", "b": 3, "c": "  ", "d": null}), |f| {
            assert_eq!(f.req_str("a").unwrap(), "x");
            let e = f.req_str("b").unwrap_err();
            assert_eq!(e.reason, SkipReason::WrongType);
            assert!(
                e.detail.contains("`b`") && e.detail.contains("a number"),
                "{e}"
            );
            assert_eq!(f.req_str("c").unwrap_err().reason, SkipReason::MissingField);
            assert_eq!(f.req_str("d").unwrap_err().reason, SkipReason::MissingField);
            assert_eq!(f.opt_text("b").unwrap().as_deref(), Some("3"));
        });
    }

    #[test]
    fn boxes_are_checked() {
        with(
            json!({"bbox": [1, 2, 3, 4], "bboxes": [[0, 0, 5, 5]]}),
            |f| {
                let b = f.boxes().unwrap();
                assert_eq!(b.len(), 2);
                assert_eq!(b[0].bbox, [1.0, 2.0, 3.0, 4.0]);
            },
        );
        with(json!({"bbox": [3, 2, 1, 4]}), |f| {
            assert_eq!(f.boxes().unwrap_err().reason, SkipReason::InvalidValue);
        });
        with(json!({"bbox": [1, 2, 3]}), |f| {
            assert_eq!(f.boxes().unwrap_err().reason, SkipReason::InvalidValue);
        });
        with(json!({"bbox": "1,2,3,4"}), |f| {
            assert_eq!(f.boxes().unwrap_err().reason, SkipReason::WrongType);
        });
        with(json!({"bboxes": [[0, 0, "a", 1]]}), |f| {
            let e = f.boxes().unwrap_err();
            assert!(e.detail.contains("bboxes[0]"), "{e}");
        });
    }
}
