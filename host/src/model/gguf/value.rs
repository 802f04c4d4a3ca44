//! [`GgufValue`]: one metadata value (scalar, string or possibly nested array), with lossless
//! accessors that convert between the integer and float types where that is exact enough.

/// A GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// Any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type whose value fits in an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Floats, and integers converted to `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            GgufValue::U64(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF name of the value's type (`"uint32"`, `"string"`, `"array"`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "uint8",
            GgufValue::I8(_) => "int8",
            GgufValue::U16(_) => "uint16",
            GgufValue::I16(_) => "int16",
            GgufValue::U32(_) => "uint32",
            GgufValue::I32(_) => "int32",
            GgufValue::U64(_) => "uint64",
            GgufValue::I64(_) => "int64",
            GgufValue::F32(_) => "float32",
            GgufValue::F64(_) => "float64",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::GgufValue as V;

    #[test]
    fn integer_accessors_respect_sign_and_range() {
        assert_eq!(V::U8(7).as_u64(), Some(7));
        assert_eq!(V::I32(-1).as_u64(), None);
        assert_eq!(V::I32(-1).as_i64(), Some(-1));
        assert_eq!(V::I64(5).as_u64(), Some(5));
        assert_eq!(V::U64(u64::MAX).as_u64(), Some(u64::MAX));
        assert_eq!(V::U64(u64::MAX).as_i64(), None);
        assert_eq!(V::F32(1.0).as_u64(), None);
        assert_eq!(V::Bool(true).as_u64(), None);
        assert_eq!(V::String("1".into()).as_i64(), None);
    }

    #[test]
    fn other_accessors() {
        assert_eq!(V::F32(0.5).as_f64(), Some(0.5));
        assert_eq!(V::U32(3).as_f64(), Some(3.0));
        assert_eq!(V::I8(-3).as_f64(), Some(-3.0));
        assert_eq!(V::Bool(false).as_bool(), Some(false));
        assert_eq!(V::U8(0).as_bool(), None);
        assert_eq!(V::String("x".into()).as_str(), Some("x"));
        let a = V::Array(vec![V::U8(1)]);
        assert_eq!(a.as_array().map(|a| a.len()), Some(1));
        assert_eq!(a.type_name(), "array");
        assert_eq!(V::F64(0.0).type_name(), "float64");
    }
}
