//! A development certificate authority in a directory: `ca.pem` and `ca-key.pem`, and one `NAME.pem` /
//! `NAME-key.pem` pair per identity it issues. Keys are ECDSA P-256, written readable by their owner only.
//!
//! For a production cluster, issue the same kind of certificates from the organisation's CA: a leaf with the
//! role URI `spiffe://moe-mesh/<role>/<name>`, the host names or addresses peers dial it at, and both the server
//! and client authentication purposes.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use time::OffsetDateTime;

use crate::{Role, TlsError};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
/// The hosts a certificate is for when none are given: this machine's loopback.
pub const LOOPBACK: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A certificate and its key, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Creates a CA in `dir` (made if missing), valid for `days`. Refuses to replace an existing one unless `force`:
/// certificates it issued would stop being trusted.
pub fn init(dir: &Path, days: u32, force: bool) -> Result<Issued, TlsError> {
    let out = Issued { cert: dir.join(CA_CERT), key: dir.join(CA_KEY) };
    if !force && (out.cert.exists() || out.key.exists()) {
        return Err(TlsError::Write {
            path: out.cert,
            message: "a CA is already there (certificates it issued would no longer be trusted; --force replaces it)"
                .into(),
        });
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, "moe-mesh development CA");
    params.distinguished_name.push(DnType::OrganizationName, "moe-mesh");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write(dir, &out, &cert.pem(), &key.serialize_pem())?;
    Ok(out)
}

/// Issues the certificate of `name` in `role` from the CA in `dir`, for `hosts` (DNS names or IP addresses; the
/// loopback ones when empty), valid for `days`. Writes `NAME.pem` and `NAME-key.pem` there, replacing older ones.
pub fn issue(dir: &Path, role: Role, name: &str, hosts: &[String], days: u32) -> Result<Issued, TlsError> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) || name.starts_with('.')
    {
        return Err(TlsError::Write {
            path: dir.join(name),
            message: "a name is letters, digits, '.', '_' and '-' (it names the files and the role URI)".into(),
        });
    }
    let read =
        |path: PathBuf| std::fs::read_to_string(&path).map_err(|source| TlsError::Read { path: path.clone(), source });
    let ca_key = KeyPair::from_pem(&read(dir.join(CA_KEY))?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(dir.join(CA_CERT))?, ca_key)?;

    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, format!("{role} {name}"));
    params.distinguished_name.push(DnType::OrganizationName, "moe-mesh");
    params.subject_alt_names.push(SanType::URI(Ia5String::try_from(role.uri(name))?));
    let loopback: Vec<String> = LOOPBACK.iter().map(|h| h.to_string()).collect();
    for host in if hosts.is_empty() { &loopback } else { hosts } {
        params.subject_alt_names.push(match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(Ia5String::try_from(host.as_str())?),
        });
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every process is a client of someone (etcd at least) and most are servers.
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let out = Issued { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}-key.pem")) };
    write(dir, &out, &cert.pem(), &key.serialize_pem())?;
    Ok(out)
}

