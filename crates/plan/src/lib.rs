//! Capacity planning for moe-mesh clusters (`moectl plan`).
//!
//! A step's cost comes from the model's shapes ([`shape`]) on a hardware profile's roofline, corrected stage by
//! stage by what this machine measured ([`hardware`], [`calibrate`]); the routed work is split over expert nodes as
//! the balancer places it, with the hot-expert skew, and the wire and micro-batch overlap added ([`cost`]). The
//! engine's continuous batching is replayed on that cost under the traffic ([`simulate`]), and every layout of a
//! search space is costed, checked against memory and the SLO, and priced ([`plan`]), with a plot of the trade-off
//! ([`plot`]); a running cluster's layout is costed with one change at a time ([`whatif`]).

pub mod calibrate;
pub mod cost;
pub mod error;
pub mod hardware;
pub mod plan;
pub mod plot;
pub mod shape;
pub mod simulate;
pub mod whatif;

pub use cost::{Cluster, ExpertLoad, Layout, Placement, Step, StepCost};
pub use error::{PlanError, Result};
pub use hardware::{HardwareFile, Network, Overhead, Profile, Stage};
pub use plan::{Candidate, Inputs, Memory, Plan, Slo, Space};
pub use shape::Shape;
pub use simulate::{simulate, Arrivals, EngineLimits, Length, Outcome, Percentiles, Traffic};
pub use whatif::{what_if, Change};
