//! A process's certificate, key and CA, loaded from files, checked, and reloaded when they change.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::{provider, Peer, Role, TlsError};

/// The three files of an identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Private key of the leaf (PEM: PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// The cluster CA (PEM; several certificates are all trusted, for a CA rotation).
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The flags that give these files to a binary of the workspace.
    pub fn flags(&self) -> Vec<String> {
        let path = |p: &PathBuf| p.display().to_string();
        vec![
            "--tls-cert".into(),
            path(&self.cert),
            "--tls-key".into(),
            path(&self.key),
            "--tls-ca".into(),
            path(&self.ca),
        ]
    }
}

/// A process's TLS identity: its role, and the rustls configurations built from its files. Cheap to share; every
/// handshake takes the configuration current at that moment.
pub struct Identity {
    files: TlsFiles,
    roles: Vec<Role>,
    current: RwLock<Arc<Material>>,
    /// The stamp of files that failed to load, so that they are not read (and reported) again until they change.
    failed: std::sync::Mutex<Option<Stamp>>,
    /// Counts the reloads that changed the material, for clients that build their own TLS from the PEM text.
    reloads: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.material();
        f.debug_struct("Identity").field("files", &self.files).field("peer", &m.me).finish()
    }
}

/// What one reading of the files gave.
struct Material {
    stamp: Stamp,
    me: Peer,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    pem: Pem,
}

/// The files' PEM text, for clients that build their own TLS (etcd's).
#[derive(Debug, Clone)]
pub struct Pem {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

/// Modification time and length of each file: a change in either means "read again".
type Stamp = [Option<(SystemTime, u64)>; 3];

/// How often [`Identity::watch`] looks at the files between SIGHUPs.
pub const POLL: Duration = Duration::from_secs(2);

impl Identity {
    /// Reads and checks the files: the leaf must carry one of `roles`, chain to the CA, and match the key.
    pub fn load(files: TlsFiles, roles: &[Role]) -> Result<Arc<Identity>, TlsError> {
        let material = Material::read(&files, roles)?;
        tracing::info!(
            role = %material.me.role, name = %material.me.name, cert = %files.cert.display(),
            "mutual TLS on internal links"
        );
        Ok(Arc::new(Identity {
            files,
            roles: roles.to_vec(),
            current: RwLock::new(Arc::new(material)),
            failed: Default::default(),
            reloads: tokio::sync::watch::Sender::new(0),
        }))
    }

    fn material(&self) -> Arc<Material> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Who this process is.
    pub fn me(&self) -> Peer {
        self.material().me.clone()
    }

    /// The configuration a server-side handshake uses now (client certificates required, chained to the CA).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.material().server.clone()
    }

    /// The configuration a client-side handshake uses now (this process's certificate offered, the server's
    /// checked against the CA and the address dialled).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.material().client.clone()
    }

    /// The PEM text of the files as last read.
    pub fn pem(&self) -> Pem {
        self.material().pem.clone()
    }

    /// Changes each time a reload changed the material: clients that build their own TLS from [`Identity::pem`]
    /// (etcd's) reconnect with it.
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// Reads the files again if any changed since they were last read. Returns whether the material changed; on
    /// an error the previous material stays in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let now = stamp(&self.files);
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if now == self.material().stamp || failed.as_ref() == Some(&now) {
            return Ok(false);
        }
        let new = Material::read(&self.files, &self.roles).inspect_err(|_| *failed = Some(now))?;
        *failed = None;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        self.reloads.send_modify(|n| *n += 1);
        Ok(true)
    }

    /// Reloads on SIGHUP and whenever the files change (looked at every [`POLL`]), on the current runtime, for as
    /// long as the identity is in use elsewhere. A failed reload is logged and the previous material kept.
    pub fn watch(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                #[cfg(unix)]
                let asked = async {
                    match hup.as_mut() {
                        Some(h) => {
                            h.recv().await;
                        }
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let asked = std::future::pending::<()>();
                let by_signal = tokio::select! {
                    _ = asked => true,
                    _ = tokio::time::sleep(POLL) => false,
                };
                let Some(identity) = weak.upgrade() else { return };
                match identity.reload() {
                    Ok(true) => tracing::info!(cert = %identity.files.cert.display(), "TLS certificate reloaded"),
                    Ok(false) if by_signal => tracing::info!("SIGHUP: the TLS files are unchanged"),
                    Ok(false) => {}
                    Err(e) => tracing::error!("TLS reload failed, the previous certificate stays in use: {e}"),
                }
            }
        });
    }
}

impl Material {
    fn read(files: &TlsFiles, roles: &[Role]) -> Result<Material, TlsError> {
        // Stamped before reading: a write that lands in between is seen on the next look.
        let stamp = stamp(files);
        let pem = Pem { ca: read(&files.ca)?, cert: read(&files.cert)?, key: read(&files.key)? };
        let bad = |path: &Path, message: String| TlsError::Pem { path: path.into(), message };
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&pem.ca) {
            let ca = ca.map_err(|e| bad(&files.ca, e.to_string()))?;
            roots.add(ca).map_err(|e| bad(&files.ca, format!("not a CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(bad(&files.ca, "no certificate in the file".into()));
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem.cert)
            .collect::<Result<_, _>>()
            .map_err(|e| bad(&files.cert, e.to_string()))?;
        let Some(leaf) = chain.first() else {
            return Err(bad(&files.cert, "no certificate in the file".into()));
        };
        let key = PrivateKeyDer::from_pem_slice(&pem.key).map_err(|e| bad(&files.key, e.to_string()))?;
        let me = Peer::of(leaf).ok_or_else(|| TlsError::NoRole { path: files.cert.clone() })?;
        if !roles.contains(&me.role) {
            let wanted = roles.iter().map(|r| r.name()).collect::<Vec<_>>().join(" or ");
            return Err(TlsError::WrongRole { path: files.cert.clone(), found: me.role, wanted });
        }
        let roots = Arc::new(roots);
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider()).build()?;
        // The process's own chain must be one its peers accept: checked here, so that a wrong CA file says so at
        // start rather than as handshake failures on the other side.
        client_verifier.verify_client_cert(leaf, &chain[1..], UnixTime::now()).map_err(|e| TlsError::Untrusted {
            cert: files.cert.clone(),
            ca: files.ca.clone(),
            message: e.to_string(),
        })?;
        let versions = &[&rustls::version::TLS13];
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let server_verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider()).build()?;
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)?
            .with_webpki_verifier(server_verifier)
            .with_client_auth_cert(chain, key)?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Material { stamp, me, server: Arc::new(server), client: Arc::new(client), pem })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.into(), source })
}

fn stamp(files: &TlsFiles) -> Stamp {
    let one = |p: &Path| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
    [one(&files.cert), one(&files.key), one(&files.ca)]
}
