//! Telemetry shared by the binaries: logging, process signals, Prometheus exposition ([`metrics`]) and OpenTelemetry
//! traces with their propagation between processes ([`trace`]).

pub mod metrics;
pub mod trace;

/// Logs to stderr through `tracing`, filtered by `RUST_LOG` (else `default_level`), coloured only on a terminal.
pub fn init_logging(default_level: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry().with(fmt_layer(default_level)).init();
}

/// The log lines: stderr, `RUST_LOG` or `default_level`, colour only on a terminal.
fn fmt_layer<S>(default_level: &str) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter)
}

/// Resolves on the first SIGINT (Ctrl-C) or, on Unix, SIGTERM: when a server should drain and stop. From then on a
/// second signal ends the process at once (exit status 130), whatever the drain is waiting for.
pub async fn shutdown_signal() {
    one_signal().await;
    tokio::spawn(async {
        one_signal().await;
        eprintln!("a second signal: exiting at once");
        std::process::exit(130);
    });
}

async fn one_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
                return;
            }
            Err(e) => tracing::warn!("cannot watch SIGTERM: {e}"),
        }
    }
    let _ = ctrl_c.await;
}
