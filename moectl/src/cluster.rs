//! Local `expert-node` processes started by moectl (benchmarks now, `moectl up` later): found next to the moectl
//! executable (or on PATH), listening on free loopback ports they pick themselves, stopped when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The `expert-node` executable: beside this one (a cargo build or an install puts them together), else on PATH.
pub fn expert_node_binary() -> PathBuf {
    let beside = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|d| d.join("expert-node")));
    match beside {
        Some(path) if path.exists() => path,
        _ => PathBuf::from("expert-node"),
    }
}

/// One local expert node process.
pub struct LocalNode {
    child: Child,
    pub addr: String,
}

impl LocalNode {
    /// Starts `expert-node --model MODEL --listen 127.0.0.1:0 [--experts EXPERTS]` and waits until it serves
    /// (loading a large shard takes a while; its log goes to this process's stderr only with `verbose`). Without
    /// `experts`, `extra` says where the node gets its experts from (`--etcd`).
    pub fn start(model: &Path, experts: Option<&str>, extra: &[String], verbose: bool) -> Result<Self> {
        let binary = expert_node_binary();
        let mut command = Command::new(&binary);
        // Its own process group: Ctrl-C in the terminal reaches moectl only, which drains and then stops the nodes.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command
            .arg("--model")
            .arg(model)
            .args(["--listen", "127.0.0.1:0"])
            .args(experts.map(|e| ["--experts", e]).into_iter().flatten())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if verbose { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("the node's stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        let mut node = LocalNode { child, addr: String::new() };
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(addr) => {
                    node.addr = addr;
                    return Ok(node);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = node.child.try_wait()? {
                        bail!("expert-node {} exited with {status} before serving", experts.unwrap_or(""));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = node.child.wait()?;
                    bail!("expert-node {} exited with {status} before serving", experts.unwrap_or(""));
                }
            }
        }
    }
}

impl Drop for LocalNode {
    /// SIGTERM (the node answers what it has received), then SIGKILL after 3 s.
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).stderr(Stdio::null()).status();
        for _ in 0..60 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--experts` values that split `num_experts` experts of every layer evenly over `nodes` nodes.
pub fn even_split(num_experts: usize, nodes: usize) -> Vec<String> {
    (0..nodes)
        .map(|i| {
            let (lo, hi) = (num_experts * i / nodes, num_experts * (i + 1) / nodes);
            format!("{lo}-{}", hi.saturating_sub(1).max(lo))
        })
        .collect()
}
