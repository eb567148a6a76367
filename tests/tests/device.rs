//! `--device` on the real binaries: CUDA asked of a build or a machine that cannot give it fails at once, in one line
//! on stderr that says why, before anything loads or listens. CI builds without the `cuda` feature and has no GPU,
//! so this checks the first case there; the same test on a `--features cuda` build without a GPU checks the second.

use std::process::Command;

use moe_e2e::{bin, fixture};

fn refused(binary: &str, args: &[&str]) -> String {
    let out = Command::new(bin(binary)).args(args).output().expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{binary} {args:?} exits 1: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line: {stderr}");
    lines[0].to_owned()
}

#[test]
fn cuda_without_a_gpu_is_one_clear_line() {
    let model = fixture("qwen35");
    let model = model.to_str().expect("utf-8 path");
    for (binary, extra) in
        [("expert-node", &["--listen", "127.0.0.1:0", "--insecure"][..]), ("router-node", &["--port", "0"][..])]
    {
        let line = refused(binary, &[&["--model", model, "--device", "cuda:0,1"], extra].concat());
        eprintln!("{binary}: {line}");
        assert!(line.starts_with("error: --device cuda:0,1: "), "{line}");
        assert!(
            line.contains("this build has no CUDA backend (build with `--features cuda`)")
                || line.contains("was not found"),
            "{line}"
        );
        let line = refused(binary, &[&["--model", model, "--device", "tpu"], extra].concat());
        assert!(line.contains("--device tpu: expected `cpu` or `cuda[:0,1,...]`"), "{line}");
    }
}
