//! The fault matrix through the whole server: real expert-node and router-node processes on loopback, real HTTP
//! clients. Each test asserts that nothing is lost: every request ends in exactly one outcome its client sees
//! (complete with its finish reason and usage, or an explicit error), greedy text equals the fault-free run, and the
//! counters reconcile.

mod common;

use std::time::{Duration, Instant};

use common::*;
use moe_e2e::{fixture, local_greedy, memory_of, EtcdServer, ExpertNodeProcess, RouterProcess};
use moe_model::LoadedModel;
use serde_json::{json, Value};

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

/// A node frozen (SIGSTOP) for 30 s and then thawed: marked down as hung within keepalive detection, the streams
/// held meanwhile, the node reconnected once it answers again, and the streams complete with the fault-free text.
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
    let frozen = Instant::now();
    // Keepalive (2 s interval, 5 s timeout) declares it hung within about 7 s.
    let mut noticed = false;
    for _ in 0..150 {
        if status_of(&url, "/readyz").await == 503 {
            noticed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !noticed {
        low.signal("CONT").expect("continued");
        panic!("the frozen node was not noticed within 15 s");
    }
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(frozen.elapsed())).await;
    assert_eq!(status_of(&url, "/readyz").await, 503);
    low.signal("CONT").expect("continued");
    streams.finish("the freeze").await;
    assert_eq!(metric(&url, "moe_requests_failed_total").await, 0.0);
    assert!(metric(&url, "moe_expert_reconnects_total").await >= 1.0, "the thawed node was not reconnected");
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
    let mut grpc = moe_e2e::tls::client(node.addr(), moe_tls::Role::Controller).await;
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
        let mut client = moe_e2e::tls::client(node.addr(), moe_tls::Role::Router).await;
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
                traceparent: String::new(),
                reduce: 0,
                cancel: Vec::new(),
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
        RemoteOptions {
            deadline: Duration::from_secs(20),
            tls: Some(moe_e2e::tls::identity(moe_tls::Role::Router)),
            ..RemoteOptions::default()
        },
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

/// Three times what the router admits at once, arriving together: each request is served (with the fault-free text,
/// within its deadline) or refused at once with 429 or 503 and `Retry-After`; nothing else, and memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_times_the_capacity_is_served_or_shed_and_memory_stays_bounded() {
    let dir = fixture("qwen35");
    let node = ExpertNodeProcess::start(&dir, "all", &[]).expect("node");
    // Four run, eight may wait (each at most 0.3 s): twelve at once; thirty-six arrive.
    let router = RouterProcess::start(
        &dir,
        &["--experts-at", node.addr(), "--max-running", "4", "--max-queue", "8", "--max-queue-wait-secs", "0.3"],
    )
    .expect("router");
    let url = router.url().to_owned();
    let lm = LoadedModel::load(&dir).expect("loads");
    let (_, idle_rss) = memory_of(router.pid());
    let prompts: Vec<Vec<u32>> = (0..36).map(prompt).collect();
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut body = greedy(p, 48, false);
            body["request_timeout"] = json!(30.0);
            let url = url.clone();
            tokio::spawn(async move {
                let r = client().post(format!("{url}/v1/completions")).json(&body).send().await.expect("sent");
                let status = r.status().as_u16();
                let retry_after = r.headers().get("retry-after").is_some();
                (status, retry_after, r.json::<Value>().await.expect("a JSON body"))
            })
        })
        .collect();
    let (mut served, mut shed) = (0, 0);
    for (i, task) in tasks.into_iter().enumerate() {
        let (status, retry_after, body) = task.await.expect("task");
        match status {
            200 => {
                served += 1;
                assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
                assert_eq!(body["choices"][0]["text"].as_str(), Some(local_greedy(&lm, &prompts[i], 48).as_str()));
            }
            429 | 503 => {
                shed += 1;
                assert!(retry_after, "request {i}: {status} without Retry-After");
                assert_eq!(body["error"]["code"], "overloaded", "request {i}: {body}");
            }
            other => panic!("request {i}: unexpected {other}: {body}"),
        }
    }
    eprintln!("36 at once: {served} served, {shed} shed");
    assert!(served >= 4, "fewer served than run at once");
    assert!(shed >= 1, "nothing was shed at three times the capacity");
    let finished = metric(&url, "moe_requests_finished_total").await;
    assert_eq!(finished, served as f64);
    assert_eq!(metric(&url, "moe_requests_expired_total").await, 0.0, "an admitted request missed its deadline");
    assert_eq!(metric(&url, "moe_num_requests_running").await, 0.0);
    assert_eq!(metric(&url, "moe_num_requests_waiting").await, 0.0);
    assert_eq!(metric(&url, "vllm:num_requests_waiting").await, 0.0);
    let (peak, _) = memory_of(router.pid());
    assert!(peak < idle_rss + (256 << 20), "the router's memory rose from {idle_rss} to a peak of {peak} bytes");
}

