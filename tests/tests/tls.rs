//! Mutual TLS on the router ↔ expert-node links, against real expert-node processes: who gets in, what each role
//! may call, the memory limit of a load, and certificates rotated under open streams.

use std::path::Path;
use std::time::{Duration, Instant};

use moe_e2e::{fixture, ExpertNodeProcess};
use moe_model::{Experts, Routing};
use moe_proto::v1::{ExpertSet, LayerExperts, LoadExpertsRequest, StatusRequest, UnloadExpertsRequest};
use moe_tls::{dev_ca, Identity, Role, TlsFiles};
use router_node::{RemoteExperts, RemoteOptions};

fn one_token_routing(experts: &[u32]) -> Routing {
    Routing {
        offsets: vec![0, experts.len() as u32],
        experts: experts.to_vec(),
        weights: experts.iter().map(|_| 1.0 / experts.len() as f32).collect(),
    }
}

/// A router in this process with `identity`, connected to `addr` (its long-lived Forward stream open).
fn router(addr: &str, identity: Option<std::sync::Arc<Identity>>) -> Result<RemoteExperts, router_node::RouterError> {
    let lm = moe_model::LoadedModel::load(&fixture("qwen35")).expect("loads");
    let options = RemoteOptions { tls: identity, ..RemoteOptions::default() };
    RemoteExperts::connect(&[addr.to_owned()], lm.model.config(), lm.fingerprint, options)
}

fn forward_once(remote: &RemoteExperts) -> Vec<f32> {
    let hidden = vec![0.25f32; 64];
    let mut out = vec![0f32; 64];
    remote.forward(0, &hidden, &one_token_routing(&[0, 1]), &mut out).expect("forwards");
    out
}

