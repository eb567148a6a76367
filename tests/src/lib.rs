//! The harness of the end-to-end tests: paths to the workspace's binaries and fixtures, and real `expert-node` and
//! `router-node` processes on free loopback ports, stopped when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// A binary of this workspace, built by `cargo build` / `cargo nextest run --workspace` next to the test executable
/// (`target/<profile>/`), or in `$MOE_BIN_DIR` when set.
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("MOE_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("the test executable has a path");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("the test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` (or the tests through `cargo nextest run --workspace`)",
        path.display()
    );
    path
}

/// A fixture model under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// A process of this workspace that serves on a free loopback port it picked itself (no port races) and announced
/// with a `listening on ADDR` line; killed when dropped. Its stderr goes to a log file the tests can show.
pub struct ServingProcess {
    child: Child,
    addr: String,
    log: tempfile::NamedTempFile,
}

impl ServingProcess {
    /// Starts `binary ARGS...` and waits until it prints where it listens.
    fn start(binary: &str, args: &[&std::ffi::OsStr]) -> Result<Self> {
        let log = tempfile::NamedTempFile::new().context("creating the log file")?;
        let mut child = Command::new(bin(binary))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.reopen().context("opening the log file")?)
            .spawn()
            .with_context(|| format!("spawning {binary}"))?;
        let stdout = child.stdout.take().context("the process's stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        let mut process = ServingProcess { child, addr: String::new(), log };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => process.addr = addr,
            Err(_) => bail!("{binary} {args:?} did not start serving:\n{}", process.log_text()),
        }
        Ok(process)
    }

    /// What it announced: `127.0.0.1:PORT` for an expert node, `http://127.0.0.1:PORT` for a router.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote on stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Returns whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (a name `kill` knows: STOP, CONT, TERM, ...) to the process.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{signal} {} failed", self.child.id());
        }
        Ok(())
    }

    /// Asks the process to stop (SIGTERM) and waits for it; returns its exit status.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        self.signal("TERM")?;
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the process did not stop within 15 s of SIGTERM:\n{}", self.log_text())
    }
}

impl Drop for ServingProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `expert-node`.
pub struct ExpertNodeProcess(ServingProcess);

impl ExpertNodeProcess {
    /// Starts `expert-node --model MODEL --listen 127.0.0.1:0 --experts EXPERTS EXTRA...` and waits until it serves.
    pub fn start(model: &Path, experts: &str, extra: &[&str]) -> Result<Self> {
        Self::start_at(model, "127.0.0.1:0", experts, extra)
    }

    /// Starts an expert node on `listen` (a node restarted where it was, for instance).
    pub fn start_at(model: &Path, listen: &str, experts: &str, extra: &[&str]) -> Result<Self> {
        let mut args: Vec<&std::ffi::OsStr> = vec!["--model".as_ref(), model.as_os_str()];
        for a in ["--listen", listen, "--experts", experts, "--threads", "2"].into_iter().chain(extra.iter().copied()) {
            args.push(a.as_ref());
        }
        ServingProcess::start("expert-node", &args).map(ExpertNodeProcess)
    }
}

/// A running `router-node` serving HTTP.
pub struct RouterProcess(ServingProcess);

impl RouterProcess {
    /// Starts `router-node --model MODEL --listen 127.0.0.1:0 EXTRA...` and waits until it serves.
    pub fn start(model: &Path, extra: &[&str]) -> Result<Self> {
        let mut args: Vec<&std::ffi::OsStr> = vec!["--model".as_ref(), model.as_os_str()];
        for a in ["--listen", "127.0.0.1:0"].into_iter().chain(extra.iter().copied()) {
            args.push(a.as_ref());
        }
        ServingProcess::start("router-node", &args).map(RouterProcess)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        self.0.addr()
    }
}

impl std::ops::Deref for ExpertNodeProcess {
    type Target = ServingProcess;
    fn deref(&self) -> &ServingProcess {
        &self.0
    }
}

impl std::ops::DerefMut for ExpertNodeProcess {
    fn deref_mut(&mut self) -> &mut ServingProcess {
        &mut self.0
    }
}

impl std::ops::Deref for RouterProcess {
    type Target = ServingProcess;
    fn deref(&self) -> &ServingProcess {
        &self.0
    }
}

impl std::ops::DerefMut for RouterProcess {
    fn deref_mut(&mut self) -> &mut ServingProcess {
        &mut self.0
    }
}

impl ExpertNodeProcess {
    /// Starts an expert node that joins `cluster` on the etcd at `etcd` (the controller assigns its experts).
    pub fn join(model: &Path, etcd: &str, cluster: &str, extra: &[&str]) -> Result<Self> {
        let mut args: Vec<&std::ffi::OsStr> = vec!["--model".as_ref(), model.as_os_str()];
        for a in
            ["--listen", "127.0.0.1:0", "--etcd", etcd, "--cluster", cluster, "--threads", "2", "--lease-ttl-secs", "2"]
                .into_iter()
                .chain(extra.iter().copied())
        {
            args.push(a.as_ref());
        }
        ServingProcess::start("expert-node", &args).map(ExpertNodeProcess)
    }
}

/// A free loopback port: bound, then released for the process about to use it.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

/// A real etcd server (Debian's `etcd-server`, or `$MOE_ETCD_BIN`) on free loopback ports, with its data in a
/// temporary directory; killed and removed when dropped.
pub struct EtcdServer {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl EtcdServer {
    pub fn start() -> Result<Self> {
        let binary = std::env::var("MOE_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let mut last = String::new();
        // etcd cannot announce a port it picked itself, so ports are picked here; another process may take one in
        // between, hence a few tries.
        for _ in 0..5 {
            let dir = tempfile::tempdir().context("creating etcd's data directory")?;
            let (client, peer) = (free_port()?, free_port()?);
            let log = dir.path().join("etcd.log");
            let endpoint = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = Command::new(&binary)
                .args(["--name", "test", "--data-dir"])
                .arg(dir.path().join("data"))
                .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
                .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("test={peer_url}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).context("creating etcd's log")?)
                .spawn()
                .with_context(|| {
                    format!("starting {binary} (install Debian's etcd-server, or point $MOE_ETCD_BIN at etcd)")
                })?;
            let mut server = EtcdServer { child, endpoint, _dir: dir, log };
            for _ in 0..200 {
                if server.log_text().contains("ready to serve client requests") {
                    return Ok(server);
                }
                if let Ok(Some(_)) = server.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            last = server.log_text();
        }
        bail!("etcd did not start:\n{last}")
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the server as a crash would (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The text `lm` generates greedily in this process for `prompt`: the reference served output is compared to.
pub fn local_greedy(lm: &moe_model::LoadedModel, prompt: &[u32], max_tokens: usize) -> String {
    let req = moe_model::GenerateRequest {
        prompt: prompt.to_vec(),
        max_tokens,
        sampling: moe_model::SamplingParams { temperature: 0.0, ..Default::default() },
        logprobs: 0,
        echo: false,
        stop_ids: Vec::new(),
    };
    let out = moe_model::generate(&lm.model, &lm.experts, &req, |_| {}).expect("generates");
    lm.tokenizer.decode(&out.output_ids, true).expect("decodes")
}
