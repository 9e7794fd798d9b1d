//! Typed reads of a GGUF file's metadata (`tokenizer.ggml.*` and the like): each helper
//! gives `None` for a missing key and an error naming the key and both types for a value
//! of another type.

use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};

fn value_type_name(v: &Value) -> &'static str {
    match v {
        Value::U8(_) => "u8",
        Value::I8(_) => "i8",
        Value::U16(_) => "u16",
        Value::I16(_) => "i16",
        Value::U32(_) => "u32",
        Value::I32(_) => "i32",
        Value::U64(_) => "u64",
        Value::I64(_) => "i64",
        Value::F32(_) => "f32",
        Value::F64(_) => "f64",
        Value::Bool(_) => "bool",
        Value::String(_) => "string",
        Value::Array(_) => "array",
    }
}

fn value_as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::U8(x) => Some(i64::from(*x)),
        Value::I8(x) => Some(i64::from(*x)),
        Value::U16(x) => Some(i64::from(*x)),
        Value::I16(x) => Some(i64::from(*x)),
        Value::U32(x) => Some(i64::from(*x)),
        Value::I32(x) => Some(i64::from(*x)),
        Value::U64(x) => i64::try_from(*x).ok(),
        Value::I64(x) => Some(*x),
        _ => None,
    }
}

fn wrong_type(key: &str, want: &str, v: &Value) -> Error {
    Error::Model(format!(
        "GGUF metadata {key} should be {want}, found {}",
        value_type_name(v)
    ))
}

pub(crate) fn meta_str<'a>(c: &'a Content, key: &str) -> Result<Option<&'a str>> {
    match c.metadata.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(v) => Err(wrong_type(key, "a string", v)),
    }
}

pub(crate) fn meta_bool(c: &Content, key: &str) -> Result<Option<bool>> {
    match c.metadata.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => value_as_i64(v)
            .map(|x| Some(x != 0))
            .ok_or_else(|| wrong_type(key, "a bool", v)),
    }
}

pub(crate) fn meta_u32(c: &Content, key: &str) -> Result<Option<u32>> {
    match c.metadata.get(key) {
        None => Ok(None),
        Some(v) => {
            let x = value_as_i64(v).ok_or_else(|| wrong_type(key, "an integer", v))?;
            u32::try_from(x)
                .map(Some)
                .map_err(|_| Error::Model(format!("GGUF metadata {key} = {x} is not a valid id")))
        }
    }
}

pub(crate) fn meta_str_array<'a>(c: &'a Content, key: &str) -> Result<Vec<&'a str>> {
    let v = c.metadata.get(key).ok_or_else(|| {
        Error::Model(format!(
            "GGUF has no {key}: its tokenizer is incomplete; pass a tokenizer.json"
        ))
    })?;
    let Value::Array(items) = v else {
        return Err(wrong_type(key, "an array of strings", v));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, x)| match x {
            Value::String(s) => Ok(s.as_str()),
            other => Err(Error::Model(format!(
                "GGUF metadata {key}[{i}] should be a string, found {}",
                value_type_name(other)
            ))),
        })
        .collect()
}

pub(crate) fn meta_int_array(c: &Content, key: &str) -> Result<Option<Vec<i64>>> {
    let Some(v) = c.metadata.get(key) else {
        return Ok(None);
    };
    let Value::Array(items) = v else {
        return Err(wrong_type(key, "an array of integers", v));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, x)| {
            value_as_i64(x).ok_or_else(|| {
                Error::Model(format!(
                    "GGUF metadata {key}[{i}] should be an integer, found {}",
                    value_type_name(x)
                ))
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}
