//! A GGUF file from arbitrary bytes: the reader, every tensor's data range and dequantization,
//! the tokenizer built from its metadata, and the model configuration read from it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagedserve::model::gguf::{can_dequantize, GgufFile};
use pagedserve::model::sources::GgufSource;
use pagedserve::tokenizer::{GgufTokenizerSpec, Tokenizer};

/// Dequantizing allocates four bytes an element: keep each case small.
const MAX_DEQUANTIZED: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data.to_vec()) else { return };
    for info in file.tensors() {
        // The reader promised that every tensor's bytes lie inside the file.
        assert_eq!(file.tensor_data(info).len(), info.n_bytes(), "{info:?}");
        if can_dequantize(info.ggml_type) && info.n_elements() <= MAX_DEQUANTIZED {
            if let Ok(values) = file.dequantize(&info.name) {
                assert_eq!(values.len(), info.n_elements(), "{info:?}");
            }
        }
    }
    if let Ok(spec) = GgufTokenizerSpec::from_gguf(&file) {
        if let Ok(tokenizer) = Tokenizer::from_gguf_spec(&spec) {
            if let Ok(ids) = tokenizer.encode("Hello, world! <|im_end|> 123", false) {
                let _ = tokenizer.decode(&ids, false);
            }
        }
    }
    if let Ok(source) = GgufSource::from_file(file) {
        let _ = source.config();
    }
});
