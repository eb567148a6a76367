//! Faults injected where timing must be exact, through the whole server: a slow expert node (a failpoint that
//! delays its compute thread), a router whose engine thread dies (a failpoint that panics it), and a damaged
//! checkpoint. The binaries the tests run are built with the `fail` crate (feature `failpoints`), configured by
//! `FAILPOINTS` per process.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use moe_e2e::{fixture, EtcdServer, ExpertNodeProcess, Launch, RouterProcess};
use moe_model::LoadedModel;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_node_s_work_moves_to_a_replica_after_the_expert_deadline() {
    let dir = fixture("qwen35");
    // Experts 0-3 on a node whose first eight computations take 2 s each, and everything on a healthy one.
    let slow = Launch::failpoints("expert-compute=8*sleep(2000)");
    let slow = ExpertNodeProcess::launch(&dir, "127.0.0.1:0", "0-3", &[], &slow).expect("slow node");
    let healthy = ExpertNodeProcess::start(&dir, "all", &[]).expect("node");
    let at = format!("{},{}", slow.addr(), healthy.addr());
    // Without hedging: the deadline is what this test is about (hedging has its own test in failover.rs).
    let router =
        RouterProcess::start(&dir, &["--experts-at", &at, "--expert-deadline-secs", "0.5", "--hedge-min-ms", "0"])
            .expect("router");
    let url = router.url().to_owned();
    let lm = LoadedModel::load(&dir).expect("loads");
    let started = Instant::now();
    start_greedy_streams(&url, &lm, 3, 48).finish("a slow node").await;
    assert_eq!(metric(&url, "moe_expert_pieces_hedged_total").await, 0.0, "--hedge-min-ms 0 hedged");
    let took = started.elapsed();
    assert!(metric(&url, "moe_expert_pieces_resent_total").await >= 1.0, "nothing moved off the slow node");
    assert_eq!(metric(&url, "moe_requests_finished_total").await, 3.0);
    assert_eq!(metric(&url, "moe_requests_failed_total").await, 0.0);
    assert_eq!(metric(&url, "moe_expert_holding").await, 0.0);
    // Eight 2 s computations, had every one been waited for, would take 16 s.
    assert!(took < Duration::from_secs(14), "the slow node was waited for: {took:?}");
    eprintln!("3 streams beside a slow node in {took:?}");
}

/// The same slow node with hedging on (the default): its late pieces are copied to the healthy replica after the
/// hedge delay, long before the 2 s computations or the 60 s deadline end, and the text is the fault-free run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_node_s_late_pieces_are_hedged_to_a_replica() {
    let dir = fixture("qwen35");
    let slow = Launch::failpoints("expert-compute=8*sleep(2000)");
    let slow = ExpertNodeProcess::launch(&dir, "127.0.0.1:0", "0-3", &[], &slow).expect("slow node");
    let healthy = ExpertNodeProcess::start(&dir, "all", &[]).expect("node");
    let at = format!("{},{}", slow.addr(), healthy.addr());
    let router = RouterProcess::start(&dir, &["--experts-at", &at]).expect("router");
    let url = router.url().to_owned();
    let lm = LoadedModel::load(&dir).expect("loads");
    let started = Instant::now();
    start_greedy_streams(&url, &lm, 3, 48).finish("a slow node, hedged").await;
    let took = started.elapsed();
    let won = metric(&url, "moe_expert_hedges_won_total").await;
    assert!(won >= 1.0, "no copy answered first");
    assert!(metric(&url, "moe_expert_pieces_hedged_total").await >= won);
    // Each late original whose copy won was cancelled on the slow node.
    assert!(metric(&url, "moe_expert_pieces_cancelled_total").await >= won, "a hedge's loser was not cancelled");
    assert_eq!(metric(&url, "moe_expert_pieces_resent_total").await, 0.0, "a piece waited for its deadline");
    assert_eq!(metric(&url, "moe_requests_finished_total").await, 3.0);
    assert_eq!(metric(&url, "moe_requests_failed_total").await, 0.0);
    assert!(took < Duration::from_secs(14), "the slow node was waited for: {took:?}");
    eprintln!("3 streams beside a slow node, hedged, in {took:?}");
}