fn wait_for_log(node: &ExpertNodeProcess, text: &str) -> bool {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if node.log_text().contains(text) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_peers_with_a_certificate_of_the_cluster_ca_get_in() {
    let node = ExpertNodeProcess::start(&fixture("qwen35"), "all", &[]).expect("node starts");

    // Plaintext: the handshake fails; nothing reaches the service.
    let plain = tonic::transport::Channel::from_shared(format!("http://{}", node.addr())).expect("uri");
    let refused = match plain.connect().await {
        Ok(channel) => moe_proto::ExpertServiceClient::new(channel).status(StatusRequest {}).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a plaintext client was served");

    // A certificate from another CA (one that trusts the node's CA, so only the node's check can refuse it).
    let other = tempfile::tempdir().expect("tmp");
    dev_ca::init(other.path(), 30, false).expect("CA");
    let stranger = dev_ca::issue(other.path(), Role::Router, "stranger", &[], 30).expect("issues");
    let both = other.path().join("both.pem");
    let cas = [std::fs::read(other.path().join(dev_ca::CA_CERT)), std::fs::read(&moe_e2e::tls::files(Role::Router).ca)];
    std::fs::write(&both, cas.map(|c| c.expect("CA")).concat()).expect("written");
    let stranger = Identity::load(TlsFiles { cert: stranger.cert, key: stranger.key, ca: both }, &[Role::Router])
        .expect("a well-formed identity");
    let addr = node.addr().to_owned();
    let e = tokio::task::spawn_blocking(move || router(&addr, Some(stranger)).err()).await.expect("joins");
    assert!(e.is_some_and(|e| e.to_string().contains("unreachable")), "a stranger's certificate was accepted");
    assert!(wait_for_log(&node, "TLS handshake refused"), "the node says why:\n{}", node.log_text());

    // The cluster's router gets in, and computes what a plaintext node computes.
    let addr = node.addr().to_owned();
    let tls = tokio::task::spawn_blocking(move || {
        forward_once(&router(&addr, Some(moe_e2e::tls::identity(Role::Router))).expect("connects"))
    });
    let open = ExpertNodeProcess::start(&fixture("qwen35"), "all", &["--insecure"]).expect("node starts");
    let addr = open.addr().to_owned();
    let plain = tokio::task::spawn_blocking(move || forward_once(&router(&addr, None).expect("connects")));
    assert_eq!(tls.await.expect("tls"), plain.await.expect("plain"), "TLS changes nothing in the sums");
    assert!(open.log_text().contains("plaintext"), "--insecure is logged:\n{}", open.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_may_forward_but_only_the_controller_changes_what_a_node_hosts() {
    let node = ExpertNodeProcess::start(&fixture("qwen35"), "all", &[]).expect("node starts");
    let set = ExpertSet { layers: vec![LayerExperts { layer: 0, experts: vec![0] }] };

    let mut as_router = moe_e2e::tls::client(node.addr(), Role::Router).await;
    let status = as_router.status(StatusRequest {}).await.expect("a router may read the status").into_inner();
    let e = as_router
        .unload_experts(UnloadExpertsRequest { experts: Some(set.clone()) })
        .await
        .expect_err("a router may not unload");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("router") && e.message().contains("UnloadExperts"), "{}", e.message());
    let e = as_router
        .load_experts(LoadExpertsRequest { experts: Some(set.clone()) })
        .await
        .expect_err("a router may not load");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let mut as_expert = moe_e2e::tls::client(node.addr(), Role::Expert).await;
    let e = as_expert.status(StatusRequest {}).await.expect_err("another expert node is not a router");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let after = as_router.status(StatusRequest {}).await.expect("status").into_inner();
    assert_eq!(after.resident_bytes, status.resident_bytes, "nothing was unloaded");

    let mut as_controller = moe_e2e::tls::client(node.addr(), Role::Controller).await;
    let change = as_controller
        .unload_experts(UnloadExpertsRequest { experts: Some(set) })
        .await
        .expect("the controller may")
        .into_inner();
    assert_eq!(change.experts_changed, 1);
    assert!(node.log_text().contains("refused UnloadExperts"), "refusals are logged:\n{}", node.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_beyond_the_node_s_memory_limit_is_refused() {
    let dir = fixture("qwen35");
    let config = moe_model::ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let per_expert = 3 * config.hidden_size * config.moe_intermediate_size * 2;
    // Room for the two experts it starts with and one more.
    let gib = format!("{}", (3 * per_expert) as f64 / (1u64 << 30) as f64);
    let node = ExpertNodeProcess::start(&dir, "layers=0:experts=0-1", &["--memory-gib", &gib]).expect("starts");
    let mut client = moe_e2e::tls::client(node.addr(), Role::Controller).await;
    let two = ExpertSet { layers: vec![LayerExperts { layer: 0, experts: vec![2, 3] }] };
    let e = client.load_experts(LoadExpertsRequest { experts: Some(two) }).await.expect_err("beyond the limit");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("beyond the"), "{}", e.message());
    let one = ExpertSet { layers: vec![LayerExperts { layer: 0, experts: vec![2] }] };
    let change = client.load_experts(LoadExpertsRequest { experts: Some(one) }).await.expect("fits").into_inner();
    assert_eq!(change.experts_changed, 1);
}

fn copy_identity(from: &TlsFiles, to: &Path, name: &str) -> TlsFiles {
    let files = dev_ca::files(to, name);
    std::fs::copy(&from.cert, &files.cert).expect("cert");
    std::fs::copy(&from.key, &files.key).expect("key");
    files
}

#[test]
fn a_node_moved_to_a_new_ca_on_sighup_keeps_its_open_streams() {
    // The node's files in a directory of its own, so that the test can replace them.
    let mine = tempfile::tempdir().expect("tmp");
    let node_files = copy_identity(&moe_e2e::tls::files(Role::Expert), mine.path(), "node");
    let old_ca = moe_e2e::tls::files(Role::Expert).ca;
    std::fs::copy(&old_ca, &node_files.ca).expect("ca");
    let flags = node_files.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = ExpertNodeProcess::start(&fixture("qwen35"), "all", &flags).expect("node starts");
    let old = router(node.addr(), Some(moe_e2e::tls::identity(Role::Router))).expect("connects");
    let before = forward_once(&old);

    // A new CA: the node gets a certificate from it and trusts both, as in the middle of a rotation.
    let fresh = tempfile::tempdir().expect("tmp");
    dev_ca::init(fresh.path(), 30, false).expect("CA");
    let issued = dev_ca::issue(fresh.path(), Role::Expert, "node", &[], 30).expect("issues");
    let both = [std::fs::read(&old_ca), std::fs::read(fresh.path().join(dev_ca::CA_CERT))].map(|c| c.expect("CA"));
    std::fs::write(&node_files.ca, both.concat()).expect("written");
    std::fs::copy(&issued.key, &node_files.key).expect("key");
    std::fs::copy(&issued.cert, &node_files.cert).expect("cert");
    node.signal("HUP").expect("SIGHUP");
    assert!(wait_for_log(&node, "TLS certificate reloaded"), "{}", node.log_text());

    // The stream opened before goes on, on the session it started with.
    assert_eq!(forward_once(&old), before, "the open stream still answers");
    // New handshakes get the new certificate: a router that trusts only the old CA is turned away, one that trusts
    // both (its own certificate is still from the old one) gets in.
    let e = router(node.addr(), Some(moe_e2e::tls::identity(Role::Router))).map(drop).expect_err("the old CA only");
    assert!(e.to_string().contains("unreachable"), "{e}");
    let renewed = tempfile::tempdir().expect("tmp");
    let r = copy_identity(&moe_e2e::tls::files(Role::Router), renewed.path(), "router");
    std::fs::write(&r.ca, both.concat()).expect("ca");
    let new = router(node.addr(), Some(Identity::load(r, &[Role::Router]).expect("loads"))).expect("connects");
    assert_eq!(forward_once(&new), before);
    assert_eq!(forward_once(&old), before, "and the old stream still does");
}

#[test]
fn a_process_refuses_to_start_with_a_certificate_of_the_wrong_role_or_none() {
    let dir = fixture("qwen35");
    let flags = moe_e2e::tls::flags(Role::Router);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let err = ExpertNodeProcess::start(&dir, "all", &flags).map(drop).expect_err("a router certificate on a node");
    assert!(err.to_string().contains("is for role router, this process needs expert"), "{err}");
    let err = ExpertNodeProcess::start(&dir, "all", &["--tls-cert", "/nonexistent.pem"]).map(drop).expect_err("half");
    assert!(err.to_string().contains("tls-key and tls-ca also needed"), "{err}");
}

fn etcd_tls(role: Role) -> moe_placement::EtcdTls {
    let f = moe_e2e::tls::files(role);
    let read = |p: &Path| std::fs::read(p).expect("PEM");
    moe_placement::EtcdTls { ca: read(&f.ca), cert: read(&f.cert), key: read(&f.key), source: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_on_an_etcd_that_requires_client_certificates() {
    use moe_placement::{Cluster, EtcdStore};
    let dir = fixture("qwen35");
    let etcd = moe_e2e::EtcdServer::start_tls().expect("etcd with TLS");
    let endpoint = vec![etcd.endpoint().to_owned()];
    assert!(endpoint[0].starts_with("https://"));

    // Without a certificate, or with one of another CA, etcd does not answer.
    let e = EtcdStore::connect_with(&endpoint, Duration::from_secs(3), None).await.expect_err("no TLS material");
    assert!(e.to_string().contains("give this process its TLS files"), "{e}");
    let other = tempfile::tempdir().expect("tmp");
    dev_ca::init(other.path(), 30, false).expect("CA");
    let stranger = dev_ca::issue(other.path(), Role::Controller, "stranger", &[], 30).expect("issues");
    let ours = etcd_tls(Role::Controller);
    let foreign = moe_placement::EtcdTls {
        ca: ours.ca.clone(),
        cert: std::fs::read(&stranger.cert).expect("cert"),
        key: std::fs::read(&stranger.key).expect("key"),
        source: None,
    };
    let refused = EtcdStore::connect_with(&endpoint, Duration::from_secs(3), Some(&foreign)).await;
    assert!(refused.is_err(), "etcd accepted a certificate of another CA");

    // The cluster's processes, with their role certificates, join and serve.
    let node = ExpertNodeProcess::join(&dir, &endpoint[0], "tls", &["--memory-gib", "0.0004"]).expect("node joins");
    let router =
        moe_e2e::RouterProcess::start(&dir, &["--etcd", &endpoint[0], "--cluster", "tls"]).expect("router joins");
    let store = EtcdStore::connect_with(&endpoint, Duration::from_secs(5), Some(&ours)).await.expect("controller");
    let cluster = Cluster::new(std::sync::Arc::new(store), "tls").expect("cluster");
    let started = Instant::now();
    let client = reqwest::Client::new();
    while !client.get(format!("{}/readyz", router.url())).send().await.is_ok_and(|r| r.status().is_success()) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never ready:\n{}\n{}",
            router.log_text(),
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let view = cluster.snapshot().await.expect("snapshot");
    assert!(view.placement.is_some_and(|p| p.nodes.len() == 1), "placed on the node");
    let lm = moe_model::LoadedModel::load(&dir).expect("loads");
    let body = serde_json::json!({"prompt": [5, 17, 33], "max_tokens": 8, "temperature": 0, "ignore_eos": true});
    let resp: serde_json::Value = client
        .post(format!("{}/v1/completions", router.url()))
        .json(&body)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(resp["choices"][0]["text"].as_str(), Some(moe_e2e::local_greedy(&lm, &[5, 17, 33], 8).as_str()));
    // And `moectl placement` reads it with the controller's certificate.
    let f = moe_e2e::tls::files(Role::Controller);
    let out = std::process::Command::new(moe_e2e::bin("moectl"))
        .args(["placement", "show", "--json", "--etcd", &endpoint[0], "--cluster", "tls"])
        .arg("--tls-cert")
        .arg(&f.cert)
        .arg("--tls-key")
        .arg(&f.key)
        .arg("--tls-ca")
        .arg(&f.ca)
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// etcd's connection follows the identity's reloads. A reloaded certificate etcd refuses (another CA) leaves the
/// previous connection serving; one it accepts becomes the connection new calls use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_connection_follows_reloaded_certificates() {
    use moe_placement::{EtcdStore, EtcdTls};
    let etcd = moe_e2e::EtcdServer::start_tls().expect("etcd with TLS");
    let endpoint = etcd.endpoint().to_owned();
    let (tmp, files) = moe_e2e::tls::issue_for(Role::Controller, &[]);
    let identity = Identity::load(files.clone(), &[Role::Controller]).expect("identity");
    let good = EtcdTls::of(&identity);
    let store = moe_placement::open_store_with(Some(&endpoint), Some(&good)).await.expect("connects");
    store.put("/rotation/a", b"0".to_vec(), None).await.expect("put");

    // A certificate and CA of another authority: the identity takes them (they chain to their own CA file), etcd
    // does not.
    let other = tempfile::tempdir().expect("tmp");
    let other_ca = dev_ca::init(other.path(), 30, false).expect("CA");
    let stranger = dev_ca::issue(other.path(), Role::Controller, "stranger", &[], 30).expect("issues");
    let swap = |cert: &Path, key: &Path, ca: &Path| {
        for (from, to) in [(cert, &files.cert), (key, &files.key), (ca, &files.ca)] {
            let bytes = std::fs::read(from).expect("read");
            std::fs::write(to, bytes).expect("write");
        }
    };
    let cluster_ca = tmp.path().join("cluster-ca.pem");
    std::fs::copy(&files.ca, &cluster_ca).expect("keep the cluster CA");
    swap(&stranger.cert, &stranger.key, &other_ca.cert);
    assert!(identity.reload().expect("the identity takes them"));
    let foreign = EtcdTls::of(&identity);

    // Directly: a rotation etcd refuses is an error and changes nothing.
    let direct = EtcdStore::connect_with(std::slice::from_ref(&endpoint), Duration::from_secs(3), Some(&good))
        .await
        .expect("direct");
    assert!(direct.rotate(&foreign).await.is_err(), "etcd accepted a certificate of another CA");
    use moe_placement::PlacementStore;
    direct.put("/rotation/direct", b"1".to_vec(), None).await.expect("the previous connection serves on");

    // The followed store tried the same on the reload, and goes on over the connection it had.
    let until = Instant::now() + Duration::from_secs(6);
    let mut i = 0u32;
    while Instant::now() < until {
        i += 1;
        store.put("/rotation/a", i.to_string().into_bytes(), None).await.expect("serves through a refused rotation");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // A newly issued certificate of the cluster CA: taken, and new calls go over a connection made with it.
    let fresh = dev_ca::issue(tmp.path(), Role::Controller, "rotated", &[], 30).expect("issues");
    swap(&fresh.cert, &fresh.key, &cluster_ca);
    assert!(identity.reload().expect("reloads"));
    assert!(identity.me().name == "rotated", "{:?}", identity.me());
    direct.rotate(&EtcdTls::of(&identity)).await.expect("etcd takes the new certificate");
    direct.put("/rotation/direct", b"2".to_vec(), None).await.expect("serves over the new connection");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = store.get_prefix("/rotation/").await.expect("reads after the rotation");
    assert_eq!(got.len(), 2, "{got:?}");
}
