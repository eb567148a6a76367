//! An expert node that dies mid-generation costs nothing when its experts have replicas: the pieces it had in flight
//! go to a replica, later steps avoid it, and the tokens and log-probs are those of the single-process engine, bit
//! for bit.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use moe_e2e::{fixture, ExpertNodeProcess};
use moe_model::{generate, GenerateRequest, LoadedModel, Residency, SamplingParams};
use moe_proto::v1::Dtype;
use router_node::{RemoteExperts, RemoteOptions};

fn request(max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: (0..40).map(|i| (i * 13 + 5) % 250).collect(),
        max_tokens,
        sampling: SamplingParams { temperature: 0.0, ..Default::default() },
        logprobs: 3,
        echo: false,
        stop_ids: Vec::new(),
    }
}

#[test]
fn a_killed_replica_changes_no_token() {
    let dir = fixture("qwen35");
    let local = LoadedModel::load(&dir).expect("loads");
    let want = generate(&local.model, &local.experts, &request(24), |_| {}).expect("generates");

    let router = LoadedModel::load_selected(&dir, Residency::Resident, &|_, _| {}, &|_, _| false).expect("loads");
    let mut doomed = ExpertNodeProcess::start(&dir, "all", &[]).expect("starts");
    let survivor = ExpertNodeProcess::start(&dir, "all", &[]).expect("starts");
    let options = RemoteOptions {
        wire_dtype: Dtype::F32,
        tls: Some(moe_e2e::tls::identity(moe_tls::Role::Router)),
        ..RemoteOptions::default()
    };
    let remote = RemoteExperts::connect(
        &[doomed.addr().to_owned(), survivor.addr().to_owned()],
        router.model.config(),
        router.fingerprint,
        options,
    )
    .expect("connects");
    let mut produced = 0;
    let got = generate(&router.model, &remote, &request(24), |_| {
        produced += 1;
        if produced == 8 {
            doomed.kill();
        }
    })
    .expect("generation survives the node");
    assert_eq!(got.output_ids, want.output_ids);
    for (a, b) in got.logprobs.iter().flatten().zip(want.logprobs.iter().flatten()) {
        assert_eq!(a.0, b.0);
        // The router adds each expert's output in expert order, wherever it was computed: the same bits.
        assert_eq!(a.1.to_bits(), b.1.to_bits(), "{a:?} vs {b:?}");
    }
    let status = remote.status();
    assert!(status[0].is_err(), "the killed node still answers");
    assert!(status[1].is_ok());
    eprintln!("pieces sent again after the kill: {}", remote.stats.resent.load(Ordering::Relaxed));
}

/// A frozen node with replicas costs about the hedge delay, not the keepalive's interval + timeout (7 s here): its
/// late piece is copied to the replica, whose answer, the same bits, is used.
#[test]
fn a_frozen_node_s_late_piece_is_hedged_to_a_replica_with_the_same_bits() {
    let dir = fixture("qwen35");
    let local = LoadedModel::load(&dir).expect("loads");
    let want = generate(&local.model, &local.experts, &request(16), |_| {}).expect("generates");

    let router = LoadedModel::load_selected(&dir, Residency::Resident, &|_, _| {}, &|_, _| false).expect("loads");
    let frozen = ExpertNodeProcess::start(&dir, "all", &[]).expect("starts");
    let survivor = ExpertNodeProcess::start(&dir, "all", &[]).expect("starts");
    let options = RemoteOptions {
        wire_dtype: Dtype::F32,
        hedge_min: Some(Duration::from_millis(200)),
        tls: Some(moe_e2e::tls::identity(moe_tls::Role::Router)),
        ..RemoteOptions::default()
    };
    let (keepalive, keepalive_timeout) = (options.keepalive_interval, options.keepalive_timeout);
    let remote = RemoteExperts::connect(
        &[frozen.addr().to_owned(), survivor.addr().to_owned()],
        router.model.config(),
        router.fingerprint,
        options,
    )
    .expect("connects");
    let mut at = vec![Instant::now()];
    let got = generate(&router.model, &remote, &request(16), |_| {
        at.push(Instant::now());
        if at.len() == 6 {
            frozen.signal("STOP").expect("stopped");
        }
    })
    .expect("generation survives the frozen node");
    frozen.signal("CONT").expect("continued");
    assert_eq!(got.output_ids, want.output_ids);
    for (a, b) in got.logprobs.iter().flatten().zip(want.logprobs.iter().flatten()) {
        assert_eq!((a.0, a.1.to_bits()), (b.0, b.1.to_bits()), "{a:?} vs {b:?}");
    }
    let gap = at.windows(2).skip(5).map(|w| w[1] - w[0]).max().unwrap_or_default();
    let (hedged, won) = (remote.stats.hedged.load(Ordering::Relaxed), remote.stats.hedges_won.load(Ordering::Relaxed));
    eprintln!("frozen node: {hedged} pieces hedged, {won} copies answered first; longest gap after the freeze {gap:?}");
    assert!(won >= 1, "no copy of the frozen node's work answered");
    assert!(
        gap < (keepalive + keepalive_timeout) / 2,
        "a token took {gap:?} after the freeze: the piece waited for the keepalive, not the hedge"
    );
}

