//! The flags that put a command's routed experts on expert nodes, shared by `generate` and `bench-model`.

use std::time::Duration;

use anyhow::{Context, Result};
use moe_model::{Experts, LoadedModel};
use moe_proto::v1::{Dtype, Reduce};
use router_node::{RemoteExperts, RemoteOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WireDtype {
    Bf16,
    F32,
}

/// Where a token's expert outputs are added up (the router's `--combine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Combine {
    /// Nodes answer each expert's output; the router adds them in expert order: the same bits under every placement.
    Router,
    /// Each node answers one sum per token: fewer bytes back, last bits that follow the placement.
    Node,
}

impl Combine {
    pub fn reduce(self) -> Reduce {
        match self {
            Combine::Router => Reduce::Pair,
            Combine::Node => Reduce::Token,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Combine::Router => "router",
            Combine::Node => "node",
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct RemoteArgs {
    /// Compute the routed experts on these expert nodes (host:port, comma-separated) instead of in this process.
    /// Each hosts what it was started with; together they must cover every expert.
    #[arg(long, value_delimiter = ',', value_name = "ADDR[,ADDR...]")]
    pub experts_at: Vec<String>,
    /// Element type of activations and partial sums on the wire: f32 gives the in-process engine's tokens; bf16
    /// halves the bytes but rounds activations, which can flip greedy tokens at near-ties.
    #[arg(long, value_enum, default_value_t = WireDtype::F32, requires = "experts_at")]
    pub wire_dtype: WireDtype,
    /// Where a token's expert outputs are added up: router (the same bits as in this process, under any split of
    /// the experts) or node (one sum per token and node: fewer bytes, last bits that follow the split).
    #[arg(long, value_enum, default_value_t = Combine::Router, requires = "experts_at")]
    pub combine: Combine,
    /// Seconds an expert node may take to answer one message before the step fails.
    #[arg(long, default_value_t = 60.0, requires = "experts_at")]
    pub expert_deadline_secs: f64,
    /// The links to the nodes: a router or controller certificate (`moectl certs issue`), or --insecure.
    #[command(flatten)]
    pub tls: moe_tls::TlsArgs,
}

impl RemoteArgs {
    pub fn is_remote(&self) -> bool {
        !self.experts_at.is_empty()
    }

    /// Connects to the expert nodes for `lm`'s model.
    pub fn connect(&self, lm: &LoadedModel) -> Result<RemoteExperts> {
        let secs = self.expert_deadline_secs;
        if !(secs.is_finite() && secs > 0.0) {
            anyhow::bail!("--expert-deadline-secs {secs}: must be a positive number of seconds");
        }
        let tls = self.tls.load(&[moe_tls::Role::Router, moe_tls::Role::Controller], "--experts-at")?;
        let options = RemoteOptions {
            tls,
            wire_dtype: match self.wire_dtype {
                WireDtype::Bf16 => Dtype::Bf16,
                WireDtype::F32 => Dtype::F32,
            },
            reduce: self.combine.reduce(),
            deadline: Duration::from_secs_f64(secs),
            ..RemoteOptions::default()
        };
        RemoteExperts::connect(&self.experts_at, lm.model.config(), lm.fingerprint, options)
            .context("connecting to the expert nodes")
    }
}

/// The experts a command computes with: the model's own, or expert nodes.
pub enum ExpertsIn<'a> {
    Local(&'a LoadedModel),
    Remote(Box<RemoteExperts>),
    /// Elsewhere in this process (on GPUs).
    Boxed(Box<dyn Experts>),
}

impl ExpertsIn<'_> {
    pub fn as_dyn(&self) -> &dyn Experts {
        match self {
            ExpertsIn::Local(lm) => &lm.experts,
            ExpertsIn::Remote(r) => r.as_ref(),
            ExpertsIn::Boxed(e) => e.as_ref(),
        }
    }
}
