//! Binary parsing of a GGUF file: header, metadata key/value pairs and tensor infos, with every
//! count, length, offset and size checked against the file before it is trusted. Nothing here
//! allocates more than the file could actually describe, and nothing panics on bad input.

use std::collections::{BTreeMap, HashMap};

use super::error::GgufError;
use super::types::GgmlType;
use super::value::GgufValue;
use super::GgufTensorInfo;

/// Alignment of the data section and of tensor offsets when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that overrides the alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// At most this many dimensions per tensor (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Arrays nested deeper than this are rejected (protects the stack from hostile files).
pub const MAX_ARRAY_NESTING: usize = 32;

/// Smallest possible encoding of one metadata entry: empty key (8) + type (4) + a u8 value (1).
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest possible encoding of one tensor info: empty name (8) + n_dims (4) + type (4) +
/// offset (8), with no dimensions.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// What [`parse`] found: everything but the bytes themselves.
#[derive(Debug)]
pub struct Parsed {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    pub index: HashMap<String, usize>,
    pub alignment: u64,
    pub data_offset: u64,
}

/// Parses and validates a whole GGUF file held in `bytes`.
pub fn parse(bytes: &[u8]) -> Result<Parsed, GgufError> {
    let mut cur = Cursor { bytes, pos: 0 };

    let magic = cur.take(4, &|| "magic".to_string())?;
    if magic != b"GGUF" {
        return Err(GgufError::BadMagic {
            found: magic.to_vec(),
        });
    }
    let version = cur.u32(&|| "version".to_string())?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let tensor_count = cur.count(MIN_TENSOR_INFO_BYTES, &|| "tensor count".to_string())?;
    let kv_count = cur.count(MIN_KV_BYTES, &|| "metadata entry count".to_string())?;

    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = cur.string(&|| format!("metadata entry {i}: key"))?;
        let what = || format!("metadata key `{key}`");
        let type_offset = cur.pos as u64;
        let ty = cur.u32(&what)?;
        let value = read_value(&mut cur, ty, type_offset, 0, &what)?;
        if metadata.contains_key(&key) {
            return Err(GgufError::DuplicateKey(key));
        }
        metadata.insert(key, value);
    }

    // Tensor infos, as stored; checked against the data section below.
    let mut tensors = Vec::with_capacity(tensor_count);
    let mut index = HashMap::with_capacity(tensor_count);
    for i in 0..tensor_count {
        let name = cur.string(&|| format!("tensor info {i}: name"))?;
        let what = || format!("tensor `{name}`");
        let n_dims = cur.u32(&|| format!("{}: number of dimensions", what()))?;
        if n_dims > MAX_DIMS {
            return Err(bad_tensor(
                &name,
                format!("{n_dims} dimensions (at most {MAX_DIMS} are supported)"),
            ));
        }
        let mut shape = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            let dim = cur.u64(&|| format!("{}: dimension {d}", what()))?;
            let dim = usize::try_from(dim)
                .ok()
                .filter(|&v| i64::try_from(v).is_ok())
                .ok_or_else(|| bad_tensor(&name, format!("dimension {d} is {dim}, too large")))?;
            shape.push(dim);
        }
        let type_id = cur.u32(&|| format!("{}: type", what()))?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownGgmlType {
            name: name.clone(),
            id: type_id,
        })?;
        let offset = cur.u64(&|| format!("{}: data offset", what()))?;
        if index.insert(name.clone(), i).is_some() {
            return Err(GgufError::DuplicateTensor(name));
        }
        tensors.push(GgufTensorInfo {
            name,
            shape,
            ggml_type,
            offset,
        });
    }

    let alignment = alignment(&metadata)?;
    let header_end = cur.pos as u64;
    let data_offset = header_end
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| GgufError::BadMetadata {
            key: ALIGNMENT_KEY.to_string(),
            detail: format!("alignment {alignment} overflows the data offset"),
        })?;
    let file_size = bytes.len() as u64;
    for t in &tensors {
        check_tensor(t, alignment, data_offset, file_size)?;
    }

    Ok(Parsed {
        version,
        metadata,
        tensors,
        index,
        alignment,
        data_offset,
    })
}

fn bad_tensor(name: &str, detail: String) -> GgufError {
    GgufError::BadTensor {
        name: name.to_string(),
        detail,
    }
}

/// `general.alignment`: a non-zero power of two that fits in a u32, or the default.
fn alignment(metadata: &BTreeMap<String, GgufValue>) -> Result<u64, GgufError> {
    let Some(value) = metadata.get(ALIGNMENT_KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let bad = |detail: String| GgufError::BadMetadata {
        key: ALIGNMENT_KEY.to_string(),
        detail,
    };
    let a = value.as_u64().ok_or_else(|| {
        bad(format!(
            "expected a uint32, found {} {value:?}",
            value.type_name()
        ))
    })?;
    if a == 0 || !a.is_power_of_two() || a > u64::from(u32::MAX) {
        return Err(bad(format!(
            "alignment {a} is not a power of two that fits in a uint32"
        )));
    }
    Ok(a)
}

/// Shape, block divisibility, offset alignment and data range of one tensor.
fn check_tensor(
    t: &GgufTensorInfo,
    alignment: u64,
    data_offset: u64,
    file_size: u64,
) -> Result<(), GgufError> {
    let ty = t.ggml_type;
    let n_elements = t
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| i64::try_from(n).is_ok())
        .ok_or_else(|| {
            bad_tensor(
                &t.name,
                format!("shape {:?} has too many elements", t.shape),
            )
        })?;
    let ne0 = t.shape.first().copied().unwrap_or(1);
    if ne0 % ty.block_size() != 0 {
        return Err(bad_tensor(
            &t.name,
            format!(
                "row length {ne0} (shape {:?}) is not a multiple of the {ty} block size {}",
                t.shape,
                ty.block_size()
            ),
        ));
    }
    let n_bytes = (n_elements / ty.block_size())
        .checked_mul(ty.type_size())
        .ok_or_else(|| bad_tensor(&t.name, format!("shape {:?} has too many bytes", t.shape)))?;
    if !t.offset.is_multiple_of(alignment) {
        return Err(bad_tensor(
            &t.name,
            format!(
                "data offset {} is not a multiple of the alignment {alignment}",
                t.offset
            ),
        ));
    }
    let start = data_offset.checked_add(t.offset);
    let end = start.and_then(|s| s.checked_add(n_bytes as u64));
    match (start, end) {
        (Some(_), Some(end)) if end <= file_size => Ok(()),
        (Some(start), Some(end)) => Err(bad_tensor(
            &t.name,
            format!("data range {start}..{end} lies outside the file (size {file_size})"),
        )),
        _ => Err(bad_tensor(
            &t.name,
            format!(
                "data offset {} + {n_bytes} bytes overflows (data section at {data_offset})",
                t.offset
            ),
        )),
    }
}

