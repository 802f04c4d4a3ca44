//! Helpers shared by the end-to-end tests: locating the binary and the default model.
