//! Tests of opening GGUF files: round trips through the test writer, and every kind of corrupt
//! or truncated input giving a `GgufError` (never a panic).

use super::test_writer::{put_str, put_u32, put_u64, GgufBuilder};
use super::{GgmlType, GgufError, GgufFile, GgufValue as V};

fn f16_bytes(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_bits().to_le_bytes()
}

fn f32_data(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Two Q8_0 blocks: d = 0.5 then d = 0.25, quants -16..16.
fn q8_0_data() -> Vec<u8> {
    let mut out = Vec::new();
    for d in [0.5f32, 0.25] {
        out.extend_from_slice(&f16_bytes(d));
        out.extend((-16i8..16).map(|q| q as u8));
    }
    out
}

fn sample() -> GgufBuilder {
    GgufBuilder::new()
        .kv("general.architecture", V::String("llama".into()))
        .kv("llama.block_count", V::U32(30))
        .kv("t.u8", V::U8(200))
        .kv("t.i8", V::I8(-5))
        .kv("t.u16", V::U16(60000))
        .kv("t.i16", V::I16(-30000))
        .kv("t.i32", V::I32(-7))
        .kv("t.u64", V::U64(1 << 40))
        .kv("t.i64", V::I64(-(1 << 40)))
        .kv("t.f32", V::F32(1e-5))
        .kv("t.f64", V::F64(0.125))
        .kv("t.bool", V::Bool(true))
        .kv("t.unicode", V::String("héllo ✓".into()))
        .kv(
            "tokenizer.ggml.tokens",
            V::Array(vec![
                V::String("a".into()),
                V::String("<s>".into()),
                V::String("".into()),
            ]),
        )
        .kv(
            "tokenizer.ggml.scores",
            V::Array(vec![V::F32(0.5), V::F32(-1.0)]),
        )
        .kv(
            "tokenizer.ggml.token_type",
            V::Array(vec![V::I32(1), V::I32(3)]),
        )
        .kv(
            "t.nested",
            V::Array(vec![
                V::Array(vec![V::I32(1), V::I32(-2)]),
                V::Array(vec![]),
            ]),
        )
        .tensor(
            "w.f32",
            &[3, 2],
            0,
            f32_data(&[1.0, -2.0, 3.5, 0.0, 1e-3, -7.25]),
        )
        .tensor("w.q8", &[32, 2], 8, q8_0_data())
}

fn open_err(bytes: Vec<u8>) -> GgufError {
    match GgufFile::from_bytes(bytes) {
        Ok(f) => panic!("expected an error, opened {f:?}"),
        Err(e) => e,
    }
}

/// Replaces the last occurrence of `needle` in `bytes` with `replacement` (same length).
fn patch(bytes: &mut [u8], needle: &[u8], replacement: &[u8]) {
    assert_eq!(needle.len(), replacement.len());
    let at = bytes
        .windows(needle.len())
        .rposition(|w| w == needle)
        .expect("needle present");
    bytes[at..at + needle.len()].copy_from_slice(replacement);
}

#[test]
fn round_trip_metadata_tensors_and_data() {
    let f = GgufFile::from_bytes(sample().build()).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.data_offset() % 32, 0);
    assert_eq!(f.metadata().len(), 17);
    assert_eq!(f.get_str("general.architecture"), Some("llama"));
    assert_eq!(f.get_u64("llama.block_count"), Some(30));
    assert_eq!(f.get("t.u8"), Some(&V::U8(200)));
    assert_eq!(f.get("t.i8"), Some(&V::I8(-5)));
    assert_eq!(f.get("t.u16"), Some(&V::U16(60000)));
    assert_eq!(f.get("t.i16"), Some(&V::I16(-30000)));
    assert_eq!(f.get_i64("t.i32"), Some(-7));
    assert_eq!(f.get_u64("t.i32"), None);
    assert_eq!(f.get_u64("t.u64"), Some(1 << 40));
    assert_eq!(f.get_i64("t.i64"), Some(-(1 << 40)));
    assert_eq!(f.get_f32("t.f32"), Some(1e-5));
    assert_eq!(f.get_f64("t.f64"), Some(0.125));
    assert_eq!(f.get_bool("t.bool"), Some(true));
    assert_eq!(f.get_str("t.unicode"), Some("héllo ✓"));
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens"),
        Some(vec!["a", "<s>", ""])
    );
    assert_eq!(
        f.get_f32_array("tokenizer.ggml.scores"),
        Some(vec![0.5, -1.0])
    );
    assert_eq!(
        f.get_i64_array("tokenizer.ggml.token_type"),
        Some(vec![1, 3])
    );
    assert_eq!(f.get_str_array("tokenizer.ggml.scores"), None);
    assert_eq!(
        f.get("t.nested"),
        Some(&V::Array(vec![
            V::Array(vec![V::I32(1), V::I32(-2)]),
            V::Array(vec![])
        ]))
    );
    assert_eq!(f.get("missing"), None);

    let names: Vec<_> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["w.f32", "w.q8"]);
    let t = f.tensor("w.f32").unwrap();
    assert_eq!(
        (t.shape.clone(), t.ggml_type, t.offset),
        (vec![3, 2], GgmlType::F32, 0)
    );
    assert_eq!((t.n_elements(), t.n_bytes()), (6, 24));
    assert_eq!(
        f.tensor_data(t),
        &f32_data(&[1.0, -2.0, 3.5, 0.0, 1e-3, -7.25])[..]
    );
    assert_eq!(
        f.dequantize("w.f32").unwrap(),
        [1.0, -2.0, 3.5, 0.0, 1e-3, -7.25]
    );

    let q = f.tensor("w.q8").unwrap();
    assert_eq!(
        (q.ggml_type, q.offset, q.n_elements(), q.n_bytes()),
        (GgmlType::Q8_0, 32, 64, 68)
    );
    assert_eq!(f.tensor_data(q), &q8_0_data()[..]);
    let expected: Vec<f32> = [0.5f32, 0.25]
        .iter()
        .flat_map(|&d| (-16..16).map(move |q| q as f32 * d))
        .collect();
    assert_eq!(f.dequantize("w.q8").unwrap(), expected);

    assert!(matches!(f.dequantize("nope"), Err(GgufError::TensorNotFound(n)) if n == "nope"));
    assert!(f.tensor("nope").is_none());
}

