//! `moectl up` as an operator runs it: the cluster comes up, serves, and Ctrl-C (SIGINT) takes all of it down.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use moe_e2e::{bin, fixture};

fn running(pid: u32) -> bool {
    // A zombie no longer counts: its process has exited.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[test]
fn up_serves_and_ctrl_c_stops_the_whole_cluster() {
    let cache = tempfile::tempdir().expect("tmp");
    let mut up = Command::new(bin("moectl"))
        .env("MOE_MESH_CACHE", cache.path())
        .arg("up")
        .arg("--model")
        .arg(fixture("qwen35"))
        .args(["--port", "0", "--expert-nodes", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("moectl up starts");
    let (tx, rx) = mpsc::channel();
    let stdout = up.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stderr = up.stderr.take().expect("stderr");
    let (etx, erx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = etx.send(line);
        }
    });
    let banner = rx.recv_timeout(Duration::from_secs(60)).expect("moectl up prints its URL");
    let url = banner.split_whitespace().find(|w| w.starts_with("http://")).expect("a URL").trim_end_matches("/v1");
    let curl: Vec<String> = (0..3).filter_map(|_| rx.recv_timeout(Duration::from_secs(5)).ok()).collect();
    assert!(curl.iter().any(|l| l.contains("curl -s")), "no curl command in {curl:?}");
    let nodes: Vec<u32> = {
        // The expert nodes are moectl's children.
        let children =
            std::fs::read_to_string(format!("/proc/{}/task/{}/children", up.id(), up.id())).unwrap_or_default();
        children.split_whitespace().filter_map(|p| p.parse().ok()).collect()
    };
    assert_eq!(nodes.len(), 2, "two expert-node children");

    let body = r#"{"model": "qwen35", "prompt": "Hi", "max_tokens": 4}"#;
    let out = Command::new("curl")
        .args(["-s", "-H", "Content-Type: application/json", "-d", body, &format!("{url}/v1/completions")])
        .output();
    if let Ok(out) = out {
        // curl is not needed by the suite; when present, the printed command works.
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("\"text_completion\""), "{text}");
    }

    let started = Instant::now();
    assert!(Command::new("kill").args(["-INT", &up.id().to_string()]).status().expect("kill").success());
    let status = loop {
        if let Some(status) = up.try_wait().expect("wait") {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "moectl up did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    let log: Vec<String> = erx.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("stopped")), "{log:?}");
    assert!(log.iter().any(|l| l.contains("mutual TLS between the router and the expert nodes")), "{log:?}");
    assert!(cache.path().join("certs").join("ca.pem").exists(), "the development CA is in the cache directory");
    assert!(!log.iter().any(|l| l.contains("marking it down")), "a node was reported down on the way out: {log:?}");
    for pid in nodes {
        assert!(!running(pid), "expert node {pid} outlived moectl up");
    }
}
