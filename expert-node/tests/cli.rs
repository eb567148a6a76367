//! The expert-node command line: help, and one clear line for each way to start it wrong.

use std::path::PathBuf;
use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_expert-node")).args(args).output().expect("expert-node runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fixture() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen35").display().to_string()
}

#[test]
fn help_describes_the_flags() {
    let (code, stdout, _) = run(&["--help"]);
    assert_eq!(code, Some(0));
    for flag in ["--model", "--listen", "--experts", "--device", "--max-message-mib", "layers=0-7:experts=0-63"] {
        assert!(stdout.contains(flag), "--help lacks {flag}:\n{stdout}");
    }
}

#[test]
fn bad_starts_fail_with_one_line() {
    let m = fixture();
    let cases: [(&[&str], &str); 5] = [
        (&["--experts", "0-99"], "expert 99 does not exist (the model has 8: 0-7)"),
        (&["--experts", "layers=x"], "`x` is not a number"),
        (&["--device", "cuda:0"], "this build has no CUDA backend"),
        (&["--device", "tpu"], "expected `cpu` or `cuda[:0,1,...]`"),
        (&["--max-message-mib", "0"], "must be between 1 and 1024"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["--model", m.as_str(), "--listen", "127.0.0.1:0", "--insecure"];
        args.extend_from_slice(extra);
        let (code, _, stderr) = run(&args);
        assert_ne!(code, Some(0), "{extra:?} started");
        assert!(stderr.contains(want), "{extra:?}: {stderr}");
    }
    // Neither certificates nor --insecure: one line saying both ways.
    let (code, _, stderr) = run(&["--model", m.as_str(), "--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("tls-cert: an expert node uses mutual TLS") && stderr.contains("`insecure`"), "{stderr}");
    let (code, _, stderr) = run(&["--model", "/nonexistent-model-dir", "--listen", "127.0.0.1:0", "--insecure"]);
    assert_eq!(code, Some(1));
    assert!(stderr.lines().last().unwrap_or("").starts_with("error: loading /nonexistent-model-dir"), "{stderr}");
}
