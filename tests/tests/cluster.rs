//! A cluster of separate processes on a real etcd: expert nodes that join and drain, two routers that elect one
//! controller, placement epochs that change under traffic, and greedy output that never changes.

use std::process::Command;
use std::time::{Duration, Instant};

use moe_e2e::{bin, fixture, local_greedy, EtcdServer, ExpertNodeProcess, RouterProcess};
use moe_model::LoadedModel;
use moe_placement::{Cluster, ClusterView, EtcdStore};
use serde_json::{json, Value};

/// Room for a bit more than the whole fixture model (32 experts of 12 KiB) on every node.
const MEMORY_GIB: &str = "0.0004";
const CLUSTER: &str = "e2e";

async fn complete(url: &str, prompt: &[u32], max_tokens: usize) -> String {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("client");
    let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true});
    let resp = client.post(format!("{url}/v1/completions")).json(&body).send().await.expect("sent");
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.expect("json");
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["text"].as_str().expect("text").to_owned()
}

async fn ready(url: &str) -> bool {
    let client = reqwest::Client::new();
    client.get(format!("{url}/readyz")).send().await.is_ok_and(|r| r.status().is_success())
}

async fn wait_for(what: &str, limit: Duration, cluster: &Cluster, check: impl Fn(&ClusterView) -> bool) -> ClusterView {
    let start = Instant::now();
    loop {
        let view = cluster.snapshot().await.expect("snapshot");
        if check(&view) {
            eprintln!("{what}: after {:.2} s", start.elapsed().as_secs_f64());
            return view;
        }
        assert!(start.elapsed() < limit, "{what} did not happen within {limit:?}: {view:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every live router dispatches with the newest epoch, and `check` holds for it.
fn settled(view: &ClusterView, check: impl Fn(&moe_placement::Placement) -> bool) -> bool {
    let Some(p) = &view.placement else { return false };
    let routers = view.members.values().filter(|m| m.role == moe_placement::Role::Router);
    check(p) && routers.clone().count() > 0 && routers.into_iter().all(|r| view.using.get(&r.id) == Some(&p.epoch))
}

fn moectl(etcd: &str, args: &[&str]) -> Value {
    let out = Command::new(bin("moectl"))
        .args(["placement", "--etcd", etcd, "--cluster", CLUSTER, "--json"])
        .args(args)
        .output()
        .expect("moectl runs");
    assert!(out.status.success(), "moectl placement {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("moectl placement {args:?} printed {text}: {e}"))
}

/// `moectl plan --placement current` against the cluster, with the CPU profile shipped in deploy/profiles/.
fn plan_what_if(etcd: &str, model: &std::path::Path) -> Value {
    let profile = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/profiles/cpu-xeon-amx-2c.json");
    let out = Command::new(bin("moectl"))
        .args(["plan", "--placement", "current", "--etcd", etcd, "--cluster", CLUSTER, "--json"])
        .arg("--model")
        .arg(model)
        .arg("--hardware")
        .arg(&profile)
        .args(["--traffic", "concurrency=4,prompt=8,output=16,requests=16"])
        .output()
        .expect("moectl runs");
    assert!(out.status.success(), "moectl plan --placement current: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("moectl plan printed {text}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_drain_and_routers_fail_over_without_changing_output() {
    let dir = fixture("qwen35");
    let etcd = EtcdServer::start().expect("etcd");
    let endpoint = etcd.endpoint().to_owned();
    let store = EtcdStore::connect(std::slice::from_ref(&endpoint), Duration::from_secs(5)).await.expect("etcd client");
    let cluster = Cluster::new(std::sync::Arc::new(store), CLUSTER).expect("cluster");
    let join = |name: &str| {
        ExpertNodeProcess::join(&dir, &endpoint, CLUSTER, &["--node-id", name, "--memory-gib", MEMORY_GIB])
            .expect("expert node")
    };
    let mut nodes = vec![join("node-a"), join("node-b")];
    let router_args = ["--etcd", endpoint.as_str(), "--cluster", CLUSTER, "--lease-ttl-secs", "2"];
    let mut routers = vec![
        RouterProcess::start(&dir, &[&router_args[..], &["--node-id", "router-1"]].concat()).expect("router"),
        RouterProcess::start(&dir, &[&router_args[..], &["--node-id", "router-2"]].concat()).expect("router"),
    ];

    let lm = LoadedModel::load(&dir).expect("reference model");
    let prompts: Vec<Vec<u32>> = (0..3u32).map(|i| (0..6 + i).map(|k| (i * 31 + k * 7 + 5) % 250).collect()).collect();
    let expected: Vec<String> = prompts.iter().map(|p| local_greedy(&lm, p, 24)).collect();
    let check_all = |url: String| {
        let (prompts, expected) = (prompts.clone(), expected.clone());
        async move {
            for (p, want) in prompts.iter().zip(&expected) {
                assert_eq!(&complete(&url, p, 24).await, want, "greedy output through {url}");
            }
        }
    };

    // 1. The controller places the experts over the two nodes; both routers switch to that epoch.
    let view =
        wait_for("initial placement served", Duration::from_secs(60), &cluster, |v| settled(v, |p| p.nodes.len() == 2))
            .await;
    let p1 = view.placement.clone().expect("placement");
    p1.validate(&cluster.snapshot().await.expect("snapshot").model.expect("model shape")).expect("every expert placed");
    assert!(p1.counts().iter().sum::<usize>() > 32, "the spare memory holds no replica: {:?}", p1.counts());
    for r in &routers {
        let start = Instant::now();
        while !ready(r.url()).await {
            assert!(start.elapsed() < Duration::from_secs(10), "router not ready:\n{}", r.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    check_all(routers[0].url().to_owned()).await;

    // 2. A third node joins and takes a share of the experts.
    nodes.push(join("node-c"));
    wait_for("node-c placed and served", Duration::from_secs(30), &cluster, |v| {
        settled(v, |p| p.node_index("node-c").is_some_and(|i| p.counts()[i] > 0))
    })
    .await;
    check_all(routers[1].url().to_owned()).await;

    // The planner's what-if reads this cluster from etcd: its two routers, three nodes and the load they routed.
    let view = wait_for("a load report", Duration::from_secs(30), &cluster, |v| {
        v.model.as_ref().is_some_and(|m| v.total_load(m).iter().flatten().sum::<f64>() > 0.0)
    })
    .await;
    let placement = view.placement.clone().expect("placement");
    let what_if = plan_what_if(&endpoint, &dir);
    assert_eq!(what_if["cluster"]["epoch"], json!(placement.epoch), "{what_if}");
    assert_eq!(what_if["cluster"]["routers"], json!(2), "{what_if}");
    assert_eq!(what_if["cluster"]["expert_nodes"], json!(3), "{what_if}");
    assert!(what_if["cluster"]["measured_pairs_per_s"].as_f64().is_some_and(|r| r > 0.0), "{what_if}");
    let changes = what_if["changes"].as_array().expect("changes");
    assert_eq!(changes[0]["candidate"]["expert_nodes"], json!(3), "{what_if}");
    assert_eq!(changes[1]["candidate"]["expert_nodes"], json!(4), "{what_if}");
    assert_eq!(changes[2]["candidate"]["routers"], json!(3), "{what_if}");
    // More of anything buys nothing or something; the extra sends of one more node may take back under 1 %.
    assert!(changes.iter().all(|c| c["throughput_ratio"].as_f64().is_some_and(|r| r >= 0.99)), "{what_if}");

    // 3. Drain node-a with moectl while a long request runs: the request's output does not change.
    let long_prompt = prompts[0].clone();
    let long_expected = local_greedy(&lm, &long_prompt, 48);
    let url = routers[0].url().to_owned();
    let inflight = tokio::spawn(async move { complete(&url, &long_prompt, 48).await });
    let endpoint2 = endpoint.clone();
    let drained = tokio::task::spawn_blocking(move || moectl(&endpoint2, &["drain", "node-a"])).await.expect("drain");
    eprintln!("drain: {drained}");
    assert_eq!(drained["exited"], json!(true));
    assert_eq!(inflight.await.expect("request"), long_expected, "output during the drain");
    let start = Instant::now();
    while nodes[0].is_running() {
        assert!(start.elapsed() < Duration::from_secs(10), "node-a did not exit:\n{}", nodes[0].log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check_all(routers[0].url().to_owned()).await;

    // 4. The leading router dies: the other one is elected and carries out a rebalance.
    let leader = cluster.snapshot().await.expect("snapshot").leader.expect("a leader");
    let (dead, alive) = if leader == "router-1" { (0, 1) } else { (1, 0) };
    routers[dead].kill();
    let survivor = if alive == 0 { "router-1" } else { "router-2" };
    wait_for("the surviving router elected", Duration::from_secs(15), &cluster, |v| {
        v.leader.as_deref() == Some(survivor)
    })
    .await;
    let rebalanced = moectl(&endpoint, &["rebalance"]);
    eprintln!("rebalance: {rebalanced}");
    let epoch = rebalanced["epoch"].as_u64().expect("epoch");
    assert_eq!(cluster.snapshot().await.expect("snapshot").using.get(survivor), Some(&epoch));
    check_all(routers[alive].url().to_owned()).await;

    // 5. SIGTERM drains a node too: it leaves only once the router no longer needs it.
    let status = nodes[1].terminate().expect("node-b stops");
    assert!(status.success(), "node-b exit: {status}\n{}", nodes[1].log_text());
    let view = cluster.snapshot().await.expect("snapshot");
    let p = view.placement.expect("placement");
    assert!(p.node_index("node-b").is_none(), "node-b left only after an epoch without it");
    assert_eq!(view.using.get(survivor), Some(&p.epoch));
    check_all(routers[alive].url().to_owned()).await;
    let shown = moectl(&endpoint, &["show"]);
    assert_eq!(shown["leader"], json!(survivor));
    let metrics =
        reqwest::get(format!("{}/metrics", routers[alive].url())).await.expect("metrics").text().await.expect("text");
    assert_eq!(moe_e2e::metric_value(&metrics, "moe_placement_epoch"), Some(p.epoch as f64), "{metrics}");
}
