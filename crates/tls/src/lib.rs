//! Mutual TLS on the cluster's internal links (router ↔ expert node, and the processes ↔ etcd).
//!
//! **Who is who.** Every process holds a certificate issued by the cluster's CA. Its role is a URI SAN of the form
//! `spiffe://moe-mesh/<role>/<name>` ([`Role`]): a router, an expert node, the controller (the operator's tools,
//! the only identity that may change what a node hosts), or etcd. Both ends of a link check that the other's chain
//! ends at the cluster CA, and each checks the other's role: a router talks only to expert nodes, an expert node
//! answers `Forward` and `Status` for routers and the controller and `LoadExperts` / `UnloadExperts` for the
//! controller alone ([`Peer::may`]).
//!
//! **Files.** [`TlsArgs`] are the flags and config keys (`--tls-cert`, `--tls-key`, `--tls-ca`, or `--insecure`).
//! [`Identity`] holds what they name, parsed and checked, and reloads it on SIGHUP or when a file changes
//! ([`Identity::watch`]); connections already open keep the session they started with, so streams are not dropped,
//! and every new handshake uses the new material.
//!
//! **Sockets.** [`incoming`] turns a TCP listener into a stream of server-side TLS connections for tonic (handshakes
//! run concurrently and are bounded in time), and [`Connector`] dials one for a tonic `Endpoint`.
//!
//! **A development CA.** [`dev_ca`] writes a CA and role certificates (`moectl certs init|issue`), so that a local
//! cluster runs with the same checks a production one does.

use std::fmt;
use std::path::PathBuf;

pub mod dev_ca;
mod identity;
mod net;

pub use identity::{Identity, TlsFiles};
pub use net::{incoming, Connector, HANDSHAKE_TIMEOUT};
pub use rustls::pki_types::CertificateDer;

/// The trust domain of the role URIs.
pub const TRUST_DOMAIN: &str = "moe-mesh";

/// What a certificate lets its holder do in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Runs attention and gating and sends activations to expert nodes.
    Router,
    /// Hosts experts and serves `ExpertService`.
    Expert,
    /// Changes what nodes host (`LoadExperts` / `UnloadExperts`): the operator's tools.
    Controller,
    /// An etcd server of the cluster.
    Etcd,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Router, Role::Expert, Role::Controller, Role::Etcd];

    pub fn name(self) -> &'static str {
        match self {
            Role::Router => "router",
            Role::Expert => "expert",
            Role::Controller => "controller",
            Role::Etcd => "etcd",
        }
    }

    pub fn from_name(name: &str) -> Option<Role> {
        Self::ALL.into_iter().find(|r| r.name() == name)
    }

    /// The URI SAN that says `name` holds this role.
    pub fn uri(self, name: &str) -> String {
        format!("spiffe://{TRUST_DOMAIN}/{}/{name}", self.name())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::from_name(s).ok_or_else(|| {
            let all: Vec<_> = Role::ALL.iter().map(|r| r.name()).collect();
            format!("{s:?} is not a role ({})", all.join(", "))
        })
    }
}

/// The holder of a certificate, as its role URI names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub role: Role,
    pub name: String,
}

impl Peer {
    /// Reads the role URI of a DER certificate (the leaf of a verified chain). `None` when it carries no
    /// `spiffe://moe-mesh/<role>/<name>` URI, or more than one.
    pub fn of(cert: &CertificateDer<'_>) -> Option<Peer> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let sans = parsed.subject_alternative_name().ok()??;
        let prefix = format!("spiffe://{TRUST_DOMAIN}/");
        let mut found = sans.value.general_names.iter().filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => uri.strip_prefix(prefix.as_str()),
            _ => None,
        });
        let path = found.next()?;
        if found.next().is_some() {
            return None;
        }
        let (role, name) = path.split_once('/')?;
        Some(Peer { role: Role::from_name(role)?, name: name.to_owned() })
    }

    /// Whether this peer may call an `ExpertService` method (by its gRPC name).
    pub fn may(&self, method: &str) -> bool {
        match method {
            "LoadExperts" | "UnloadExperts" => self.role == Role::Controller,
            "Forward" | "Status" => matches!(self.role, Role::Router | Role::Controller),
            _ => false,
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.role, self.name)
    }
}