#[test]
fn a_frozen_node_is_noticed_by_keepalive_and_its_work_goes_to_a_replica() {
    let dir = fixture("qwen35");
    let local = LoadedModel::load(&dir).expect("loads");
    let want = generate(&local.model, &local.experts, &request(16), |_| {}).expect("generates");

    let router = LoadedModel::load_selected(&dir, Residency::Resident, &|_, _| {}, &|_, _| false).expect("loads");
    let frozen = ExpertNodeProcess::start(&dir, "all", &[]).expect("starts");
    let survivor = ExpertNodeProcess::start(&dir, "all", &[]).expect("starts");
    let options = RemoteOptions {
        wire_dtype: Dtype::F32,
        keepalive_interval: Duration::from_millis(300),
        keepalive_timeout: Duration::from_millis(700),
        // The keepalive is what this test is about (hedging has its own test).
        hedge_min: None,
        tls: Some(moe_e2e::tls::identity(moe_tls::Role::Router)),
        ..RemoteOptions::default()
    };
    let remote = RemoteExperts::connect(
        &[frozen.addr().to_owned(), survivor.addr().to_owned()],
        router.model.config(),
        router.fingerprint,
        options,
    )
    .expect("connects");
    let mut produced = 0;
    let started = Instant::now();
    // SIGSTOP: the process stays, its sockets stay open, nothing answers. Only the HTTP/2 keepalive can tell.
    let got = generate(&router.model, &remote, &request(16), |_| {
        produced += 1;
        if produced == 5 {
            frozen.signal("STOP").expect("stopped");
        }
    })
    .expect("generation survives the frozen node");
    let elapsed = started.elapsed();
    frozen.signal("CONT").expect("continued");
    assert_eq!(got.output_ids, want.output_ids);
    for (a, b) in got.logprobs.iter().flatten().zip(want.logprobs.iter().flatten()) {
        assert_eq!((a.0, a.1.to_bits()), (b.0, b.1.to_bits()), "{a:?} vs {b:?}");
    }
    let resent = remote.stats.resent.load(Ordering::Relaxed);
    eprintln!("frozen node: {resent} pieces sent again, generation took {elapsed:?}");
    assert!(resent >= 1, "the frozen node's work was never sent elsewhere");
    assert!(elapsed < Duration::from_secs(20), "noticing the frozen node took {elapsed:?}");
}

