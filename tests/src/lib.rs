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
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` (or the tests through `cargo nextest run --workspace`)",
        path.display()
    );
    path
}

/// How far a log-prob may move when the routed experts' partial sums are grouped differently than in one process
/// (experts split over nodes, a step moved to a replica), with f32 on the wire. The f32 kernels round such a
/// regrouping at f32's last bits: 1e-5. The matrix units' split precision (the default with AMX) rounds each
/// activation into a bf16 high and low part, so a last-bit difference can move the low part by up to about 2⁻¹⁷ of
/// the value, and later layers carry it: 1e-4, the bound moe-model's prefill-versus-decode test holds those kernels
/// to (measured on AMX: 9e-6 to 3.1e-5).
pub fn regrouping_tolerance() -> f64 {
    let sel = moe_model::cpu::matmul::selection();
    if sel.kernel.group().is_some() || sel.precision == moe_model::cpu::matmul::Precision::Bf16 {
        1e-4
    } else {
        1e-5
    }
}

/// The cluster CA of the tests, with a certificate per role (`router`, `expert`, `controller`, `etcd`): made once
/// per build directory (`target/<profile>/test-certs`), shared by every test process, and given to every node and
/// router the harness starts, so that the end-to-end tests run the links with mutual TLS as production does.
pub mod tls {
    use std::path::PathBuf;
    use std::sync::{Arc, OnceLock};

    use moe_tls::{dev_ca, Identity, Role, TlsFiles};

    pub const ROLES: [(Role, &str); 4] =
        [(Role::Router, "router"), (Role::Expert, "expert"), (Role::Controller, "controller"), (Role::Etcd, "etcd")];

    /// The directory of the CA and the role certificates.
    pub fn dir() -> &'static PathBuf {
        static DIR: OnceLock<PathBuf> = OnceLock::new();
        DIR.get_or_init(|| {
            let dir = super::bin_dir().join("test-certs");
            dev_ca::ensure(&dir, &ROLES).expect("the test CA");
            dir
        })
    }

    /// The files of `role`'s certificate.
    pub fn files(role: Role) -> TlsFiles {
        dev_ca::files(dir(), role.name())
    }

    /// The flags giving `role`'s certificate to a binary.
    pub fn flags(role: Role) -> Vec<String> {
        files(role).flags()
    }

    /// A certificate of the test CA for `role`, valid for `hosts` (a node on an address other than loopback), in a
    /// directory of its own that lives as long as the returned guard.
    pub fn issue_for(role: Role, hosts: &[String]) -> (tempfile::TempDir, TlsFiles) {
        let tmp = tempfile::tempdir().expect("tmp");
        for f in [dev_ca::CA_CERT, dev_ca::CA_KEY] {
            std::fs::copy(dir().join(f), tmp.path().join(f)).expect("the test CA");
        }
        dev_ca::issue(tmp.path(), role, role.name(), hosts, 30).expect("issues");
        let files = dev_ca::files(tmp.path(), role.name());
        (tmp, files)
    }

    /// `role`'s identity in this process (for in-process routers and gRPC clients).
    pub fn identity(role: Role) -> Arc<Identity> {
        Identity::load(files(role), &[role]).expect("a test identity")
    }

    /// A channel to the expert node at `addr`, authenticated as `role`.
    pub async fn channel(addr: &str, role: Role) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("an address")
            .connect_with_connector(moe_tls::Connector::new(identity(role), Role::Expert))
            .await
            .expect("connects with TLS")
    }

    /// A gRPC client of the expert node at `addr`, authenticated as `role`.
    pub async fn client(addr: &str, role: Role) -> moe_proto::ExpertServiceClient<tonic::transport::Channel> {
        moe_proto::ExpertServiceClient::new(channel(addr, role).await)
    }
}

/// `target/<profile>/`, where the workspace's binaries are built (or `$MOE_BIN_DIR`).
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MOE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the test executable has a path");
    exe.parent().and_then(Path::parent).expect("the test executable lives in target/<profile>/deps").to_owned()
}

/// Unless `extra` chooses the links' security itself (`--insecure` or `--tls-cert`), `role`'s TLS flags.
fn tls_unless_chosen(role: moe_tls::Role, extra: &[&str]) -> Vec<String> {
    if extra.iter().any(|a| *a == "--insecure" || *a == "--tls-cert") {
        Vec::new()
    } else {
        tls::flags(role)
    }
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
    metrics_addr: Option<String>,
    log: tempfile::NamedTempFile,
}

impl ServingProcess {
    /// Starts `binary ARGS...` and waits until it prints where it listens.
    fn start(binary: &str, args: &[&std::ffi::OsStr]) -> Result<Self> {
        Self::start_with(binary, args, &Launch::default())
    }

    /// Starts `binary ARGS...` as `launch` says and waits until it prints where it listens.
    pub fn start_with(binary: &str, args: &[&std::ffi::OsStr], launch: &Launch) -> Result<Self> {
        let log = tempfile::NamedTempFile::new().context("creating the log file")?;
        let mut command = match &launch.netns {
            // `ip netns exec` enters the namespace and then execs the binary: the child's pid is the binary's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin(binary));
                c
            }
            None => Command::new(bin(binary)),
        };
        let mut child = command
            .args(args)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
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
                // An expert node with --metrics-listen announces that address first.
                if let Some(addr) = line.strip_prefix("metrics on ") {
                    let _ = tx.send((true, addr.trim().to_owned()));
                } else if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send((false, addr.trim().to_owned()));
                }
            }
        });
        let mut process = ServingProcess { child, addr: String::new(), metrics_addr: None, log };
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok((true, addr)) => process.metrics_addr = Some(addr),
                Ok((false, addr)) => {
                    process.addr = addr;
                    break;
                }
                Err(_) => bail!("{binary} {args:?} did not start serving:\n{}", process.log_text()),
            }
        }
        Ok(process)
    }

    /// Where an expert node started with `--metrics-listen` serves `/metrics` (`127.0.0.1:PORT`).
    pub fn metrics_addr(&self) -> Option<&str> {
        self.metrics_addr.as_deref()
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

    /// Waits up to `within` for `needle` to appear in its stderr (a line may be written a little after the effect a
    /// test observed); whether it did.
    pub fn log_shows(&self, needle: &str, within: std::time::Duration) -> bool {
        let until = std::time::Instant::now() + within;
        loop {
            if self.log_text().contains(needle) {
                return true;
            }
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
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

/// How a process is started beyond its arguments.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Extra environment (`FAILPOINTS`, for instance).
    pub env: Vec<(String, String)>,
    /// A network namespace to run in (see [`Netns`]).
    pub netns: Option<String>,
}

impl Launch {
    /// With fault injection: `FAILPOINTS=spec` (the binaries the tests run are built with the `fail` crate).
    pub fn failpoints(spec: &str) -> Self {
        Launch { env: vec![("FAILPOINTS".into(), spec.into())], netns: None }
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
        Self::launch(model, listen, experts, extra, &Launch::default())
    }

    /// Starts an expert node on `listen` as `launch` says.
    pub fn launch(model: &Path, listen: &str, experts: &str, extra: &[&str], launch: &Launch) -> Result<Self> {
        let tls = tls_unless_chosen(moe_tls::Role::Expert, extra);
        let mut args: Vec<&std::ffi::OsStr> = vec!["--model".as_ref(), model.as_os_str()];
        for a in ["--listen", listen, "--experts", experts, "--threads", "2"]
            .into_iter()
            .chain(extra.iter().copied())
            .chain(tls.iter().map(String::as_str))
        {
            args.push(a.as_ref());
        }
        ServingProcess::start_with("expert-node", &args, launch).map(ExpertNodeProcess)
    }
}

/// A running `router-node` serving HTTP.
pub struct RouterProcess(ServingProcess);

impl RouterProcess {
    /// Starts `router-node --model MODEL --listen 127.0.0.1:0 EXTRA...` and waits until it serves.
    pub fn start(model: &Path, extra: &[&str]) -> Result<Self> {
        Self::launch(model, extra, &Launch::default())
    }

    /// Starts a router as `launch` says.
    pub fn launch(model: &Path, extra: &[&str], launch: &Launch) -> Result<Self> {
        let tls = tls_unless_chosen(moe_tls::Role::Router, extra);
        let mut args: Vec<&std::ffi::OsStr> = vec!["--model".as_ref(), model.as_os_str()];
        for a in
            ["--listen", "127.0.0.1:0"].into_iter().chain(extra.iter().copied()).chain(tls.iter().map(String::as_str))
        {
            args.push(a.as_ref());
        }
        ServingProcess::start_with("router-node", &args, launch).map(RouterProcess)
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
        let tls = tls_unless_chosen(moe_tls::Role::Expert, extra);
        let mut args: Vec<&std::ffi::OsStr> = vec!["--model".as_ref(), model.as_os_str()];
        for a in
            ["--listen", "127.0.0.1:0", "--etcd", etcd, "--cluster", cluster, "--threads", "2", "--lease-ttl-secs", "2"]
                .into_iter()
                .chain(extra.iter().copied())
                .chain(tls.iter().map(String::as_str))
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
    peer_url: String,
    dir: tempfile::TempDir,
    log: PathBuf,
    tls: bool,
}

impl EtcdServer {
    pub fn start() -> Result<Self> {
        Self::start_as(false)
    }

    /// An etcd that serves clients over TLS with the test CA's `etcd` certificate and requires client
    /// certificates of that CA (`--client-cert-auth`); its endpoint is `https://127.0.0.1:PORT`.
    pub fn start_tls() -> Result<Self> {
        Self::start_as(true)
    }

    fn start_as(tls: bool) -> Result<Self> {
        let mut last = String::new();
        // etcd cannot announce a port it picked itself, so ports are picked here; another process may take one in
        // between, hence a few tries.
        for _ in 0..5 {
            let dir = tempfile::tempdir().context("creating etcd's data directory")?;
            let (client, peer) = (free_port()?, free_port()?);
            let log = dir.path().join("etcd.log");
            let endpoint = format!("{}://127.0.0.1:{client}", if tls { "https" } else { "http" });
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = Self::spawn(dir.path(), &endpoint, &peer_url, &log, tls)?;
            let mut server = EtcdServer { child, endpoint, peer_url, dir, log, tls };
            if server.wait_ready(0) {
                return Ok(server);
            }
            last = server.log_text();
        }
        bail!("etcd did not start:\n{last}")
    }

    fn spawn(dir: &Path, endpoint: &str, peer_url: &str, log: &Path, tls: bool) -> Result<Child> {
        let binary = std::env::var("MOE_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let mut command = Command::new(&binary);
        if tls {
            let f = tls::files(moe_tls::Role::Etcd);
            command.arg("--cert-file").arg(&f.cert).arg("--key-file").arg(&f.key);
            command.arg("--trusted-ca-file").arg(&f.ca).arg("--client-cert-auth");
        }
        command
            .args(["--name", "test", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", endpoint, "--advertise-client-urls", endpoint])
            .args(["--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).context("opening etcd's log")?)
            .spawn()
            .with_context(|| {
                format!("starting {binary} (install Debian's etcd-server, or point $MOE_ETCD_BIN at etcd)")
            })
    }

    fn ready_lines(&self) -> usize {
        self.log_text().matches("ready to serve client requests").count()
    }

    /// Waits (10 s at most) for a "ready" line beyond the `before` already in the log; false if it exited or not.
    fn wait_ready(&mut self, before: usize) -> bool {
        for _ in 0..200 {
            if self.ready_lines() > before {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Starts the server again, on its ports with its data, after [`EtcdServer::kill`] (an etcd that comes back).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let before = self.ready_lines();
        self.child = Self::spawn(self.dir.path(), &self.endpoint, &self.peer_url, &self.log, self.tls)?;
        if !self.wait_ready(before) {
            bail!("etcd did not restart:\n{}", self.log_text());
        }
        Ok(())
    }

    /// `http://127.0.0.1:PORT` (`https://` with [`EtcdServer::start_tls`]).
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

/// A network namespace of the test's own, joined to the host's by one veth pair: the host end `10.A.B.C/30`, the
/// namespace end one above it, where a process started with [`Launch::netns`] listens ([`Netns::inside`]).
/// [`Netns::partition`] drops every packet crossing the pair (iptables inside the namespace) and [`Netns::heal`]
/// lifts that, so TCP connections see silence, as a real partition gives them. Dropping it removes both.
pub struct Netns {
    name: String,
    inner_if: String,
    host_if: String,
    inside: String,
    partitioned: bool,
}

impl Netns {
    /// Creates the namespace and its link (needs root and iproute2; say so in the error otherwise).
    pub fn create() -> Result<Self> {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        // Private addresses, unique per test process and namespace; nothing outside this machine is addressed.
        let (a, b, c) = (100 + (pid >> 8) % 150, pid % 256, (k % 64) * 4);
        let tag = format!("{}{}", pid % 100_000, k);
        let ns = Netns {
            name: format!("moe-test-{tag}"),
            host_if: format!("mh{tag}"),
            inner_if: format!("mn{tag}"),
            inside: format!("10.{a}.{b}.{}", c + 2),
            partitioned: false,
        };
        let host_ip = format!("10.{a}.{b}.{}/30", c + 1);
        let inner_ip = format!("{}/30", ns.inside);
        run("ip", &["netns", "add", &ns.name]).context("creating a network namespace (needs root and iproute2)")?;
        run("ip", &["link", "add", &ns.host_if, "type", "veth", "peer", "name", &ns.inner_if, "netns", &ns.name])?;
        run("ip", &["addr", "add", &host_ip, "dev", &ns.host_if])?;
        run("ip", &["link", "set", &ns.host_if, "up"])?;
        ns.exec(&["ip", "addr", "add", &inner_ip, "dev", &ns.inner_if])?;
        ns.exec(&["ip", "link", "set", &ns.inner_if, "up"])?;
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, for [`Launch::netns`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace end's address.
    pub fn inside(&self) -> &str {
        &self.inside
    }

    fn exec(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Drops every packet in and out of the namespace's link.
    pub fn partition(&mut self) -> Result<()> {
        self.exec(&["iptables", "-I", "INPUT", "-i", &self.inner_if, "-j", "DROP"])?;
        self.exec(&["iptables", "-I", "OUTPUT", "-o", &self.inner_if, "-j", "DROP"])?;
        self.partitioned = true;
        Ok(())
    }

    /// Lets packets through again.
    pub fn heal(&mut self) -> Result<()> {
        self.exec(&["iptables", "-D", "INPUT", "-i", &self.inner_if, "-j", "DROP"])?;
        self.exec(&["iptables", "-D", "OUTPUT", "-o", &self.inner_if, "-j", "DROP"])?;
        self.partitioned = false;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.partitioned {
            let _ = self.heal();
        }
        // Deleting one end of a veth pair deletes both.
        let _ = run("ip", &["link", "del", &self.host_if]);
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Peak and current resident memory of a process, in bytes (`VmHWM`, `VmRSS` of /proc/PID/status).
pub fn memory_of(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib = |key: &str| -> u64 {
        let line = text.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no {key}"));
        line.trim().trim_end_matches("kB").trim().parse::<u64>().expect("a number") << 10
    };
    (kib("VmHWM:"), kib("VmRSS:"))
}

/// The value of series `name` in a Prometheus exposition, summed over its label sets (`None`: not there).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let series = moe_telemetry::metrics::parse_series(text);
    let mut values = series.iter().filter(|(n, _, _)| n == name).map(|(_, _, v)| *v).peekable();
    values.peek()?;
    Some(values.sum())
}

/// The series a Grafana dashboard's queries name (`moe_*` and `vllm:*` identifiers in every `expr`).
pub fn dashboard_metrics(json: &str) -> Result<std::collections::BTreeSet<String>> {
    fn walk(v: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(q)) => names_in(q, out),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    fn names_in(query: &str, out: &mut std::collections::BTreeSet<String>) {
        let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
        let mut rest = query;
        while let Some(i) = [rest.find("moe_"), rest.find("vllm:")].into_iter().flatten().min() {
            // Only at the start of an identifier.
            if i > 0 && rest[..i].chars().next_back().is_some_and(ident) {
                rest = &rest[i + 1..];
                continue;
            }
            let end = rest[i..].find(|c: char| !ident(c)).map_or(rest.len(), |e| i + e);
            out.insert(rest[i..end].to_owned());
            rest = &rest[end..];
        }
    }
    let v: serde_json::Value = serde_json::from_str(json).context("the dashboard is not JSON")?;
    let mut out = std::collections::BTreeSet::new();
    walk(&v, &mut out);
    Ok(out)
}

/// The Python that runs the `openai` client tests: `MOE_PYTHON` (set by `.ci/run`) or `python3`, when it can import
/// `openai`. `None` means skip, with the reason printed; under CI (`CI` set) a missing client fails instead.
pub fn openai_python() -> Option<String> {
    let python = std::env::var("MOE_PYTHON").unwrap_or_else(|_| "python3".into());
    let importable =
        std::process::Command::new(&python).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success());
    if !importable {
        assert!(std::env::var_os("CI").is_none(), "{python} cannot import openai; .ci/run installs it");
        eprintln!("SKIPPED: {python} cannot import openai (pip install openai, or set MOE_PYTHON)");
        return None;
    }
    Some(python)
}