/// Greedy requests, one after another on each of `workers` clients, until `stop` is set: every one must complete
/// with the fault-free text. Returns how many completed.
fn closed_loop(
    url: &str,
    lm: &std::sync::Arc<LoadedModel>,
    workers: u32,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<usize>> {
    (0..workers)
        .map(|w| {
            let (url, lm, stop) = (url.to_owned(), lm.clone(), stop.clone());
            tokio::spawn(async move {
                let mut done = 0;
                // Bounded: at most 2000 requests per client.
                for k in 0..2000u32 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let p = prompt(w * 1000 + k);
                    let want = local_greedy(&lm, &p, 12);
                    let r = client().post(format!("{url}/v1/completions")).json(&greedy(&p, 12, false)).send().await;
                    let r = r.expect("sent");
                    let status = r.status().as_u16();
                    let body: Value = r.json().await.expect("json");
                    assert_eq!(status, 200, "client {w} request {k}: {body}");
                    assert_eq!(body["choices"][0]["text"].as_str(), Some(want.as_str()), "client {w} request {k}");
                    done += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                done
            })
        })
        .collect()
}

/// etcd gone for 60 s under load: the data plane serves on from the placement it has, and the cluster reconciles
/// when etcd returns (a node that joins then is given experts and used).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_for_a_minute_under_load_loses_nothing_and_the_cluster_reconciles_after() {
    let dir = fixture("qwen35");
    let mut etcd = EtcdServer::start().expect("etcd");
    let endpoint = etcd.endpoint().to_owned();
    let join = |name: &str| {
        ExpertNodeProcess::join(&dir, &endpoint, "etcd-down", &["--node-id", name, "--memory-gib", "0.0004"])
            .expect("expert node")
    };
    let mut nodes = vec![join("node-a"), join("node-b")];
    let router = RouterProcess::start(&dir, &["--etcd", &endpoint, "--cluster", "etcd-down", "--lease-ttl-secs", "2"])
        .expect("router");
    let url = router.url().to_owned();
    wait_ready(&url).await;
    let lm = std::sync::Arc::new(LoadedModel::load(&dir).expect("loads"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = closed_loop(&url, &lm, 2, &stop);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = metric(&url, "moe_requests_finished_total").await;
    etcd.kill();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let during = metric(&url, "moe_requests_finished_total").await - before;
    assert_eq!(status_of(&url, "/readyz").await, 200, "etcd's absence made the router unready");
    etcd.restart().expect("etcd returns");
    // A node that joins after etcd returns is given experts by the controller.
    nodes.push(join("node-c"));
    let mut placed = false;
    for _ in 0..300 {
        if nodes[2].log_text().contains("placement epoch ready") {
            placed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut completed = 0;
    for c in clients {
        completed += c.await.expect("a client's request failed");
    }
    assert!(placed, "no placement for a node that joined after etcd returned:\n{}", nodes[2].log_text());
    eprintln!("{completed} requests completed; {during} while etcd was down");
    assert!(during >= 10.0, "only {during} requests completed while etcd was down");
    assert_eq!(metric(&url, "moe_requests_failed_total").await, 0.0);
    drop(nodes);
}

/// etcd killed just as the controller starts re-placing a lost node's experts, and started again 5 s later: the
/// streams hold, then complete with the fault-free text; no piece was served under a placement its node did not
/// have (the nodes refuse other epochs, and the text is exact).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_during_a_re_placement_loses_nothing() {
    let dir = fixture("qwen35");
    let mut etcd = EtcdServer::start().expect("etcd");
    let endpoint = etcd.endpoint().to_owned();
    let join = |name: &str, gib: &str| {
        ExpertNodeProcess::join(&dir, &endpoint, "etcd-restart", &["--node-id", name, "--memory-gib", gib])
            .expect("expert node")
    };
    // No replicas (no spare memory), and node-d has room for node-b's experts when it goes.
    let mut nodes = vec![
        join("node-a", TWELVE_EXPERTS_GIB),
        join("node-b", TWELVE_EXPERTS_GIB),
        join("node-c", TWELVE_EXPERTS_GIB),
    ];
    let router =
        RouterProcess::start(&dir, &["--etcd", &endpoint, "--cluster", "etcd-restart", "--lease-ttl-secs", "2"])
            .expect("router");
    let url = router.url().to_owned();
    wait_ready(&url).await;
    nodes.push(join("node-d", TWELVE_EXPERTS_GIB));
    wait_registered(&nodes[3]);
    let lm = LoadedModel::load(&dir).expect("loads");
    let streams = start_greedy_streams(&url, &lm, 3, 64);
    wait_for_tokens(&url, 6.0).await;
    nodes[1].kill();
    // The lease (2 s) expires, the controller writes a repair epoch: etcd goes down around then.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    etcd.kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    etcd.restart().expect("etcd returns");
    for s in streams.finish("etcd's restart during the repair").await {
        assert_eq!(s.finish_reason.as_deref(), Some("length"));
    }
    wait_ready(&url).await;
    assert_eq!(metric(&url, "moe_requests_finished_total").await, 3.0);
    assert_eq!(metric(&url, "moe_requests_failed_total").await, 0.0);
    assert_eq!(metric(&url, "moe_expert_holding").await, 0.0);
    drop(nodes);
}

/// A client that goes away mid-stream: its sequence leaves the batch at the next step, so the expert nodes stop
/// computing for it (their token counter stops), and the request is counted once, as cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_stops_the_nodes_work_for_it() {
    use moe_proto::v1::StatusRequest;
    let dir = fixture("qwen35");
    let node = ExpertNodeProcess::start(&dir, "all", &[]).expect("node");
    let router = RouterProcess::start(&dir, &["--experts-at", node.addr()]).expect("router");
    let url = router.url().to_owned();
    let mut grpc = moe_e2e::tls::client(node.addr(), moe_tls::Role::Controller).await;
    let mut node_tokens = async || grpc.status(StatusRequest {}).await.expect("status").into_inner().tokens;

    let mut resp = client()
        .post(format!("{url}/v1/completions"))
        .json(&greedy(&prompt(1), 1500, true))
        .send()
        .await
        .expect("sent");
    let mut seen = 0;
    while seen < 20 {
        let chunk = resp.chunk().await.expect("a chunk").expect("the stream goes on");
        seen += chunk.iter().filter(|&&b| b == b'\n').count() / 2;
    }
    let before = node_tokens().await;
    assert!(before > 0, "the node computed nothing");
    drop(resp);
    // The router notices at the next write, and the engine drops the sequence at the next step.
    let mut cancelled = false;
    for _ in 0..100 {
        if metric(&url, "moe_requests_cancelled_total").await == 1.0 {
            cancelled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cancelled, "the disconnect was not noticed within 2 s");
    let after_cancel = node_tokens().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(node_tokens().await, after_cancel, "the node kept computing for a client that left");
    assert_eq!(metric(&url, "moe_num_requests_running").await, 0.0);
    assert_eq!(metric(&url, "moe_requests_finished_total").await, 0.0);
    eprintln!("node tokens: {before} when the client left, {after_cancel} once cancelled (of 1500 asked)");
}
