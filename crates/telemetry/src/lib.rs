//! Telemetry: tracing and OpenTelemetry set-up, trace propagation over gRPC, Prometheus metrics.
//!
//! Not built yet: the model engine (moe-model) comes first; this crate is filled in by its own issue.
