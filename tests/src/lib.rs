//! End-to-end tests of moe-mesh live in `tests/`; this library is empty.