/// Smallest encoded size of one value of metadata type `ty`, or `None` for an unknown type.
fn min_value_bytes(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1, // uint8, int8, bool
        2 | 3 => 2,     // uint16, int16
        4..=6 => 4,     // uint32, int32, float32
        8 => 8,         // string: its length
        9 => 4 + 8,     // array: element type + count
        10..=12 => 8,   // uint64, int64, float64
        _ => return None,
    })
}

/// Reads one value of metadata type `ty` (whose id was read at `type_offset`).
fn read_value(
    cur: &mut Cursor<'_>,
    ty: u32,
    type_offset: u64,
    depth: usize,
    what: &dyn Fn() -> String,
) -> Result<GgufValue, GgufError> {
    Ok(match ty {
        0 => GgufValue::U8(cur.take_array::<1>(what)?[0]),
        1 => GgufValue::I8(cur.take_array::<1>(what)?[0] as i8),
        2 => GgufValue::U16(u16::from_le_bytes(cur.take_array(what)?)),
        3 => GgufValue::I16(i16::from_le_bytes(cur.take_array(what)?)),
        4 => GgufValue::U32(cur.u32(what)?),
        5 => GgufValue::I32(i32::from_le_bytes(cur.take_array(what)?)),
        6 => GgufValue::F32(f32::from_le_bytes(cur.take_array(what)?)),
        7 => {
            let offset = cur.pos as u64;
            match cur.take_array::<1>(what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => {
                    return Err(GgufError::BadMetadata {
                        key: what(),
                        detail: format!("bool at byte {offset} has value {b} (expected 0 or 1)"),
                    })
                }
            }
        }
        8 => GgufValue::String(cur.string(what)?),
        9 => {
            if depth >= MAX_ARRAY_NESTING {
                return Err(GgufError::NestingTooDeep {
                    what: what(),
                    limit: MAX_ARRAY_NESTING,
                });
            }
            let elem_offset = cur.pos as u64;
            let elem_ty = cur.u32(what)?;
            let min = min_value_bytes(elem_ty).ok_or_else(|| GgufError::UnknownValueType {
                what: what(),
                id: elem_ty,
                offset: elem_offset,
            })?;
            let count = cur.count(min, &|| format!("{}: array length", what()))?;
            let mut items = Vec::with_capacity(count);
            for _ in 0..count {
                items.push(read_value(cur, elem_ty, elem_offset, depth + 1, what)?);
            }
            GgufValue::Array(items)
        }
        10 => GgufValue::U64(cur.u64(what)?),
        11 => GgufValue::I64(i64::from_le_bytes(cur.take_array(what)?)),
        12 => GgufValue::F64(f64::from_le_bytes(cur.take_array(what)?)),
        _ => {
            return Err(GgufError::UnknownValueType {
                what: what(),
                id: ty,
                offset: type_offset,
            })
        }
    })
}

/// A read position in the file. `what` closures describe the item being read for error
/// messages; they run only when something is wrong.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                needed: n as u64,
                size: self.bytes.len() as u64,
            });
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn take_array<const N: usize>(
        &mut self,
        what: &dyn Fn() -> String,
    ) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.take_array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.take_array(what)?))
    }

    /// A u64 count of items that each take at least `min_item_bytes` bytes; rejected when the
    /// rest of the file could not hold them, so the result is safe to allocate for.
    fn count(
        &mut self,
        min_item_bytes: u64,
        what: &dyn Fn() -> String,
    ) -> Result<usize, GgufError> {
        let offset = self.pos as u64;
        let count = self.u64(what)?;
        let remaining = self.remaining() as u64;
        if count > remaining / min_item_bytes {
            return Err(GgufError::ImpossibleCount {
                what: what(),
                count,
                offset,
                remaining,
            });
        }
        // Fits: count <= remaining <= usize::MAX.
        Ok(count as usize)
    }

    /// A u64 length followed by that many bytes of UTF-8.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len_offset = self.pos as u64;
        let len = self.u64(what)?;
        let start = self.pos as u64;
        let bytes = match usize::try_from(len) {
            Ok(n) if n <= self.remaining() => self.take(n, what)?,
            _ => {
                return Err(GgufError::Truncated {
                    what: format!(
                        "{} (string of length {len} given at byte {len_offset})",
                        what()
                    ),
                    offset: start,
                    needed: len,
                    size: self.bytes.len() as u64,
                })
            }
        };
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::InvalidUtf8 {
            what: what(),
            offset: start,
        })
    }
}
