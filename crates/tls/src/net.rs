//! TLS on sockets: the server side of a gRPC listener, and the dialler of a gRPC channel.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use crate::{Identity, Peer, Role};

/// How long a peer may take to finish its handshake before the connection is closed (a slow or silent client
/// holds no more than this).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; connections beyond are closed at once.
const MAX_HANDSHAKES: usize = 256;

/// The connections accepted on `listener`, each past a TLS handshake in which the client presented a certificate
/// chained to the cluster CA, for `tonic::transport::Server::serve_with_incoming`. Handshakes run concurrently, so
/// one slow client does not hold up others; a refused one is logged with the peer's address and the reason. The
/// accept loop ends when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    identity: Arc<Identity>,
) -> impl Stream<Item = io::Result<server::TlsStream<TcpStream>>> + Send + 'static {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept(listener, identity, tx));
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|tls| (Ok(tls), rx)) })
}

async fn accept(listener: TcpListener, identity: Arc<Identity>, tx: mpsc::Sender<server::TlsStream<TcpStream>>) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let accepted = tokio::select! {
            _ = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, addr) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of descriptors, most likely: wait for some to be freed rather than spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY: {e}");
        }
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(peer = %addr, "{MAX_HANDSHAKES} TLS handshakes already in progress: connection closed");
            continue;
        };
        let acceptor = TlsAcceptor::from(identity.server_config());
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send(tls).await;
                }
                // A connection closed before it said anything: a TCP probe or a port scan, not worth a warning.
                Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    tracing::debug!(peer = %addr, "connection closed before the TLS handshake: {e}")
                }
                Ok(Err(e)) => tracing::warn!(peer = %addr, "TLS handshake refused: {e}"),
                Err(_) => tracing::warn!(peer = %addr, "TLS handshake not finished within {HANDSHAKE_TIMEOUT:?}"),
            }
        });
    }
}

/// Dials `http://HOST:PORT` URIs over TCP and TLS for a tonic `Endpoint` (`connect_with_connector`): offers this
/// process's certificate, checks the server's against the CA and the host dialled, and refuses a server whose
/// certificate is not for `expect`. Each connection takes the identity's material current when it is dialled.
#[derive(Clone)]
pub struct Connector {
    identity: Arc<Identity>,
    expect: Role,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").field("expect", &self.expect).finish()
    }
}

impl Connector {
    pub fn new(identity: Arc<Identity>, expect: Role) -> Self {
        Connector { identity, expect }
    }
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.identity.client_config();
        let expect = self.expect;
        Box::pin(async move {
            let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
            let host = uri.host().ok_or_else(|| invalid(format!("{uri}: no host")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri.port_u16().ok_or_else(|| invalid(format!("{uri}: no port")))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host.clone()).map_err(|e| invalid(format!("{host}: {e}")))?;
            let tls = TlsConnector::from(config).connect(name, tcp).await?;
            let peer = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(Peer::of);
            match peer {
                Some(p) if p.role == expect => Ok(TokioIo::new(tls)),
                Some(p) => Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{host}:{port} presented the certificate of {p}, not of an {expect}"),
                )),
                None => Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{host}:{port} presented a certificate with no moe-mesh role"),
                )),
            }
        })
    }
}
