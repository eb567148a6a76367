//! A router↔node partition and its heal, with the node in a network namespace of the test's own (iproute2 and
//! iptables; needs root). The router sees silence, not refusals, as across a real network partition.

mod common;

use std::time::{Duration, Instant};

use common::*;
use moe_e2e::{fixture, ExpertNodeProcess, Launch, Netns, RouterProcess};
use moe_model::LoadedModel;

/// A namespace, or the reason there is none: the test then skips, except under CI, where it must run.
fn netns_or_skip() -> Option<Netns> {
    match Netns::create() {
        Ok(ns) => Some(ns),
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: cannot make a network namespace here: {e:#}");
            None
        }
        Err(e) => panic!("CI must run the partition test: {e:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_is_noticed_held_for_and_reconnected_after_the_heal() {
    let Some(mut ns) = netns_or_skip() else { return };
    let dir = fixture("qwen35");
    let inside = Launch { netns: Some(ns.name().to_owned()), ..Launch::default() };
    // Its certificate names the namespace's address, which the router dials.
    let (_certs, files) = moe_e2e::tls::issue_for(moe_tls::Role::Expert, &[ns.inside().to_owned()]);
    let flags = files.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let far = ExpertNodeProcess::launch(&dir, &format!("{}:0", ns.inside()), "0-3", &flags, &inside).expect("node");
    let near = ExpertNodeProcess::start(&dir, "4-7", &[]).expect("node");
    let at = format!("{},{}", far.addr(), near.addr());
    let router = RouterProcess::start(&dir, &["--experts-at", &at]).expect("router");
    let url = router.url().to_owned();
    wait_ready(&url).await;
    let lm = LoadedModel::load(&dir).expect("loads");
    let streams = start_greedy_streams(&url, &lm, 3, 64);
    wait_for_tokens(&url, 6.0).await;

    ns.partition().expect("partitioned");
    let cut = Instant::now();
    // Keepalive (2 s interval, 5 s timeout) declares the silent node down.
    let mut noticed = None;
    while cut.elapsed() < Duration::from_secs(20) {
        if status_of(&url, "/readyz").await == 503 {
            noticed = Some(cut.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let noticed = noticed.expect("the partition was not noticed within 20 s");
    let during = metric(&url, "moe_generation_tokens_total").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(metric(&url, "moe_generation_tokens_total").await, during, "tokens were generated without experts 0-3");
    assert!(metric(&url, "moe_expert_holding").await >= 1.0, "the streams' step is not held");
    ns.heal().expect("healed");
    let healed = Instant::now();
    streams.finish("the partition").await;
    eprintln!("partition noticed after {noticed:?}; streams completed {:?} after the heal", healed.elapsed());
    wait_ready(&url).await;
    assert!(metric(&url, "moe_expert_reconnects_total").await >= 1.0, "the node was not reconnected");
    assert_eq!(metric(&url, "moe_requests_finished_total").await, 3.0);
    assert_eq!(metric(&url, "moe_requests_failed_total").await, 0.0);
    assert_eq!(metric(&url, "moe_expert_holding").await, 0.0);
    drop(far);
}