/// Cancellation on the wire: while the node's compute thread is held in a slow first computation, four more
/// requests queue behind it; cancelling two of them (and ids that are computing, done or unknown) drops exactly
/// those two unanswered, counted in the node's `/metrics`, and the stream goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_requests_still_queued_are_dropped_unanswered_and_the_stream_goes_on() {
    use moe_proto::v1::{forward_response, Dtype, ForwardRequest, Routing};

    let dir = fixture("qwen35");
    let slow = Launch::failpoints("expert-compute=1*sleep(1500)");
    let node = ExpertNodeProcess::launch(&dir, "127.0.0.1:0", "all", &["--metrics-listen", "127.0.0.1:0"], &slow)
        .expect("node");
    let metrics = format!("http://{}", node.metrics_addr().expect("the node announced its metrics address"));
    let config = moe_model::ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let layer = (0..config.num_hidden_layers).find(|&l| config.is_moe_layer(l)).expect("a MoE layer") as u32;
    let h = config.hidden_size;
    let work = |id: u64| ForwardRequest {
        id,
        layer,
        dtype: Dtype::F32 as i32,
        hidden_size: h as u32,
        num_tokens: 2,
        activations: moe_proto::codec::encode(&vec![0.25f32; 2 * h], Dtype::F32),
        routing: Some(Routing { offsets: vec![0, 1, 2], experts: vec![1, 2], weights: vec![1.0, 0.5] }),
        ..Default::default()
    };
    let mut client = moe_e2e::tls::client(node.addr(), moe_tls::Role::Router).await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut answers =
        client.forward(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("forward").into_inner();
    for id in 1..=5 {
        tx.send(work(id)).await.expect("sent");
    }
    // 1 is computing (held 1.5 s by the failpoint), 2-5 wait; 7 and 99 were never sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.send(ForwardRequest { id: u64::MAX, cancel: vec![3, 4, 1, 7, 99], ..Default::default() }).await.expect("sent");
    tx.send(work(6)).await.expect("sent");
    let mut answered = Vec::new();
    while answered.len() < 4 {
        let next = tokio::time::timeout(Duration::from_secs(20), answers.message()).await;
        let resp = next.expect("an answer within 20 s").expect("the stream serves").expect("the stream is open");
        assert!(matches!(resp.result, Some(forward_response::Result::Sums(_))), "{} was refused", resp.id);
        answered.push(resp.id);
    }
    assert_eq!(answered, [1, 2, 5, 6], "the answered ids");
    assert_eq!(metric(&metrics, "moe_node_cancelled_total").await, 2.0);
    assert_eq!(metric(&metrics, "moe_node_batches_total").await, 4.0);
    // Nothing else comes: the cancel-only message is not answered either.
    assert!(tokio::time::timeout(Duration::from_millis(500), answers.message()).await.is_err(), "an extra answer");
}