/// Makes sure `dir` holds a CA and a certificate for each `(role, name)` (loopback hosts), issuing what is missing.
/// A directory that does not exist yet is made complete beside it and renamed into place, so that processes racing
/// to make the same one (parallel tests) all end up using one CA.
pub fn ensure(dir: &Path, identities: &[(Role, &str)]) -> Result<(), TlsError> {
    let complete = |d: &Path| {
        d.join(CA_CERT).exists()
            && identities.iter().all(|(_, n)| files(d, n).cert.exists() && files(d, n).key.exists())
    };
    if complete(dir) {
        return Ok(());
    }
    if dir.join(CA_CERT).exists() {
        for (role, name) in identities {
            if !files(dir, name).cert.exists() {
                issue(dir, *role, name, &[], 365)?;
            }
        }
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    let failed = |path: &Path, e: std::io::Error| TlsError::Write { path: path.into(), message: e.to_string() };
    std::fs::create_dir_all(parent).map_err(|e| failed(parent, e))?;
    let staging = parent.join(format!(
        ".{}.{}.tmp",
        dir.file_name().map_or("certs".into(), |n| n.to_string_lossy().into_owned()),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    init(&staging, 3650, false)?;
    for (role, name) in identities {
        issue(&staging, *role, name, &[], 365)?;
    }
    match std::fs::rename(&staging, dir) {
        Ok(()) => Ok(()),
        // Another process got there first: use its CA.
        Err(_) if complete(dir) => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(())
        }
        Err(e) => Err(failed(dir, e)),
    }
}

/// The files of `name` in `dir`, with the CA there.
pub fn files(dir: &Path, name: &str) -> crate::TlsFiles {
    crate::TlsFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
        ca: dir.join(CA_CERT),
    }
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    // An hour back, for clocks a little behind this one.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days.max(1)));
}

/// Writes the certificate, then the key readable by its owner only; each through a temporary file renamed into
/// place, so that a process watching the files never reads half of one.
fn write(dir: &Path, out: &Issued, cert: &str, key: &str) -> Result<(), TlsError> {
    let failed = |path: &Path, e: std::io::Error| TlsError::Write { path: path.into(), message: e.to_string() };
    std::fs::create_dir_all(dir).map_err(|e| failed(dir, e))?;
    for (path, text, private) in [(&out.key, key, true), (&out.cert, cert, false)] {
        let tmp = path.with_extension("pem.tmp");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        #[cfg(not(unix))]
        let _ = private;
        let mut file = options.open(&tmp).map_err(|e| failed(&tmp, e))?;
        file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(|e| failed(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| failed(path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Identity, Peer, TlsFiles};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    #[test]
    fn issued_certificates_carry_their_role_and_load_for_it_only() {
        let dir = tempfile::tempdir().expect("tmp");
        init(dir.path(), 30, false).expect("CA");
        assert!(init(dir.path(), 30, false).is_err(), "an existing CA is not replaced by accident");
        let router = issue(dir.path(), Role::Router, "router-1", &[], 30).expect("issues");
        let der = CertificateDer::from_pem_file(&router.cert).expect("PEM");
        assert_eq!(Peer::of(&der), Some(Peer { role: Role::Router, name: "router-1".into() }));
        let files = TlsFiles { cert: router.cert.clone(), key: router.key.clone(), ca: dir.path().join(CA_CERT) };
        let identity = Identity::load(files.clone(), &[Role::Router]).expect("loads");
        assert_eq!(identity.me().name, "router-1");
        let err = Identity::load(files, &[Role::Expert]).expect_err("not an expert").to_string();
        assert!(err.contains("role router") && err.contains("needs expert"), "{err}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&router.key).expect("key").permissions().mode();
            assert_eq!(mode & 0o077, 0, "the key is readable by its owner only");
        }
        assert!(issue(dir.path(), Role::Router, "../evil", &[], 30).is_err());
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused_at_load() {
        let (ours, theirs) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
        init(ours.path(), 30, false).expect("CA");
        init(theirs.path(), 30, false).expect("CA");
        let stranger = issue(theirs.path(), Role::Expert, "e", &[], 30).expect("issues");
        let files = TlsFiles { cert: stranger.cert, key: stranger.key, ca: ours.path().join(CA_CERT) };
        let err = Identity::load(files, &[Role::Expert]).expect_err("untrusted").to_string();
        assert!(err.contains("does not chain to the CA"), "{err}");
    }

    #[test]
    fn a_reload_picks_up_a_reissued_certificate_and_keeps_the_old_on_error() {
        let dir = tempfile::tempdir().expect("tmp");
        init(dir.path(), 30, false).expect("CA");
        let e = issue(dir.path(), Role::Expert, "e", &[], 30).expect("issues");
        let files = TlsFiles { cert: e.cert.clone(), key: e.key.clone(), ca: dir.path().join(CA_CERT) };
        let identity = Identity::load(files, &[Role::Expert]).expect("loads");
        assert!(!identity.reload().expect("unchanged"));
        let before = identity.pem().cert;
        // A new certificate of a different length, so the change shows even within the file time's resolution.
        issue(dir.path(), Role::Expert, "e", &["e.example".into()], 30).expect("reissues");
        assert!(identity.reload().expect("reloads"));
        assert_ne!(identity.pem().cert, before);
        std::fs::write(&e.cert, "not a certificate, and not as long as one").expect("write");
        assert!(identity.reload().is_err());
        assert_ne!(identity.pem().cert, before, "the reissued certificate stays in use");
    }
}
