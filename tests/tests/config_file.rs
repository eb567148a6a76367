//! The binaries' config files: a cluster started from files alone serves; a bad file stops the binary with one
//! line naming the key; environment and flags override the file, and --print-config shows the merged settings.

mod common;

use std::process::Command;

use common::*;
use moe_e2e::{bin, fixture, local_greedy, Launch, ServingProcess};
use moe_model::LoadedModel;

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("written");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_and_a_router_started_from_config_files_alone_serve() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = fixture("qwen35");
    let model = model.to_str().expect("path");
    // The TLS files as config keys too.
    let tls = |role| {
        let f = moe_e2e::tls::files(role);
        format!("tls-cert = {:?}\ntls-key = {:?}\ntls-ca = {:?}\n", f.cert, f.key, f.ca)
    };
    let node_file = write(
        tmp.path(),
        "expert-node.toml",
        &format!(
            "model = {model:?}\nlisten = \"127.0.0.1:0\"\nexperts = \"all\"\nthreads = 2\n{}",
            tls(moe_tls::Role::Expert)
        ),
    );
    let node =
        ServingProcess::start_with("expert-node", &["--config".as_ref(), node_file.as_os_str()], &Launch::default())
            .expect("the node starts from its file");
    let router_file = write(
        tmp.path(),
        "router-node.toml",
        &format!(
            "model = {model:?}\nlisten = \"127.0.0.1:0\"\nexperts-at = [{:?}]\nmax-running = 8\n{}",
            node.addr(),
            tls(moe_tls::Role::Router)
        ),
    );
    // MOE_CONFIG names the file, as a container would.
    let launch = Launch { env: vec![("MOE_CONFIG".into(), router_file.to_str().expect("path").into())], netns: None };
    let router = ServingProcess::start_with("router-node", &[], &launch).expect("the router starts from its file");
    let url = router.addr().to_owned();
    let lm = LoadedModel::load(&fixture("qwen35")).expect("loads");
    start_greedy_streams(&url, &lm, 2, 16).finish("config files").await;
    let body: serde_json::Value = client()
        .post(format!("{url}/v1/completions"))
        .json(&greedy(&prompt(3), 8, false))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(body["choices"][0]["text"].as_str(), Some(local_greedy(&lm, &prompt(3), 8).as_str()));
}

fn stderr_of(binary: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(bin(binary)).args(args).envs(env.iter().copied()).output().expect("runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_bad_config_file_stops_the_binary_with_one_line_naming_the_key() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cases = [
        ("router-node", "max-running = \"lots\"\n", "max-running"),
        ("router-node", "max-runing = 4\n", "max-runing"),
        ("router-node", "model = \"m\"\nmax-queue-wait-secs = -1.0\n", "max-queue-wait-secs"),
        ("expert-node", "model = \"m\"\nexperts = \"7-\"\n", "experts"),
        ("expert-node", "model = \"m\"\nmax-message-mib = 0\n", "max-message-mib"),
    ];
    for (i, (binary, text, key)) in cases.into_iter().enumerate() {
        let file = write(tmp.path(), &format!("{i}.toml"), text);
        let (code, stderr) = stderr_of(binary, &["--config", file.to_str().expect("path")], &[]);
        assert_eq!(code, 1, "{binary} with {text:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{binary} with {text:?}: more than one line:\n{stderr}");
        assert!(stderr.contains(key), "{binary} with {text:?}: {stderr}");
    }
}

#[test]
fn environment_and_flags_override_the_file_in_print_config() {
    let tmp = tempfile::tempdir().expect("tmp");
    let file =
        write(tmp.path(), "r.toml", "model = \"m\"\nmax-running = 64\nmax-queue = 10\napi-keys = [\"secret\"]\n");
    let out = Command::new(bin("router-node"))
        .args(["--config", file.to_str().expect("path"), "--max-queue", "20", "--print-config"])
        .env("MOE_MATMUL_KERNEL", "scalar")
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    for line in ["max-running = 64", "max-queue = 20", "matmul-kernel = \"scalar\"", "sse-keepalive-secs = 15.0"] {
        assert!(printed.lines().any(|l| l == line), "no {line:?} in:\n{printed}");
    }
    assert!(!printed.contains("secret"), "--print-config shows the API key:\n{printed}");
}