#[test]
fn a_killed_node_without_replica_holds_the_step_until_it_is_back_and_changes_no_token() {
    let dir = fixture("qwen35");
    let local = LoadedModel::load(&dir).expect("loads");
    let want = generate(&local.model, &local.experts, &request(24), |_| {}).expect("generates");

    let router = LoadedModel::load_selected(&dir, Residency::Resident, &|_, _| {}, &|_, _| false).expect("loads");
    let mut low = ExpertNodeProcess::start(&dir, "0-3", &[]).expect("starts");
    let high = ExpertNodeProcess::start(&dir, "4-7", &[]).expect("starts");
    let options = RemoteOptions {
        reconnect_backoff: (Duration::from_millis(50), Duration::from_millis(200)),
        tls: Some(moe_e2e::tls::identity(moe_tls::Role::Router)),
        ..RemoteOptions::default()
    };
    let remote = RemoteExperts::connect(
        &[low.addr().to_owned(), high.addr().to_owned()],
        router.model.config(),
        router.fingerprint,
        options,
    )
    .expect("connects");
    let addr = low.addr().to_owned();
    let restarted = std::sync::Mutex::new(None);
    let mut produced = 0;
    let started = Instant::now();
    let got = std::thread::scope(|scope| {
        generate(&router.model, &remote, &request(24), |_| {
            produced += 1;
            if produced == 4 {
                low.kill();
                // Back on the same port a second later, while the step waits for experts 0-3.
                let (dir, addr, restarted) = (&dir, &addr, &restarted);
                scope.spawn(move || {
                    std::thread::sleep(Duration::from_secs(1));
                    *restarted.lock().expect("lock") = Some(ExpertNodeProcess::start_at(dir, addr, "0-3", &[]));
                });
            }
        })
    })
    .expect("the step is held, not failed");
    let elapsed = started.elapsed();
    assert!(restarted.lock().expect("lock").as_ref().is_some_and(|r| r.is_ok()), "the node did not restart");
    assert_eq!(got.output_ids, want.output_ids, "tokens changed across the hold");
    for (a, b) in got.logprobs.iter().flatten().zip(want.logprobs.iter().flatten()) {
        assert_eq!(a.0, b.0);
        // The router adds each expert's output in expert order, wherever it was computed: the same bits.
        assert_eq!(a.1.to_bits(), b.1.to_bits(), "{a:?} vs {b:?}");
    }
    let stats = &remote.stats;
    assert!(stats.holds.load(Ordering::Relaxed) >= 1, "nothing was held");
    assert!(stats.reconnects.load(Ordering::Relaxed) >= 1, "the node was not reconnected");
    assert_eq!(stats.holding.load(Ordering::Relaxed), 0, "a hold is still counted");
    assert!(remote.check_coverage().is_ok());
    eprintln!("held across a node restart: {elapsed:?}");
}

#[test]
fn a_hold_ends_with_a_clear_error_at_its_limit() {
    let dir = fixture("qwen35");
    let router = LoadedModel::load_selected(&dir, Residency::Resident, &|_, _| {}, &|_, _| false).expect("loads");
    let mut low = ExpertNodeProcess::start(&dir, "0-3", &[]).expect("starts");
    let high = ExpertNodeProcess::start(&dir, "4-7", &[]).expect("starts");
    let options = RemoteOptions {
        hold_timeout: Duration::from_secs(2),
        tls: Some(moe_e2e::tls::identity(moe_tls::Role::Router)),
        ..RemoteOptions::default()
    };
    let remote = RemoteExperts::connect(
        &[low.addr().to_owned(), high.addr().to_owned()],
        router.model.config(),
        router.fingerprint,
        options,
    )
    .expect("connects");
    let addr = low.addr().to_owned();
    let mut produced = 0;
    let started = Instant::now();
    let err = generate(&router.model, &remote, &request(24), |_| {
        produced += 1;
        if produced == 4 {
            low.kill();
        }
    })
    .expect_err("experts 0-3 never come back");
    let message = err.to_string();
    assert!(message.contains(&addr) && message.contains("held for"), "{message}");
    assert!(err.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(remote.stats.holds_abandoned.load(Ordering::Relaxed), 1);
    assert_eq!(remote.stats.holding.load(Ordering::Relaxed), 0);
    assert!(remote.check_coverage().is_err(), "/readyz would still say ready");
}
