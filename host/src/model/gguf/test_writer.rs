//! Test-only GGUF writer: builds small, valid GGUF files in memory (which tests then corrupt).

use super::value::GgufValue;

/// GGUF metadata value type id of `v`.
pub fn value_type_id(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

pub fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s);
}

/// The payload of `v` (without its type id). An array's element type is that of its first
/// element (uint8 when empty).
pub fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => put_str(out, s.as_bytes()),
        GgufValue::Array(items) => {
            put_u32(out, items.first().map_or(0, value_type_id));
            put_u64(out, items.len() as u64);
            for item in items {
                put_value(out, item);
            }
        }
    }
}

struct Tensor {
    name: String,
    shape: Vec<u64>,
    type_id: u32,
    data: Vec<u8>,
    offset: Option<u64>,
}

/// Builds a GGUF file: header, metadata, tensor infos, padding, then each tensor's data padded
/// to the alignment (the last one unpadded, so the file ends with tensor data).
pub struct GgufBuilder {
    version: u32,
    kvs: Vec<(String, GgufValue)>,
    tensors: Vec<Tensor>,
}

impl GgufBuilder {
    pub fn new() -> Self {
        GgufBuilder {
            version: 3,
            kvs: Vec::new(),
            tensors: Vec::new(),
        }
    }

    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    pub fn kv(mut self, key: &str, value: GgufValue) -> Self {
        self.kvs.push((key.to_string(), value));
        self
    }

    /// A tensor with `data` placed at the next aligned offset.
    pub fn tensor(mut self, name: &str, shape: &[u64], type_id: u32, data: Vec<u8>) -> Self {
        self.tensors.push(Tensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            type_id,
            data,
            offset: None,
        });
        self
    }

    /// Overrides the offset written in the last tensor's info (its data stays where it is).
    pub fn with_offset(mut self, offset: u64) -> Self {
        self.tensors.last_mut().expect("a tensor").offset = Some(offset);
        self
    }

    fn alignment(&self) -> u64 {
        self.kvs
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .filter(|a| a.is_power_of_two())
            .unwrap_or(32)
    }

    pub fn build(&self) -> Vec<u8> {
        let align = self.alignment() as usize;
        let pad = |out: &mut Vec<u8>| out.resize(out.len().next_multiple_of(align), 0);

        let mut out = b"GGUF".to_vec();
        put_u32(&mut out, self.version);
        put_u64(&mut out, self.tensors.len() as u64);
        put_u64(&mut out, self.kvs.len() as u64);
        for (k, v) in &self.kvs {
            put_str(&mut out, k.as_bytes());
            put_u32(&mut out, value_type_id(v));
            put_value(&mut out, v);
        }
        let mut next = 0u64;
        for t in &self.tensors {
            put_str(&mut out, t.name.as_bytes());
            put_u32(&mut out, t.shape.len() as u32);
            for &d in &t.shape {
                put_u64(&mut out, d);
            }
            put_u32(&mut out, t.type_id);
            put_u64(&mut out, t.offset.unwrap_or(next));
            next = (next + t.data.len() as u64).next_multiple_of(align as u64);
        }
        pad(&mut out);
        for (i, t) in self.tensors.iter().enumerate() {
            out.extend_from_slice(&t.data);
            if i + 1 < self.tensors.len() {
                pad(&mut out);
            }
        }
        out
    }
}
