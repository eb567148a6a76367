//! The container image and the compose cluster (deploy/Dockerfile, deploy/compose.yaml) on this machine's Docker:
//! a base image made locally (deploy/base-image.sh: debootstrap + docker import, as no registry serves images here),
//! the image's `prebuilt` stage with the binaries this test suite built, and the cluster brought up from the real
//! compose file under a project name of the test's own. Greedy completions through both routers must equal the
//! single-process output; then, under load, an expert container is stopped (SIGTERM: it drains) and another is cut
//! off its network and reconnected. Every request must end with one outcome, the fault-free text, and the cluster
//! must take both nodes back. Skips without Docker, except under CI.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use moe_e2e::{bin, local_greedy};
use moe_model::LoadedModel;
use serde_json::Value;

const BASE: &str = "moe-mesh-base:bookworm";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_owned()
}

/// Runs a command to completion; its stdout, or an error with its stderr.
fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<String, String> {
    let out =
        Command::new(program).args(args).envs(env.iter().copied()).output().map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        ))
    }
}

fn docker_or_skip() -> bool {
    match run("docker", &["info", "--format", "{{.ServerVersion}}"], &[]) {
        Ok(_) => true,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: no Docker daemon here ({e})");
            false
        }
        Err(e) => panic!("CI must run the container test: {e}"),
    }
}

/// The cluster of one test: its project, its images, and the environment the compose file reads. Brought down
/// (containers, network, volumes) and its images removed when dropped.
struct Cluster {
    project: String,
    env: Vec<(String, String)>,
    images: Vec<String>,
}

impl Cluster {
    fn compose(&self, args: &[&str]) -> Result<String, String> {
        let file = repo().join("deploy/compose.yaml");
        let mut all = vec!["-p", &self.project, "-f", file.to_str().expect("a UTF-8 path")];
        all.extend_from_slice(args);
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        // Compose v1 (Debian's docker-compose), else the v2 plugin.
        if Command::new("docker-compose").arg("version").output().is_ok_and(|o| o.status.success()) {
            run("docker-compose", &all, &env)
        } else {
            all.insert(0, "compose");
            run("docker", &all, &env)
        }
    }

    /// `http://127.0.0.1:PORT` where the service's port 8000 is published.
    fn url(&self, service: &str) -> String {
        let port = self.compose(&["port", service, "8000"]).expect("a published port");
        format!("http://{}", port.trim())
    }

    fn container(&self, service: &str) -> String {
        self.compose(&["ps", "-q", service]).expect("ps").trim().to_owned()
    }

    fn logs(&self, service: &str) -> String {
        self.compose(&["logs", "--no-color", service]).unwrap_or_else(|e| e)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for s in ["router-1", "router-2", "expert-1", "expert-2", "expert-3"] {
                eprintln!("--- {s}\n{}", self.logs(s));
            }
        }
        let _ = self.compose(&["down", "--volumes", "--remove-orphans", "--timeout", "5"]);
        for image in &self.images {
            let _ = run("docker", &["rmi", "--force", image], &[]);
        }
    }
}

/// Builds the images of the test: the base (once per machine), moe-mesh's `prebuilt` stage with this build's
/// binaries, and an etcd image with this machine's etcd binary on the same base.
fn build_images(tag: &str, tmp: &Path) -> (String, String) {
    let base = repo().join("deploy/base-image.sh");
    run("bash", &[base.to_str().expect("path"), BASE], &[]).expect("the base image");

    let context = tmp.join("moe");
    let prebuilt = context.join("deploy/prebuilt");
    std::fs::create_dir_all(&prebuilt).expect("context");
    for name in ["router-node", "expert-node", "moectl"] {
        std::fs::copy(bin(name), prebuilt.join(name)).expect("binary copied");
    }
    let moe = format!("moe-mesh:{tag}");
    let dockerfile = repo().join("deploy/Dockerfile");
    let build = [
        "build",
        "--quiet",
        "-f",
        dockerfile.to_str().expect("path"),
        "--target",
        "prebuilt",
        "--build-arg",
        &format!("BASE={BASE}"),
        "-t",
        &moe,
        context.to_str().expect("path"),
    ];
    run("docker", &build, &[("DOCKER_BUILDKIT", "0")]).expect("the moe-mesh image");

    let etcd_context = tmp.join("etcd");
    std::fs::create_dir_all(&etcd_context).expect("context");
    let etcd_bin = std::env::var("MOE_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
    let etcd_path = run("sh", &["-c", &format!("command -v {etcd_bin}")], &[]).expect("etcd on PATH");
    std::fs::copy(etcd_path.trim(), etcd_context.join("etcd")).expect("etcd copied");
    std::fs::write(etcd_context.join("Dockerfile"), format!("FROM {BASE}\nCOPY etcd /usr/local/bin/etcd\n"))
        .expect("Dockerfile");
    let etcd = format!("moe-mesh-etcd:{tag}");
    run(
        "docker",
        &["build", "--quiet", "-t", &etcd, etcd_context.to_str().expect("path")],
        &[("DOCKER_BUILDKIT", "0")],
    )
    .expect("the etcd image");
    (moe, etcd)
}

/// Requests round-robin over `urls` from `workers` clients until `stop`; each outcome as (status, text matches).
fn load(
    urls: &[String],
    lm: &Arc<LoadedModel>,
    workers: u32,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<(u16, bool, Value)>>> {
    (0..workers)
        .map(|w| {
            let (urls, lm, stop) = (urls.to_vec(), lm.clone(), stop.clone());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                // Bounded: 1000 requests per client at most.
                for k in 0..1000u32 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let url = &urls[(w + k) as usize % urls.len()];
                    let p = prompt(w * 1000 + k);
                    let want = local_greedy(&lm, &p, 12);
                    let sent = client().post(format!("{url}/v1/completions")).json(&greedy(&p, 12, false)).send().await;
                    let outcome = match sent {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let body: Value = r.json().await.unwrap_or(Value::Null);
                            let same = body["choices"][0]["text"].as_str() == Some(want.as_str());
                            (status, same, body)
                        }
                        Err(e) => (0, false, Value::String(e.to_string())),
                    };
                    outcomes.push(outcome);
                }
                outcomes
            })
        })
        .collect()
}

async fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while started.elapsed() < within {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{what}: not within {within:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_cluster_serves_exact_text_and_survives_a_stopped_and_a_cut_off_expert() {
    if !docker_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let tag = format!("test-{}", std::process::id());
    let (moe, etcd) = build_images(&tag, tmp.path());
    let cluster = Cluster {
        project: format!("moe-e2e-{}", std::process::id()),
        env: vec![
            ("MOE_IMAGE".into(), moe.clone()),
            ("ETCD_IMAGE".into(), etcd.clone()),
            ("MOE_PRESET".into(), "tiny".into()),
            ("MOE_ROUTER_1_PUBLISH".into(), "127.0.0.1:".into()),
            ("MOE_ROUTER_2_PUBLISH".into(), "127.0.0.1:".into()),
        ],
        images: vec![moe, etcd],
    };
    cluster.compose(&["up", "-d"]).expect("the cluster comes up");
    let urls = [cluster.url("router-1"), cluster.url("router-2")];
    for url in &urls {
        let url = url.clone();
        let started = Instant::now();
        while status_of(&url, "/readyz").await != 200 {
            assert!(started.elapsed() < Duration::from_secs(120), "{url} never became ready");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // The links are mutual TLS with the certificates init-certs wrote.
    for service in ["expert-1", "router-1"] {
        let log = cluster.logs(service);
        assert!(log.contains("mutual TLS on internal links"), "{service}:\n{log}");
    }

    // The reference: the same model (same preset and seed) written here and run in this process.
    let model = tmp.path().join("model");
    let out = model.to_str().expect("path");
    run(bin("moectl").to_str().expect("path"), &["init-model", "--preset", "tiny", "--out", out], &[]).expect("model");
    let lm = Arc::new(LoadedModel::load(&model).expect("loads"));
    for (r, url) in urls.iter().enumerate() {
        for i in 0..3 {
            let p = prompt(i);
            let body: Value = client()
                .post(format!("{url}/v1/completions"))
                .json(&greedy(&p, 24, false))
                .send()
                .await
                .expect("sent")
                .json()
                .await
                .expect("json");
            assert_eq!(
                body["choices"][0]["text"].as_str(),
                Some(local_greedy(&lm, &p, 24).as_str()),
                "router-{}",
                r + 1
            );
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(&urls, &lm, 2, &stop);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A stopped container: SIGTERM through tini, the node drains and exits.
    cluster.compose(&["stop", "--timeout", "45", "expert-1"]).expect("expert-1 stops");
    // It exited by itself (0), not killed at the timeout (137): tini passed SIGTERM on and the drain completed.
    let code = run("docker", &["inspect", "--format", "{{.State.ExitCode}}", &cluster.container("expert-1")], &[]);
    assert_eq!(code.expect("inspect").trim(), "0", "expert-1 did not drain and exit:\n{}", cluster.logs("expert-1"));
    // A container cut off its network, then put back under its name.
    let network = format!("{}_mesh", cluster.project);
    let cut = cluster.container("expert-2");
    run("docker", &["network", "disconnect", &network, &cut], &[]).expect("disconnected");
    tokio::time::sleep(Duration::from_secs(12)).await;
    run("docker", &["network", "connect", "--alias", "expert-2", &network, &cut], &[]).expect("reconnected");
    cluster.compose(&["start", "expert-1"]).expect("expert-1 starts again");
    // Both are members again and ready for a placement epoch.
    wait_until("expert-2 registered again", Duration::from_secs(60), || {
        cluster.logs("expert-2").contains("registering again")
    })
    .await;
    wait_until("expert-1 back in a placement", Duration::from_secs(90), || {
        let log = cluster.logs("expert-1");
        // What it logged since it started again.
        log.rfind("loading experts").is_some_and(|at| log[at..].contains("placement epoch ready"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);

    let (mut served, mut failed) = (0, Vec::new());
    for c in clients {
        for (status, same, body) in c.await.expect("client") {
            match (status, same) {
                (200, true) => served += 1,
                (200, false) => panic!("a completion differs from the single-process text: {body}"),
                // An explicit error is an outcome too; it must be OpenAI-shaped.
                _ => {
                    assert!(body["error"]["message"].is_string(), "an outcome that is neither text nor error: {body}");
                    failed.push((status, body));
                }
            }
        }
    }
    eprintln!("{served} served, {} failed: {failed:?}", failed.len());
    assert!(served >= 20, "only {served} requests completed");
    assert!(failed.is_empty(), "requests failed with replicas in the cluster: {failed:?}");
    for url in &urls {
        assert_eq!(status_of(url, "/readyz").await, 200, "{url} did not recover");
    }
}
