//! What one more expert node, one more router or a second copy of the hottest experts buys a running cluster: its
//! layout and measured expert load (read from etcd by `moectl plan --placement current`) costed as it is and with
//! each change, under the same traffic.

use serde::Serialize;

use crate::cost::Layout;
use crate::error::Result;
use crate::plan::{Candidate, Inputs};

/// One change to the current layout and what it is predicted to give.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// What changes, in words ("as it is" for the current layout).
    pub change: String,
    pub candidate: Candidate,
    /// Output tokens/s relative to the current layout (1.0: the same).
    pub throughput_ratio: f64,
    /// TPOT at the SLO's percentile relative to the current layout (below 1.0: faster per user).
    pub tpot_ratio: f64,
    /// TTFT at the SLO's percentile relative to the current layout.
    pub ttft_ratio: f64,
}

/// The current layout, then one more expert node, one more router (unless every process shares one machine), and
/// `hot` more of the hottest experts with a second copy (where there are two expert nodes or more to hold them).
pub fn what_if(inputs: &Inputs<'_>, current: Layout, hot: usize) -> Result<Vec<Change>> {
    inputs.check()?;
    let mut layouts = vec![("as it is".to_owned(), current.clone())];
    layouts.push((
        "one more expert node".to_owned(),
        Layout { expert_nodes: current.expert_nodes + 1, ..current.clone() },
    ));
    if !current.one_machine {
        layouts.push(("one more router".to_owned(), Layout { routers: current.routers + 1, ..current.clone() }));
    }
    let experts = inputs.shape.experts;
    if current.expert_nodes >= 2 && hot > 0 && current.replicas < experts {
        let replicas = (current.replicas + hot).min(experts);
        layouts.push((
            format!("a second copy of the {} hottest experts", replicas - current.replicas),
            Layout { replicas, ..current.clone() },
        ));
    }
    let candidates: Vec<(String, Candidate)> = layouts.into_iter().map(|(n, l)| (n, inputs.evaluate(l))).collect();
    let q = inputs.slo.percentile;
    let base = &candidates[0].1;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::INFINITY };
    let (tput, tpot, ttft) = (base.outcome.output_tokens_per_s, base.outcome.tpot_s.at(q), base.outcome.ttft_s.at(q));
    Ok(candidates
        .into_iter()
        .map(|(change, c)| Change {
            change,
            throughput_ratio: ratio(c.outcome.output_tokens_per_s, tput),
            tpot_ratio: ratio(c.outcome.tpot_s.at(q), tpot),
            ttft_ratio: ratio(c.outcome.ttft_s.at(q), ttft),
            candidate: c,
        })
        .collect())
}
