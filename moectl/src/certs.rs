//! `moectl certs`: a development CA and the role certificates of a cluster's processes.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use moe_tls::{dev_ca, Role};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: CertsCommand,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create a CA (`ca.pem`, `ca-key.pem`) in DIR. Keep `ca-key.pem` away from the nodes: only `ca.pem` is
    /// installed on them.
    Init {
        /// Directory of the CA and of the certificates it issues (created if missing).
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Days the CA is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace an existing CA (certificates it issued stop being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue the certificate of one process: `NAME.pem` and `NAME-key.pem` in DIR, signed by the CA there.
    ///
    /// The role decides what the holder may do: `router` (Forward and Status on expert nodes), `expert` (serve
    /// ExpertService), `controller` (also LoadExperts / UnloadExperts: for the operator's tools), `etcd` (an etcd
    /// server of the cluster).
    Issue {
        /// router, expert, controller or etcd.
        role: Role,
        /// Name of the holder (its member id, say); names the files and goes into the role URI.
        name: String,
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Host names and IP addresses peers reach the holder at, comma-separated [default: localhost, 127.0.0.1,
        /// ::1].
        #[arg(long, value_delimiter = ',')]
        host: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        CertsCommand::Init { dir, days, force } => {
            let ca = dev_ca::init(&dir, days, force).context("creating the CA")?;
            println!(
                "CA written: {} (certificate, for every process) and {} (key, keep private)",
                ca.cert.display(),
                ca.key.display()
            );
        }
        CertsCommand::Issue { role, name, dir, host, days } => {
            let issued = dev_ca::issue(&dir, role, &name, &host, days)
                .with_context(|| format!("issuing the certificate of {role} {name}"))?;
            println!("{role} {name}: {} and {}", issued.cert.display(), issued.key.display());
            println!(
                "  use with --tls-cert {} --tls-key {} --tls-ca {}",
                issued.cert.display(),
                issued.key.display(),
                dir.join(dev_ca::CA_CERT).display()
            );
        }
    }
    Ok(())
}
