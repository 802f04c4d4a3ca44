//! GGUF files (versions 2 and 3): metadata, tensor infos and memory-mapped tensor data.
