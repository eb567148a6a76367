//! The fault matrix through the whole server: real expert-node and router-node processes on loopback, real HTTP
//! clients. Each test asserts that nothing is lost: every request ends in exactly one outcome its client sees
//! (complete with its finish reason and usage, or an explicit error), greedy text equals the fault-free run, and the
//! counters reconcile.

use std::time::{Duration, Instant};

use moe_e2e::{fixture, local_greedy, EtcdServer, ExpertNodeProcess, RouterProcess};
use moe_model::LoadedModel;
use serde_json::{json, Value};

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("client")
}

fn prompt(i: u32) -> Vec<u32> {
    (0..6 + i % 7).map(|k| (i * 41 + k * 13 + 7) % 250).collect()
}

async fn metric(url: &str, name: &str) -> f64 {
    let text = client().get(format!("{url}/metrics")).send().await.expect("sent").text().await.expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

async fn status_of(url: &str, path: &str) -> u16 {
    client().get(format!("{url}{path}")).send().await.map_or(0, |r| r.status().as_u16())
}

/// A streamed completion as vLLM's benchmark client reads it: line by line, blank lines and `:` comments skipped,
/// `data: ` stripped, `[DONE]` last.
#[derive(Debug, Default)]
struct Streamed {
    status: u16,
    /// Whether the first non-empty line of the body was a data line (that client cannot start on a comment).
    starts_with_data: bool,
    comments: usize,
    text: String,
    finish_reason: Option<String>,
    usage: Option<Value>,
    error: Option<Value>,
    done: bool,
}

async fn stream(url: &str, body: Value) -> Streamed {
    let resp = client().post(format!("{url}/v1/completions")).json(&body).send().await.expect("sent");
    let mut out = Streamed { status: resp.status().as_u16(), ..Default::default() };
    let text = resp.text().await.expect("body");
    if out.status != 200 {
        out.error = serde_json::from_str(&text).ok();
        return out;
    }
    let mut first = true;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if first {
            out.starts_with_data = line.starts_with("data: ");
            first = false;
        }
        if line.starts_with(':') {
            out.comments += 1;
            continue;
        }
        let data = line.strip_prefix("data: ").expect("an SSE data line");
        if data == "[DONE]" {
            out.done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(data).expect("json");
        if chunk.get("error").is_some() {
            out.error = Some(chunk);
            continue;
        }
        if let Some(c) = chunk["choices"].get(0) {
            out.text.push_str(c["text"].as_str().unwrap_or(""));
            if let Some(r) = c["finish_reason"].as_str() {
                out.finish_reason = Some(r.to_owned());
            }
        }
        if !chunk["usage"].is_null() {
            out.usage = Some(chunk["usage"].clone());
        }
    }
    out
}

fn greedy(p: &[u32], max_tokens: usize, streamed: bool) -> Value {
    json!({
        "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true,
        "stream": streamed, "stream_options": {"include_usage": true},
    })
}

/// Waits (bounded) until the router has generated at least `n` tokens.
async fn wait_for_tokens(url: &str, n: f64) {
    for _ in 0..400 {
        if metric(url, "moe_generation_tokens_total").await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no tokens within 4 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lost_without_replica_holds_every_stream_and_loses_none() {
    let dir = fixture("qwen35");
    let mut low = ExpertNodeProcess::start(&dir, "0-3", &[]).expect("node");
    let high = ExpertNodeProcess::start(&dir, "4-7", &[]).expect("node");
    let addr = low.addr().to_owned();
    let at = format!("{addr},{}", high.addr());
    let router = RouterProcess::start(&dir, &["--experts-at", &at, "--sse-keepalive-secs", "0.3"]).expect("router");
    let url = router.url().to_owned();
    let lm = LoadedModel::load(&dir).expect("loads");
    let streams = start_greedy_streams(&url, &lm, 4, 64);
    wait_for_tokens(&url, 8.0).await;
    low.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(status_of(&url, "/readyz").await, 503, "ready with experts 0-3 gone");
    let restarted = ExpertNodeProcess::start_at(&dir, &addr, "0-3", &[]).expect("the node restarts on its port");

    let mut comments = 0;
    for (i, s) in streams.finish("the outage").await.into_iter().enumerate() {
        assert_eq!(s.status, 200);
        assert!(s.starts_with_data, "stream {i} began with a comment");
        assert_eq!(s.finish_reason.as_deref(), Some("length"));
        assert_eq!(s.usage.as_ref().map(|u| u["completion_tokens"].clone()), Some(json!(64)));
        assert!(s.done);
        comments += s.comments;
    }
    assert!(comments > 0, "no keep-alive during a 1.5 s hold with a 0.3 s interval");
    for _ in 0..50 {
        if status_of(&url, "/readyz").await == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status_of(&url, "/readyz").await, 200);
    assert_eq!(metric(&url, "moe_requests_finished_total").await, 4.0);
    assert_eq!(metric(&url, "moe_requests_failed_total").await, 0.0);
    assert!(metric(&url, "moe_expert_holds_total").await >= 1.0);
    assert!(metric(&url, "moe_expert_reconnects_total").await >= 1.0);
    assert_eq!(metric(&url, "moe_expert_holding").await, 0.0);
    assert_eq!(metric(&url, "moe_num_requests_running").await, 0.0);
    drop(restarted);
}

/// A node frozen (SIGSTOP) longer than keepalive detection and then thawed: marked down as hung, reconnected once it
/// answers again, and the streams that waited for its experts complete with the fault-free text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_frozen_past_keepalive_is_reconnected_when_it_thaws_and_loses_nothing() {
    let dir = fixture("qwen35");
    let low = ExpertNodeProcess::start(&dir, "0-3", &[]).expect("node");
    let high = ExpertNodeProcess::start(&dir, "4-7", &[]).expect("node");
    let at = format!("{},{}", low.addr(), high.addr());
    let router = RouterProcess::start(&dir, &["--experts-at", &at]).expect("router");
    let url = router.url().to_owned();
    let lm = LoadedModel::load(&dir).expect("loads");
    let streams = start_greedy_streams(&url, &lm, 3, 64);
    wait_for_tokens(&url, 6.0).await;
    low.signal("STOP").expect("stopped");
    // Keepalive (2 s interval, 5 s timeout) declares it hung within about 7 s.
    let mut noticed = false;
    for _ in 0..150 {
        if status_of(&url, "/readyz").await == 503 {
            noticed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    low.signal("CONT").expect("continued");
    assert!(noticed, "the frozen node was not noticed within 15 s");
    streams.finish("the freeze").await;
    assert_eq!(metric(&url, "moe_requests_failed_total").await, 0.0);
    assert!(metric(&url, "moe_expert_reconnects_total").await >= 1.0, "the thawed node was not reconnected");
}

async fn stream_owned(url: String, body: Value) -> Streamed {
    stream(&url, body).await
}

/// Greedy streams running against a router, with the text each must end with (the in-process engine's).
struct GreedyStreams {
    want: Vec<String>,
    tasks: Vec<tokio::task::JoinHandle<Streamed>>,
}

/// Starts `n` greedy streams of `max_tokens` tokens on `url`.
fn start_greedy_streams(url: &str, lm: &LoadedModel, n: u32, max_tokens: usize) -> GreedyStreams {
    let prompts: Vec<Vec<u32>> = (0..n).map(prompt).collect();
    GreedyStreams {
        want: prompts.iter().map(|p| local_greedy(lm, p, max_tokens)).collect(),
        tasks: prompts
            .iter()
            .map(|p| tokio::spawn(stream_owned(url.to_owned(), greedy(p, max_tokens, true))))
            .collect(),
    }
}

impl GreedyStreams {
    /// Waits for every stream; each must have ended without an error, with the fault-free text (`across` names the
    /// fault in the message).
    async fn finish(self, across: &str) -> Vec<Streamed> {
        let mut out = Vec::with_capacity(self.tasks.len());
        for (i, (task, want)) in self.tasks.into_iter().zip(&self.want).enumerate() {
            let s = task.await.expect("stream task");
            assert!(s.error.is_none(), "stream {i} failed: {:?}", s.error);
            assert_eq!(&s.text, want, "stream {i}: greedy text changed across {across}");
            out.push(s);
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_end_only_their_own_requests_and_the_queue_sheds_with_retry_after() {
    let dir = fixture("qwen35");
    let mut low = ExpertNodeProcess::start(&dir, "0-3", &[]).expect("node");
    let high = ExpertNodeProcess::start(&dir, "4-7", &[]).expect("node");
    let addr = low.addr().to_owned();
    let at = format!("{addr},{}", high.addr());
    let router =
        RouterProcess::start(&dir, &["--experts-at", &at, "--max-running", "2", "--max-queue-wait-secs", "0.5"])
            .expect("router");
    let url = router.url().to_owned();
    let lm = LoadedModel::load(&dir).expect("loads");

    // Two requests running when the node dies: a short deadline, and the server's.
    let short = {
        let mut b = greedy(&prompt(1), 64, false);
        b["request_timeout"] = json!(2.0);
        let url = url.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let r = client().post(format!("{url}/v1/completions")).json(&b).send().await.expect("sent");
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null), started.elapsed())
        })
    };
    let patient_prompt = prompt(2);
    let patient = tokio::spawn(stream_owned(url.clone(), greedy(&patient_prompt, 64, true)));
    wait_for_tokens(&url, 4.0).await;
    low.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A third waits in the queue (two run, held) longer than the limit: shed with 503 and Retry-After.
    let resp = client().post(format!("{url}/v1/completions")).json(&greedy(&prompt(3), 4, true)).send().await;
    let resp = resp.expect("sent");
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.headers().get("retry-after").is_some(), "no Retry-After on a shed request");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "overloaded", "{body}");

    let (status, body, took) = short.await.expect("task");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "timeout", "{body}");
    assert!(took < Duration::from_secs(10), "the 2 s deadline took {took:?}");

    let restarted = ExpertNodeProcess::start_at(&dir, &addr, "0-3", &[]).expect("restarts");
    let s = patient.await.expect("task");
    assert!(s.error.is_none(), "{:?}", s.error);
    assert_eq!(s.text, local_greedy(&lm, &patient_prompt, 64));
    let finished = metric(&url, "moe_requests_finished_total").await;
    let ended = metric(&url, "moe_requests_cancelled_total").await
        + metric(&url, "moe_requests_failed_total").await
        + metric(&url, "moe_requests_expired_total").await
        + metric(&url, "moe_requests_shed_total").await;
    assert_eq!((finished, ended), (1.0, 2.0), "3 requests: 1 completed, 1 past its deadline, 1 shed");
    assert_eq!(metric(&url, "moe_requests_shed_total").await, 1.0);
    drop(restarted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_sigterm_under_load_completes_every_stream_and_exits_cleanly() {
    let dir = fixture("qwen35");
    let node = ExpertNodeProcess::start(&dir, "all", &[]).expect("node");
    let mut router = RouterProcess::start(&dir, &["--experts-at", node.addr()]).expect("router");
    let url = router.url().to_owned();
    let lm = LoadedModel::load(&dir).expect("loads");
    let streams = start_greedy_streams(&url, &lm, 6, 48);
    wait_for_tokens(&url, 6.0).await;
    let pid = router.pid();
    let exit = tokio::task::spawn_blocking(move || {
        let status = router.terminate();
        (status, router.log_text())
    });
    for s in streams.finish("the router's drain").await {
        assert!(s.done);
    }
    let (status, log) = exit.await.expect("task");
    let status = status.expect("the router stops within 15 s of SIGTERM");
    assert!(status.success(), "router {pid} exited with {status:?}:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// Waits (bounded) until the node's log says it registered in the cluster.
fn wait_registered(node: &ExpertNodeProcess) {
    for _ in 0..200 {
        if node.log_text().contains("registered") {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the node did not register:\n{}", node.log_text());
}

#[test]
fn an_expert_node_drains_and_exits_within_its_timeout_while_etcd_is_down() {
    let dir = fixture("qwen35");
    let mut etcd = EtcdServer::start().expect("etcd");
    let mut node = ExpertNodeProcess::join(&dir, etcd.endpoint(), "drain-etcd-down", &["--drain-timeout-secs", "3"])
        .expect("node joins");
    wait_registered(&node);
    etcd.kill();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let status = node.terminate().expect("the node exits within 15 s of SIGTERM with etcd down");
    assert!(status.success(), "{status:?}:\n{}", node.log_text());
    assert!(started.elapsed() < Duration::from_secs(12), "took {:?}", started.elapsed());
}

#[test]
fn a_second_sigterm_exits_at_once() {
    let dir = fixture("qwen35");
    let mut etcd = EtcdServer::start().expect("etcd");
    let mut node = ExpertNodeProcess::join(&dir, etcd.endpoint(), "second-signal", &["--drain-timeout-secs", "60"])
        .expect("node joins");
    wait_registered(&node);
    etcd.kill();
    node.signal("TERM").expect("first");
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let status = node.terminate().expect("a second SIGTERM ends it");
    assert_eq!(status.code(), Some(130), "{}", node.log_text());
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unloading_every_expert_of_a_static_node_turns_readyz_false() {
    use moe_proto::v1::{ExpertSet, UnloadExpertsRequest};
    let dir = fixture("qwen35");
    let node = ExpertNodeProcess::start(&dir, "all", &[]).expect("node");
    let router = RouterProcess::start(&dir, &["--experts-at", node.addr()]).expect("router");
    let url = router.url().to_owned();
    assert_eq!(status_of(&url, "/readyz").await, 200);
    let mut grpc = moe_proto::ExpertServiceClient::connect(format!("http://{}", node.addr())).await.expect("grpc");
    let config = moe_model::ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let all = ExpertSet::from_rows(
        (0..config.num_hidden_layers)
            .filter(|&l| config.is_moe_layer(l))
            .map(|l| (l, (0..config.num_experts as u32).collect())),
    );
    grpc.unload_experts(UnloadExpertsRequest { experts: Some(all) }).await.expect("unloads");
    let mut ready = 200;
    for _ in 0..60 {
        ready = status_of(&url, "/readyz").await;
        if ready == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready, 503, "/readyz stayed 200 with nothing hosted");
}

/// Waits (bounded) until `url` answers /readyz with 200.
async fn wait_ready(url: &str) {
    for _ in 0..300 {
        if status_of(url, "/readyz").await == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} never became ready");
}

/// The fixture model's experts take 12 KiB each (4 MoE layers of 8): room for 12 on a node, 3 per layer.
const TWELVE_EXPERTS_GIB: &str = "0.000138";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_replicas_absorb_a_node_loss_without_a_hold() {
    let dir = fixture("qwen35");
    let etcd = EtcdServer::start().expect("etcd");
    let endpoint = etcd.endpoint().to_owned();
    // Room for the whole model on each node: the first epoch puts a replica of everything in the spare memory.
    let join = |name: &str| {
        ExpertNodeProcess::join(&dir, &endpoint, "replicas", &["--node-id", name, "--memory-gib", "0.0004"])
            .expect("expert node")
    };
    let mut nodes = vec![join("node-a"), join("node-b")];
    let router = RouterProcess::start(&dir, &["--etcd", &endpoint, "--cluster", "replicas", "--lease-ttl-secs", "2"])
        .expect("router");
    let url = router.url().to_owned();
    wait_ready(&url).await;
    let lm = LoadedModel::load(&dir).expect("loads");
    let streams = start_greedy_streams(&url, &lm, 4, 64);
    wait_for_tokens(&url, 8.0).await;
    nodes[1].kill();
    streams.finish("the loss").await;
    assert_eq!(metric(&url, "moe_requests_finished_total").await, 4.0);
    assert_eq!(metric(&url, "moe_expert_holds_total").await, 0.0, "a replica existed, yet the step was held");
    drop(nodes);
}

/// Nodes with no spare memory: a lost node's experts have no replica and no room elsewhere, so the streams hold
/// until a node with room joins and the controller's epoch places them there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_a_node_lost_without_replica_holds_until_a_node_with_room_joins() {
    let dir = fixture("qwen35");
    let etcd = EtcdServer::start().expect("etcd");
    let endpoint = etcd.endpoint().to_owned();
    let join = |name: &str, gib: &str| {
        ExpertNodeProcess::join(&dir, &endpoint, "repair", &["--node-id", name, "--memory-gib", gib])
            .expect("expert node")
    };
    let mut nodes = vec![
        join("node-a", TWELVE_EXPERTS_GIB),
        join("node-b", TWELVE_EXPERTS_GIB),
        join("node-c", TWELVE_EXPERTS_GIB),
    ];
    let router = RouterProcess::start(&dir, &["--etcd", &endpoint, "--cluster", "repair", "--lease-ttl-secs", "2"])
        .expect("router");
    let url = router.url().to_owned();
    wait_ready(&url).await;
    let lm = LoadedModel::load(&dir).expect("loads");
    let streams = start_greedy_streams(&url, &lm, 4, 64);
    wait_for_tokens(&url, 8.0).await;
    nodes[1].kill();
    // The two left cannot take node-b's experts; only a new node can.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(status_of(&url, "/readyz").await, 503, "ready without node-b's experts");
    let started = Instant::now();
    nodes.push(join("node-d", "0.0004"));
    for s in streams.finish("the repair").await {
        assert_eq!(s.finish_reason.as_deref(), Some("length"));
    }
    eprintln!("streams completed {:?} after node-d joined", started.elapsed());
    assert_eq!(metric(&url, "moe_requests_finished_total").await, 4.0);
    assert_eq!(metric(&url, "moe_requests_failed_total").await, 0.0);
    assert!(metric(&url, "moe_expert_holds_total").await >= 1.0, "nothing was held");
    assert_eq!(metric(&url, "moe_expert_holding").await, 0.0);
    wait_ready(&url).await;
    drop(nodes);
}

#[test]
fn a_member_id_already_in_use_is_refused_at_join() {
    let dir = fixture("qwen35");
    let etcd = EtcdServer::start().expect("etcd");
    let first = ExpertNodeProcess::join(&dir, etcd.endpoint(), "ids", &["--node-id", "same"]).expect("first joins");
    wait_registered(&first);
    let mut second = ExpertNodeProcess::join(&dir, etcd.endpoint(), "ids", &["--node-id", "same"]).expect("starts");
    let mut exited = false;
    for _ in 0..300 {
        if !second.is_running() {
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = second.log_text();
    assert!(exited, "a second member with the same id kept running:\n{log}");
    assert!(log.contains("already taken"), "{log}");
    assert!(first.log_text().contains("registered"));
}

/// A router that sends work and never reads the answers stalls only itself: another router's generation on the
/// same node completes, and the node's compute thread never waits for the silent one.
#[test]
fn a_router_that_stops_reading_stalls_nobody_else() {
    use moe_model::{generate, GenerateRequest, Residency, SamplingParams};
    use moe_proto::v1::{Dtype, ForwardRequest, Routing};
    use router_node::{RemoteExperts, RemoteOptions};

    let dir = fixture("qwen35");
    let node = ExpertNodeProcess::start(&dir, "all", &[]).expect("node");
    let config = moe_model::ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let layer = (0..config.num_hidden_layers).find(|&l| config.is_moe_layer(l)).expect("a MoE layer") as u32;
    let h = config.hidden_size;
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    // The silent router: 400 requests of 32 tokens, never a read.
    let _silent = runtime.block_on(async {
        let mut client =
            moe_proto::ExpertServiceClient::connect(format!("http://{}", node.addr())).await.expect("connects");
        let (tx, rx) = tokio::sync::mpsc::channel(512);
        let responses = client.forward(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("forward");
        for id in 0..400u64 {
            let n = 32;
            let req = ForwardRequest {
                id,
                layer,
                epoch: 0,
                dtype: Dtype::F32 as i32,
                hidden_size: h as u32,
                num_tokens: n,
                activations: moe_proto::codec::encode(&vec![0.5f32; n as usize * h], Dtype::F32),
                routing: Some(Routing {
                    offsets: (0..=n).collect(),
                    experts: vec![0; n as usize],
                    weights: vec![1.0; n as usize],
                }),
                deadline_us: 0,
            };
            if tx.send(req).await.is_err() {
                break;
            }
        }
        (tx, responses)
    });
    std::thread::sleep(Duration::from_millis(500));

    let lm = LoadedModel::load_selected(&dir, Residency::Resident, &|_, _| {}, &|_, _| false).expect("loads");
    let local = LoadedModel::load(&dir).expect("loads");
    let remote = RemoteExperts::connect(
        &[node.addr().to_owned()],
        lm.model.config(),
        lm.fingerprint,
        RemoteOptions { deadline: Duration::from_secs(20), ..RemoteOptions::default() },
    )
    .expect("connects");
    let req = GenerateRequest {
        prompt: prompt(3),
        max_tokens: 16,
        sampling: SamplingParams { temperature: 0.0, ..Default::default() },
        logprobs: 0,
        echo: false,
        stop_ids: Vec::new(),
    };
    let started = Instant::now();
    let got = generate(&lm.model, &remote, &req, |_| {}).expect("the other router is served");
    let took = started.elapsed();
    let want = generate(&local.model, &local.experts, &req, |_| {}).expect("generates");
    assert_eq!(got.output_ids, want.output_ids);
    assert!(took < Duration::from_secs(15), "the other router waited {took:?}");
    eprintln!("served beside a silent router in {took:?}");
}