/// A node of the protocol before per-pair answers (it ignores `reduce` and sends per-token sums, which a failpoint
/// imitates) beside a current one: the router adds its sums as such and the current node's rows onto them, and
/// serves the same greedy text instead of failing the steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_the_older_protocol_answers_per_token_sums_and_nothing_fails() {
    let dir = fixture("qwen35");
    let older = Launch::failpoints("expert-old-answers=return");
    let older = ExpertNodeProcess::launch(&dir, "127.0.0.1:0", "0-3", &[], &older).expect("older node");
    let current = ExpertNodeProcess::start(&dir, "4-7", &[]).expect("node");
    let at = format!("{},{}", older.addr(), current.addr());
    let router = RouterProcess::start(&dir, &["--experts-at", &at]).expect("router");
    let url = router.url().to_owned();
    let lm = LoadedModel::load(&dir).expect("loads");
    start_greedy_streams(&url, &lm, 2, 32).finish("a node of the older protocol").await;
    assert_eq!(metric(&url, "moe_requests_finished_total").await, 2.0);
    assert_eq!(metric(&url, "moe_requests_failed_total").await, 0.0);
    assert_eq!(metric(&url, "moe_expert_pieces_resent_total").await, 0.0, "an answer was refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_partial_sums_are_never_added_and_the_work_goes_to_a_replica() {
    let dir = fixture("qwen35");
    // Experts 0-3 on a node whose first six answers are NaN, and everything on a healthy one.
    let bad = Launch::failpoints("expert-nan-sums=6*return");
    let bad = ExpertNodeProcess::launch(&dir, "127.0.0.1:0", "0-3", &[], &bad).expect("node");
    let healthy = ExpertNodeProcess::start(&dir, "all", &[]).expect("node");
    let at = format!("{},{}", bad.addr(), healthy.addr());
    let router = RouterProcess::start(&dir, &["--experts-at", &at]).expect("router");
    let url = router.url().to_owned();
    let lm = LoadedModel::load(&dir).expect("loads");
    start_greedy_streams(&url, &lm, 2, 32).finish("a node answering NaN").await;
    assert!(metric(&url, "moe_expert_pieces_resent_total").await >= 1.0, "nothing moved off the bad node");
    assert_eq!(metric(&url, "moe_requests_finished_total").await, 2.0);
    assert_eq!(metric(&url, "moe_requests_failed_total").await, 0.0);
    assert!(router.log_text().contains("non-finite partial sums"), "{}", router.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_slower_than_the_deadline_with_no_replica_is_asked_again_and_nothing_is_lost() {
    let dir = fixture("qwen35");
    // Its first four computations take 1.5 s, three times the deadline; nobody else hosts experts 0-3.
    let slow = Launch::failpoints("expert-compute=4*sleep(1500)");
    let slow = ExpertNodeProcess::launch(&dir, "127.0.0.1:0", "0-3", &[], &slow).expect("slow node");
    let other = ExpertNodeProcess::start(&dir, "4-7", &[]).expect("node");
    let at = format!("{},{}", slow.addr(), other.addr());
    let router = RouterProcess::start(&dir, &["--experts-at", &at, "--expert-deadline-secs", "0.5"]).expect("router");
    let url = router.url().to_owned();
    let lm = LoadedModel::load(&dir).expect("loads");
    start_greedy_streams(&url, &lm, 2, 32).finish("a node slower than its deadline").await;
    // Answers that came after their piece was sent again were dropped, not added twice: the text above is exact.
    assert!(metric(&url, "moe_expert_pieces_resent_total").await >= 1.0);
    assert!(metric(&url, "moe_expert_pieces_cancelled_total").await >= 1.0, "a piece past its deadline was kept");
    assert_eq!(metric(&url, "moe_requests_finished_total").await, 2.0);
    assert_eq!(metric(&url, "moe_requests_failed_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_engine_thread_fails_its_requests_and_turns_livez_and_readyz_false() {
    let dir = fixture("qwen35");
    // The engine thread panics on its 30th step.
    let router =
        RouterProcess::launch(&dir, &[], &Launch::failpoints("engine-step=29*off->panic(injected)")).expect("router");
    let url = router.url().to_owned();
    assert_eq!(status_of(&url, "/livez").await, 200);
    let lm = LoadedModel::load(&dir).expect("loads");
    let streams = start_greedy_streams(&url, &lm, 2, 64);
    for (i, task) in streams.tasks.into_iter().enumerate() {
        let s = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("a request of a dead engine hung")
            .expect("task");
        // Either the response had not begun (an error status) or the stream ends with an error event.
        assert!(s.status != 200 || s.error.is_some(), "stream {i} ended without an error: {s:?}");
        assert_eq!(s.finish_reason, None, "stream {i} claims to have finished");
    }
    assert_eq!(status_of(&url, "/livez").await, 503);
    assert_eq!(status_of(&url, "/readyz").await, 503);
    let resp = client().post(format!("{url}/v1/completions")).json(&greedy(&prompt(5), 4, false)).send().await;
    let resp = resp.expect("sent");
    assert_eq!(resp.status().as_u16(), 503, "a dead engine accepted a request");
    let body: Value = resp.json().await.expect("an OpenAI-shaped error");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(router.log_shows("the engine thread panicked", Duration::from_secs(5)), "{}", router.log_text());
}

/// A copy of the fixture in `to`, with the first weight of layer 0's `gate_up_proj` experts set to a bf16 NaN, as a
/// flipped bit in a downloaded file could leave it.
fn corrupt_copy(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("fixture") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copied");
    }
    let file = to.join("model-00001-of-00003.safetensors");
    let mut bytes = std::fs::read(&file).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    let entry = &header["model.language_model.layers.0.mlp.experts.gate_up_proj"];
    assert_eq!(entry["dtype"], "BF16");
    let at = 8 + n + entry["data_offsets"][0].as_u64().expect("offset") as usize;
    bytes[at..at + 2].copy_from_slice(&0x7fc0u16.to_le_bytes());
    std::fs::write(&file, bytes).expect("written");
}

/// Waits (bounded) for the process to exit; its exit status.
fn wait_exit(node: &mut ExpertNodeProcess, within: Duration) -> Option<bool> {
    let started = Instant::now();
    while started.elapsed() < within {
        if !node.is_running() {
            return Some(node.log_text().contains("error:"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn a_node_with_a_damaged_checkpoint_refuses_to_start_and_names_the_tensor() {
    let tmp = tempfile::tempdir().expect("tmp");
    corrupt_copy(&fixture("qwen35"), tmp.path());
    let started = ExpertNodeProcess::start(tmp.path(), "all", &[]);
    let err = format!("{:#}", started.err().expect("a node with a NaN weight served"));
    assert!(err.contains("layers.0.mlp.experts.gate_up_proj") && err.contains("non-finite"), "{err}");

    // A truncated file (an interrupted download) is refused the same way, naming the file.
    let file = tmp.path().join("model-00002-of-00003.safetensors");
    let len = std::fs::metadata(&file).expect("meta").len();
    std::fs::OpenOptions::new().write(true).open(&file).expect("open").set_len(len / 2).expect("truncated");
    let err = format!("{:#}", ExpertNodeProcess::start(tmp.path(), "4-7", &[]).err().expect("a truncated file served"));
    assert!(err.contains("model-00002-of-00003.safetensors"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_a_node_that_cannot_load_its_experts_drains_itself_and_the_others_serve() {
    let dir = fixture("qwen35");
    let tmp = tempfile::tempdir().expect("tmp");
    corrupt_copy(&dir, tmp.path());
    let etcd = EtcdServer::start().expect("etcd");
    let endpoint = etcd.endpoint().to_owned();
    // Two healthy nodes with room for the whole model, one whose copy of layer 0's experts is damaged.
    let join = |model: &Path, name: &str| {
        ExpertNodeProcess::join(model, &endpoint, "damaged", &["--node-id", name, "--memory-gib", "0.0004"])
            .expect("expert node")
    };
    let mut bad = join(tmp.path(), "node-bad");
    let good = [join(&dir, "node-a"), join(&dir, "node-b")];
    wait_registered(&bad);
    let router = RouterProcess::start(&dir, &["--etcd", &endpoint, "--cluster", "damaged", "--lease-ttl-secs", "2"])
        .expect("router");
    let url = router.url().to_owned();
    wait_ready(&url).await;
    let exited = tokio::task::spawn_blocking(move || {
        let exit = wait_exit(&mut bad, Duration::from_secs(40));
        (exit, bad.log_text())
    });
    let lm = LoadedModel::load(&dir).expect("loads");
    start_greedy_streams(&url, &lm, 3, 32).finish("a damaged node").await;
    let (exit, log) = exited.await.expect("task");
    assert!(log.contains("cannot load the experts"), "{log}");
    assert_eq!(exit, Some(true), "the damaged node did not leave with an error:\n{log}");
    assert!(!log.contains("placement epoch ready"), "the damaged node reported an epoch ready:\n{log}");
    assert_eq!(metric(&url, "moe_requests_failed_total").await, 0.0);
    drop(good);
}
