//! Batch inputs for a forward pass: token ids, positions, slot mapping and block tables.
