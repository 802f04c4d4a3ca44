//! A safetensors file's header and a sharded checkpoint's index from arbitrary bytes. The first
//! byte picks which; a header's entries must lie inside the file and match their shapes, and an
//! index must name only plain files of the model's directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagedserve::model::sources::{index_shards, read_header};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    if which % 2 == 0 {
        let Ok(entries) = read_header(bytes) else { return };
        for (name, entry) in entries {
            assert!(entry.bytes.start <= entry.bytes.end && entry.bytes.end <= bytes.len(), "{name}: {entry:?}");
            let elements = entry.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).expect("the shape's size fits");
            let bits = elements.checked_mul(entry.dtype.bitsize()).expect("the size in bits fits");
            assert_eq!(bits.div_ceil(8), entry.bytes.len(), "{name}: {entry:?}");
        }
    } else {
        let Ok(files) = index_shards(bytes) else { return };
        assert!(!files.is_empty());
        for file in files {
            let path = std::path::Path::new(&file);
            assert_eq!(path.components().count(), 1, "{file:?}");
            assert!(matches!(path.components().next(), Some(std::path::Component::Normal(_))), "{file:?}");
        }
    }
});
