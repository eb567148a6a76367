//! The Helm chart (deploy/helm/moe-mesh), offline: `helm lint` and `helm template` for the default values and the
//! two example clusters under ci/ (GPU experts; eight CPU experts with a bundled etcd), every rendered manifest
//! checked by kubernetes-validate in strict mode, and the config files the chart renders read by the real
//! binaries (`--print-config`), so that chart and binaries agree on every key. Needs `helm` (or $MOE_HELM) and
//! `kubernetes-validate` (or $MOE_KUBERNETES_VALIDATE); skips without them, except under CI.

use std::path::{Path, PathBuf};
use std::process::Command;

use moe_e2e::bin;

const KUBERNETES: &str = "1.29.0";

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/moe-mesh")
}

fn tool(env: &str, name: &str) -> Option<String> {
    let program = std::env::var(env).unwrap_or_else(|_| name.to_owned());
    Command::new(&program).arg("--help").output().ok().filter(|o| o.status.success()).map(|_| program)
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{program} {}:\n{text}", args.join(" "));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of `key` (a block scalar) in the rendered ConfigMap.
fn config_file(manifests: &str, key: &str) -> String {
    let mut lines = manifests.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    lines.next().unwrap_or_else(|| panic!("no {key} in the ConfigMap"));
    lines.take_while(|l| l.starts_with("    ") || l.trim().is_empty()).map(|l| l.trim()).collect::<Vec<_>>().join("\n")
}

#[test]
fn the_chart_lints_renders_valid_manifests_and_config_files_the_binaries_accept() {
    let (Some(helm), Some(validate)) =
        (tool("MOE_HELM", "helm"), tool("MOE_KUBERNETES_VALIDATE", "kubernetes-validate"))
    else {
        assert!(std::env::var_os("CI").is_none(), "CI must check the chart: helm or kubernetes-validate is missing");
        eprintln!("skipped: helm or kubernetes-validate is not installed");
        return;
    };
    let chart = chart();
    let chart = chart.to_str().expect("path");
    let tmp = tempfile::tempdir().expect("tmp");
    for values in [None, Some("ci/gpu-values.yaml"), Some("ci/cpu-8-values.yaml")] {
        let file = values.map(|v| format!("{chart}/{v}"));
        let mut args = vec!["template", "moe", chart, "--kube-version", KUBERNETES];
        let mut lint = vec!["lint", chart, "--strict"];
        if let Some(f) = &file {
            args.extend(["-f", f]);
            lint.extend(["-f", f]);
        }
        run(&helm, &lint);
        let manifests = run(&helm, &args);
        let rendered = tmp.path().join("manifests.yaml");
        std::fs::write(&rendered, &manifests).expect("written");
        let report = run(&validate, &["--strict", "-k", KUBERNETES, rendered.to_str().expect("path")]);
        assert!(!report.contains("ERROR"), "{values:?}:\n{report}");
        for kind in ["Deployment", "StatefulSet", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"] {
            let wanted = !(kind == "HorizontalPodAutoscaler" && values == Some("ci/cpu-8-values.yaml"));
            assert_eq!(manifests.contains(&format!("kind: {kind}\n")), wanted, "{values:?}: {kind}");
        }
        for (binary, key) in [("router-node", "router-node.toml"), ("expert-node", "expert-node.toml")] {
            let path = tmp.path().join(key);
            std::fs::write(&path, config_file(&manifests, key)).expect("written");
            let out = Command::new(bin(binary))
                .args(["--config", path.to_str().expect("path"), "--print-config"])
                .output()
                .expect("runs");
            assert!(
                out.status.success(),
                "{values:?}: {binary} refuses the chart's {key}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if values == Some("ci/gpu-values.yaml") {
            assert!(manifests.contains("nvidia.com/gpu: 8") && manifests.contains("--device=cuda:0,1,2,3,4,5,6,7"));
            // Mutual TLS: each binary's file names its role's files in the mounted Secret.
            for (key, role) in [("router-node.toml", "router"), ("expert-node.toml", "expert")] {
                let file = config_file(&manifests, key);
                assert!(file.contains(&format!("tls-cert = \"/etc/moe-mesh-tls/{role}.pem\"")), "{file}");
                assert!(!file.contains("insecure"), "{file}");
            }
            assert!(manifests.contains("secretName: moe-mesh-tls") && manifests.contains("tcpSocket"));
        } else {
            assert!(config_file(&manifests, "expert-node.toml").contains("insecure = true"), "{values:?}");
        }
    }
    // A value the schema refuses.
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&bad, "experts:\n  device: tpu\n").expect("written");
    let out =
        Command::new(&helm).args(["template", "moe", chart, "-f", bad.to_str().expect("path")]).output().expect("runs");
    assert!(!out.status.success(), "the schema accepted experts.device: tpu");
}