#[test]
fn open_memory_maps_the_same_file() {
    let bytes = sample().build();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let mapped = GgufFile::open(&path).unwrap();
    let owned = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(mapped.metadata(), owned.metadata());
    assert_eq!(mapped.tensors(), owned.tensors());
    for t in mapped.tensors() {
        assert_eq!(mapped.tensor_data(t), owned.tensor_data(t));
    }

    let missing = dir.path().join("missing.gguf");
    let e = GgufFile::open(&missing).unwrap_err();
    assert!(matches!(e, GgufError::Io { .. }), "{e}");
    assert!(e.to_string().contains("missing.gguf"), "{e}");

    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let e = GgufFile::open(&empty).unwrap_err();
    assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
}

#[test]
fn version_2_is_read_and_1_and_4_are_unsupported() {
    let f = GgufFile::from_bytes(sample().version(2).build()).unwrap();
    assert_eq!(f.version(), 2);
    for v in [0, 1, 4, 0x0300_0000] {
        let e = open_err(sample().version(v).build());
        assert!(
            matches!(e, GgufError::UnsupportedVersion(x) if x == v),
            "{e}"
        );
        assert!(e.to_string().contains("unsupported GGUF version"), "{e}");
    }
}

#[test]
fn bad_magic() {
    let mut bytes = sample().build();
    bytes[..4].copy_from_slice(b"GGML");
    let e = open_err(bytes);
    assert!(matches!(e, GgufError::BadMagic { .. }), "{e}");
    assert!(e.to_string().contains("not a GGUF file"), "{e}");
}

#[test]
fn no_tensors_and_no_metadata() {
    let f = GgufFile::from_bytes(GgufBuilder::new().build()).unwrap();
    assert!(f.tensors().is_empty() && f.metadata().is_empty());
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample().build();
    for cut in 0..bytes.len() {
        let r = GgufFile::from_bytes(bytes[..cut].to_vec());
        assert!(r.is_err(), "cut at {cut} of {} opened", bytes.len());
    }
}

