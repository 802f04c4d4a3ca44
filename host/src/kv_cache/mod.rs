//! The paged KV cache: fixed-size blocks of keys and values, addressed through block tables.