/// Errors of TLS set-up: each names the file or the check that failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Pem { path: PathBuf, message: String },
    #[error("{}: the certificate carries no role (a URI SAN spiffe://{TRUST_DOMAIN}/<role>/<name>); issue it with `moectl certs issue`", path.display())]
    NoRole { path: PathBuf },
    #[error("{}: the certificate is for role {found}, this process needs {wanted}", path.display())]
    WrongRole { path: PathBuf, found: Role, wanted: String },
    #[error("{}: does not chain to the CA in {}: {message}", cert.display(), ca.display())]
    Untrusted { cert: PathBuf, ca: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{}: {message}", path.display())]
    Write { path: PathBuf, message: String },
}

/// The TLS flags and config keys of a binary (flattened into its settings).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct TlsArgs {
    /// This process's certificate chain (PEM), issued by the cluster CA for its role (`moectl certs issue`).
    /// Reloaded on SIGHUP or when the file changes.
    #[arg(long, env = "MOE_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "MOE_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): peers must present a certificate that chains to it.
    #[arg(long, env = "MOE_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Plaintext, unauthenticated internal links (anyone who reaches a port can use it); logs a warning.
    #[arg(long, env = "MOE_INSECURE")]
    pub insecure: bool,
}

impl TlsArgs {
    /// The files to load, `None` for plaintext (`insecure`). `needed_for` says why links exist at all, for the
    /// error when neither is given.
    pub fn files(&self, needed_for: &str) -> Result<Option<TlsFiles>, moe_config::ConfigError> {
        use moe_config::ConfigError;
        let given = [&self.tls_cert, &self.tls_key, &self.tls_ca].iter().filter(|f| f.is_some()).count();
        if self.insecure {
            if given > 0 {
                return Err(ConfigError::refused("insecure", "not with tls-cert, tls-key or tls-ca"));
            }
            return Ok(None);
        }
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => {
                Ok(Some(TlsFiles { cert: cert.clone(), key: key.clone(), ca: ca.clone() }))
            }
            _ if given > 0 => {
                let missing: Vec<_> =
                    [("tls-cert", &self.tls_cert), ("tls-key", &self.tls_key), ("tls-ca", &self.tls_ca)]
                        .into_iter()
                        .filter(|(_, f)| f.is_none())
                        .map(|(k, _)| k)
                        .collect();
                Err(ConfigError::refused(missing[0], format!("{} also needed", missing.join(" and "))))
            }
            _ => Err(ConfigError::refused(
                "tls-cert",
                format!(
                    "{needed_for} uses mutual TLS: give tls-cert, tls-key and tls-ca (`moectl certs` writes them), \
                     or `insecure` for plaintext links"
                ),
            )),
        }
    }

    /// Loads the identity the flags name, which must hold one of `roles`; `None` with a warning when `insecure`.
    pub fn load(&self, roles: &[Role], needed_for: &str) -> Result<Option<std::sync::Arc<Identity>>, LoadError> {
        match self.files(needed_for)? {
            Some(files) => Ok(Some(Identity::load(files, roles)?)),
            None => {
                tracing::warn!("--insecure: the internal links are plaintext and unauthenticated");
                Ok(None)
            }
        }
    }
}

/// Why [`TlsArgs::load`] failed: the settings, or the files they name.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Settings(#[from] moe_config::ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The crypto provider of every configuration here (ring: no C toolchain beyond cc, no cmake).
pub(crate) fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_allowed_by_role() {
        let peer = |role| Peer { role, name: "x".into() };
        assert!(peer(Role::Router).may("Forward") && peer(Role::Router).may("Status"));
        assert!(!peer(Role::Router).may("UnloadExperts") && !peer(Role::Router).may("LoadExperts"));
        assert!(peer(Role::Controller).may("UnloadExperts") && peer(Role::Controller).may("Forward"));
        assert!(!peer(Role::Expert).may("Forward") && !peer(Role::Etcd).may("Status"));
        assert!(!peer(Role::Controller).may("SomethingNew"), "a method nobody listed is refused");
    }

    #[test]
    fn the_flags_need_all_three_files_or_insecure() {
        let none = TlsArgs::default();
        let msg = none.files("an expert node").expect_err("neither").to_string();
        assert!(msg.contains("insecure") && msg.contains("tls-cert"), "{msg}");
        let insecure = TlsArgs { insecure: true, ..TlsArgs::default() };
        assert!(insecure.files("x").expect("plaintext").is_none());
        let half = TlsArgs { tls_cert: Some("c.pem".into()), ..TlsArgs::default() };
        let msg = half.files("x").expect_err("half").to_string();
        assert!(msg.contains("tls-key and tls-ca"), "{msg}");
        let both = TlsArgs { insecure: true, tls_ca: Some("ca.pem".into()), ..TlsArgs::default() };
        assert!(both.files("x").is_err());
    }
}