#[test]
fn truncation_errors_say_where() {
    let bytes = sample().build();
    let f = GgufFile::from_bytes(bytes.clone()).unwrap();
    let data_offset = f.data_offset() as usize;

    // In the header.
    let e = open_err(bytes[..10].to_vec());
    assert!(
        matches!(&e, GgufError::Truncated { what, .. } if what == "tensor count"),
        "{e}"
    );
    // In the metadata, or at least its count (17 entries cannot fit in 42 bytes).
    let e = open_err(bytes[..66].to_vec());
    assert!(
        matches!(e, GgufError::ImpossibleCount { count: 17, .. }),
        "{e}"
    );
    let at = bytes
        .windows(6)
        .position(|w| w == "héllo".as_bytes())
        .unwrap();
    let e = open_err(bytes[..at + 2].to_vec());
    assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("metadata key `t.unicode`"), "{e}");
    // In the tensor infos.
    let at = bytes
        .windows(5)
        .position(|w| w == b"w.q8\0")
        .unwrap_or_else(|| bytes.windows(4).rposition(|w| w == b"w.q8").unwrap());
    let e = open_err(bytes[..at + 6].to_vec());
    assert!(e.to_string().contains("tensor `w.q8`"), "{e}");
    // In the data section.
    let e = open_err(bytes[..bytes.len() - 1].to_vec());
    assert_eq!(
        e.to_string(),
        format!(
            "tensor `w.q8`: data range {}..{} lies outside the file (size {})",
            data_offset + 32,
            data_offset + 32 + 68,
            bytes.len() - 1
        )
    );
    let e = open_err(bytes[..data_offset].to_vec());
    assert!(e.to_string().contains("tensor `w.f32`: data range"), "{e}");
}

#[test]
fn absurd_counts_are_rejected_before_allocating() {
    // Tensor count, then metadata count (header bytes 8..16 and 16..24).
    for (range, what) in [(8..16, "tensor count"), (16..24, "metadata entry count")] {
        for count in [u64::MAX, 1 << 40, 1_000_000] {
            let mut bytes = sample().build();
            bytes[range.clone()].copy_from_slice(&count.to_le_bytes());
            let e = open_err(bytes);
            assert!(
                matches!(&e, GgufError::ImpossibleCount { what: w, count: c, .. } if w == what && *c == count),
                "{e}"
            );
        }
    }

    // An array length.
    let mut bytes = GgufBuilder::new()
        .kv("arr", V::Array(vec![V::U32(7), V::U32(8)]))
        .build();
    let mut needle = 4u32.to_le_bytes().to_vec(); // element type uint32
    needle.extend_from_slice(&2u64.to_le_bytes());
    let mut replacement = 4u32.to_le_bytes().to_vec();
    replacement.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
    patch(&mut bytes, &needle, &replacement);
    let e = open_err(bytes);
    assert!(matches!(e, GgufError::ImpossibleCount { .. }), "{e}");
    assert!(
        e.to_string().contains("metadata key `arr`: array length"),
        "{e}"
    );

    // A string length.
    let mut bytes = GgufBuilder::new().kv("s", V::String("abc".into())).build();
    let mut needle = 3u64.to_le_bytes().to_vec();
    needle.extend_from_slice(b"abc");
    let mut replacement = u64::MAX.to_le_bytes().to_vec();
    replacement.extend_from_slice(b"abc");
    patch(&mut bytes, &needle, &replacement);
    let e = open_err(bytes);
    assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("metadata key `s`"), "{e}");
}

#[test]
fn misaligned_offset_is_rejected() {
    let bytes = GgufBuilder::new()
        .tensor("a", &[4], 0, f32_data(&[1.0; 4]))
        .tensor("b", &[4], 0, f32_data(&[2.0; 4]))
        .with_offset(16)
        .build();
    let e = open_err(bytes);
    assert_eq!(
        e.to_string(),
        "tensor `b`: data offset 16 is not a multiple of the alignment 32"
    );
}

#[test]
fn custom_alignment_is_honoured_and_validated() {
    let f = GgufFile::from_bytes(sample().kv("general.alignment", V::U32(64)).build()).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.tensor("w.q8").unwrap().offset, 64);
    assert_eq!(f.dequantize("w.f32").unwrap()[2], 3.5);

    for bad in [V::U32(0), V::U32(48), V::String("32".into()), V::I32(-32)] {
        let bytes = GgufBuilder::new()
            .kv("general.alignment", bad.clone())
            .build();
        let e = open_err(bytes);
        assert!(
            matches!(&e, GgufError::BadMetadata { key, .. } if key == "general.alignment"),
            "{bad:?}: {e}"
        );
    }
}

