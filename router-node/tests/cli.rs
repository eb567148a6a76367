//! The router-node command line: help, and one clear line for each way to start it wrong.

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_router-node")).args(args).output().expect("router-node runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_describes_the_flags() {
    let (code, stdout, _) = run(&["--help"]);
    assert_eq!(code, Some(0));
    for flag in ["--model", "--listen", "--experts-at", "--api-key", "--max-batch-tokens", "--state-budget-gib"] {
        assert!(stdout.contains(flag), "--help lacks {flag}:\n{stdout}");
    }
}

#[test]
fn bad_starts_fail_with_one_line() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/qwen35");
    let (code, _, stderr) = run(&["--model", "/nonexistent-model-dir", "--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.lines().last().unwrap_or("").starts_with("error: starting the router for /nonexistent-model-dir"),
        "{stderr}"
    );
    let at = ["--model", fixture, "--listen", "127.0.0.1:0", "--experts-at", "127.0.0.1:1"];
    let (code, _, stderr) = run(&[&at[..], &["--insecure"]].concat());
    assert_eq!(code, Some(1));
    assert!(stderr.contains("expert node 127.0.0.1:1 is unreachable"), "{stderr}");
    // Remote experts without certificates or --insecure: one line saying both ways.
    let (code, _, stderr) = run(&at);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("tls-cert: a router with remote experts uses mutual TLS"), "{stderr}");
    let (code, _, stderr) = run(&["--model", fixture, "--listen", "127.0.0.1:0", "--state-budget-gib", "0"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("state-budget-gib: 0: must be a positive number"), "{stderr}");
}
