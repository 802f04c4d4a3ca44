//! Weight sources: each maps Hugging Face tensor names onto one storage format and hands back
//! float32 tensors in Hugging Face's layout (see `weights::WeightSource`).

mod dummy;
mod gguf;
mod safetensors;

pub use self::dummy::{dummy_ggml_blocks, DummySource};
pub use self::gguf::GgufSource;
pub use self::safetensors::{index_shards, read_header, HeaderEntry, SafetensorsSource};