#[test]
fn invalid_utf8_is_an_error_naming_the_place() {
    let mut bytes = GgufBuilder::new()
        .kv("key", V::String("vAlue".into()))
        .build();
    patch(&mut bytes, b"vAlue", b"v\xffalu");
    let e = open_err(bytes);
    assert!(matches!(e, GgufError::InvalidUtf8 { .. }), "{e}");
    assert!(e.to_string().starts_with("metadata key `key`"), "{e}");

    let mut bytes = GgufBuilder::new().kv("kEy", V::U8(1)).build();
    patch(&mut bytes, b"kEy", b"k\xc3y");
    let e = open_err(bytes);
    assert!(e.to_string().starts_with("metadata entry 0: key"), "{e}");

    let mut bytes = GgufBuilder::new()
        .tensor("tEnsor", &[1], 0, f32_data(&[1.0]))
        .build();
    patch(&mut bytes, b"tEnsor", b"t\x80nsor");
    let e = open_err(bytes);
    assert!(e.to_string().starts_with("tensor info 0: name"), "{e}");
}

#[test]
fn unknown_types_are_errors() {
    // Unknown metadata value type 13.
    let mut bytes = b"GGUF".to_vec();
    put_u32(&mut bytes, 3);
    put_u64(&mut bytes, 0);
    put_u64(&mut bytes, 1);
    put_str(&mut bytes, b"weird");
    put_u32(&mut bytes, 13);
    bytes.extend_from_slice(&[0; 16]);
    let e = open_err(bytes);
    assert!(
        matches!(e, GgufError::UnknownValueType { id: 13, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("metadata key `weird`"), "{e}");

    // Unknown element type in an array.
    let mut bytes = GgufBuilder::new()
        .kv("arr", V::Array(vec![V::U8(0xab)]))
        .build();
    let mut needle = 0u32.to_le_bytes().to_vec();
    needle.extend_from_slice(&1u64.to_le_bytes());
    needle.push(0xab);
    let mut replacement = 99u32.to_le_bytes().to_vec();
    replacement.extend_from_slice(&1u64.to_le_bytes());
    replacement.push(0xab);
    patch(&mut bytes, &needle, &replacement);
    let e = open_err(bytes);
    assert!(
        matches!(e, GgufError::UnknownValueType { id: 99, .. }),
        "{e}"
    );

    // Unknown ggml type id.
    let e = open_err(GgufBuilder::new().tensor("w", &[4], 4, vec![0; 16]).build());
    assert_eq!(e.to_string(), "tensor `w`: unknown ggml type id 4");
    let e = open_err(
        GgufBuilder::new()
            .tensor("w", &[4], 1000, vec![0; 16])
            .build(),
    );
    assert!(
        matches!(e, GgufError::UnknownGgmlType { id: 1000, .. }),
        "{e}"
    );
}

#[test]
fn bad_bool_is_an_error() {
    let mut bytes = GgufBuilder::new().kv("flag", V::Bool(true)).build();
    patch(&mut bytes, b"flag\x07\0\0\0\x01", b"flag\x07\0\0\0\x02");
    let e = open_err(bytes);
    assert!(e.to_string().contains("metadata key `flag`"), "{e}");
}

#[test]
fn bad_shapes_are_errors() {
    let e = open_err(
        GgufBuilder::new()
            .tensor("w", &[1, 1, 1, 1, 1], 0, f32_data(&[1.0]))
            .build(),
    );
    assert_eq!(
        e.to_string(),
        "tensor `w`: 5 dimensions (at most 4 are supported)"
    );

    // Row length not a multiple of the Q8_0 block size.
    let e = open_err(
        GgufBuilder::new()
            .tensor("w", &[16, 4], 8, vec![0; 68])
            .build(),
    );
    assert!(
        e.to_string()
            .contains("not a multiple of the Q8_0 block size 32"),
        "{e}"
    );

    // Element count overflow.
    let e = open_err(
        GgufBuilder::new()
            .tensor("w", &[1 << 40, 1 << 40], 0, vec![0; 4])
            .build(),
    );
    assert!(e.to_string().contains("too many elements"), "{e}");

    // A dimension beyond i64.
    let e = open_err(
        GgufBuilder::new()
            .tensor("w", &[u64::MAX], 0, vec![0; 4])
            .build(),
    );
    assert!(e.to_string().contains("dimension 0"), "{e}");

    // Data offset that overflows.
    let e = open_err(
        GgufBuilder::new()
            .tensor("w", &[1], 0, vec![0; 4])
            .with_offset(u64::MAX - 31)
            .build(),
    );
    assert!(e.to_string().starts_with("tensor `w`: data"), "{e}");

    // A tensor without dimensions is a scalar.
    let f = GgufFile::from_bytes(
        GgufBuilder::new()
            .tensor("s", &[], 0, f32_data(&[4.5]))
            .build(),
    )
    .unwrap();
    assert_eq!(f.dequantize("s").unwrap(), [4.5]);
}

#[test]
fn duplicates_are_errors() {
    let e = open_err(
        GgufBuilder::new()
            .kv("k", V::U8(1))
            .kv("k", V::U8(2))
            .build(),
    );
    assert!(matches!(&e, GgufError::DuplicateKey(k) if k == "k"), "{e}");
    let e = open_err(
        GgufBuilder::new()
            .tensor("t", &[1], 0, vec![0; 4])
            .tensor("t", &[1], 0, vec![0; 4])
            .build(),
    );
    assert!(
        matches!(&e, GgufError::DuplicateTensor(t) if t == "t"),
        "{e}"
    );
}

#[test]
fn deeply_nested_arrays_are_rejected_without_overflowing_the_stack() {
    let mut v = V::U8(1);
    for _ in 0..40 {
        v = V::Array(vec![v]);
    }
    let e = open_err(GgufBuilder::new().kv("deep", v).build());
    assert!(matches!(e, GgufError::NestingTooDeep { .. }), "{e}");

    // A hostile file: a hundred thousand nested array headers.
    let mut bytes = b"GGUF".to_vec();
    put_u32(&mut bytes, 3);
    put_u64(&mut bytes, 0);
    put_u64(&mut bytes, 1);
    put_str(&mut bytes, b"deep");
    put_u32(&mut bytes, 9);
    for _ in 0..100_000 {
        put_u32(&mut bytes, 9);
        put_u64(&mut bytes, 1);
    }
    assert!(matches!(open_err(bytes), GgufError::NestingTooDeep { .. }));
}

#[test]
fn unsupported_dequant_names_the_tensor() {
    let f = GgufFile::from_bytes(
        GgufBuilder::new()
            .tensor("iq", &[256], 16, vec![0; 66])
            .build(),
    )
    .unwrap();
    assert_eq!(f.tensor("iq").unwrap().ggml_type, GgmlType::IQ2_XXS);
    assert_eq!(f.tensor_data(f.tensor("iq").unwrap()).len(), 66);
    let e = f.dequantize("iq").unwrap_err();
    assert_eq!(
        e.to_string(),
        "tensor `iq`: dequantizing IQ2_XXS is not supported"
    );
}

#[test]
fn foreign_tensor_info_gives_empty_data() {
    let f = GgufFile::from_bytes(sample().build()).unwrap();
    let mut info = f.tensor("w.q8").unwrap().clone();
    info.offset = 1 << 50;
    assert!(f.tensor_data(&info).is_empty());
}

/// Random byte corruptions of a valid file: opening and dequantizing must never panic.
#[test]
fn random_corruption_never_panics() {
    let original = sample()
        .tensor(
            "w.q4k",
            &[256],
            12,
            (0..144).map(|i| (i * 37 % 251) as u8).collect(),
        )
        .build();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut opened = 0;
    for _ in 0..3000 {
        let mut bytes = original.clone();
        for _ in 0..(1 + next() % 4) {
            let at = (next() % bytes.len() as u64) as usize;
            bytes[at] = next() as u8;
        }
        if let Ok(f) = GgufFile::from_bytes(bytes) {
            opened += 1;
            for t in f.tensors() {
                let _ = f.dequantize(&t.name);
            }
        }
    }
    assert!(opened > 0);
}
