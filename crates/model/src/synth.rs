//! Synthetic models (todo)
