//! Tokenization: the `tokenizers` crate from `tokenizer.json` or built from GGUF metadata, chat
//! templates and incremental detokenizing for streaming.
