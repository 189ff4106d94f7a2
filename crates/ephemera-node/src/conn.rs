//! Accepted connections, plain or TLS, with what the handlers need to know about the peer, and
//! the limits that apply before anyone is authenticated: a cap on each listener's open
//! connections, a cap on concurrent TLS handshakes from one source address, a handshake
//! deadline, and (for the HTTP listener) an idle deadline. A peer over a limit is disconnected
//! at once, before any TLS or request work is spent on it.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ephemera_raft::network::BoxedStream;
use futures::Stream;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;

/// `[listeners]` in the node configuration: limits on connections before authentication.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerLimits {
    /// Open connections per listener; more are closed as soon as they are accepted.
    pub max_connections: u32,
    /// TLS handshakes in progress from one source address, per listener.
    pub max_handshakes_per_source: u32,
    /// Longest a client may take to finish the TLS handshake.
    pub handshake_timeout_ms: u64,
    /// HTTP/1: longest a client may take to send a request's headers, from the moment the
    /// server is ready to read them (so it also closes an idle keep-alive connection).
    pub http_header_timeout_ms: u64,
    /// HTTP: a connection with no traffic either way for this long is closed.
    pub http_idle_timeout_ms: u64,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            max_connections: 4096,
            max_handshakes_per_source: 32,
            handshake_timeout_ms: 10_000,
            http_header_timeout_ms: 10_000,
            http_idle_timeout_ms: 60_000,
        }
    }
}

impl ListenerLimits {
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("listeners.max_connections", u64::from(self.max_connections)),
            (
                "listeners.max_handshakes_per_source",
                u64::from(self.max_handshakes_per_source),
            ),
            ("listeners.handshake_timeout_ms", self.handshake_timeout_ms),
            (
                "listeners.http_header_timeout_ms",
                self.http_header_timeout_ms,
            ),
            ("listeners.http_idle_timeout_ms", self.http_idle_timeout_ms),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        Ok(())
    }
}

enum Io {
    Plain(BoxedStream),
    Tls(Box<tokio_rustls::server::TlsStream<BoxedStream>>),
}

/// What accepts connections: a TCP listener, or (under simulation) a simulated one.
pub trait Listener: Send + 'static {
    fn accept(&mut self) -> impl Future<Output = io::Result<(BoxedStream, SocketAddr)>> + Send;
}

impl Listener for TcpListener {
    async fn accept(&mut self) -> io::Result<(BoxedStream, SocketAddr)> {
        let (tcp, peer) = TcpListener::accept(self).await?;
        let _ = tcp.set_nodelay(true);
        Ok((Box::new(tcp), peer))
    }
}

/// An accepted connection. It holds one of its listener's connection slots until dropped, and
/// records when it last carried traffic (for the idle deadline).
pub struct Conn {
    io: Io,
    remote: SocketAddr,
    _slot: OwnedSemaphorePermit,
    activity: Activity,
}

/// When a connection last read or wrote, in milliseconds since it was accepted.
#[derive(Clone)]
pub struct Activity {
    since: tokio::time::Instant,
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Self {
        Activity {
            since: tokio::time::Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = self.since.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Resolves once the connection has carried no traffic for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.since + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl Conn {
    pub fn activity(&self) -> Activity {
        self.activity.clone()
    }
}

/// Inserted into every request's extensions by tonic (and by our HTTP loop).
#[derive(Clone, Debug, Default)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    /// The client's certificate chain, leaf first, when it presented one over TLS.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        let peer_certs = match &self.io {
            Io::Plain(_) => None,
            Io::Tls(s) => s
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect())),
        };
        ConnInfo {
            remote: Some(self.remote),
            peer_certs,
        }
    }
}

/// Records traffic when a poll made progress.
fn noted<T>(activity: &Activity, p: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
    if let Poll::Ready(Ok(_)) = &p {
        activity.touch();
    }
    p
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let p = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        noted(&this.activity, p)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let p = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        };
        noted(&this.activity, p)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let p = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        };
        noted(&this.activity, p)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// In-progress TLS handshakes per source address (entries go when their count reaches 0).
#[derive(Default)]
struct Handshakes(Mutex<HashMap<IpAddr, u32>>);

struct HandshakeSlot {
    table: Arc<Handshakes>,
    ip: IpAddr,
}

impl Handshakes {
    fn enter(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<HandshakeSlot> {
        let mut t = self.0.lock().expect("handshake table lock");
        let n = t.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(HandshakeSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut t = self.table.0.lock().expect("handshake table lock");
        if let Some(n) = t.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.ip);
            }
        }
    }
}

/// Accepted connections from `listener`; with `tls`, each handshake runs in its own task so a
/// slow or hostile client cannot stall the accept loop. A connection over the listener's cap,
/// or a handshake over its source's cap, is closed at once.
pub fn incoming(
    mut listener: impl Listener,
    tls: Option<TlsAcceptor>,
    limits: &ListenerLimits,
) -> impl Stream<Item = io::Result<Conn>> {
    let (tx, rx) = mpsc::channel::<io::Result<Conn>>(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections as usize));
    let handshakes = Arc::new(Handshakes::default());
    let max_handshakes = limits.max_handshakes_per_source;
    let handshake_timeout = Duration::from_millis(limits.handshake_timeout_ms);
    tokio::spawn(async move {
        loop {
            if tx.is_closed() {
                return;
            }
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "connection refused: the listener is at its connection cap");
                continue;
            };
            match &tls {
                None => {
                    let conn = Conn {
                        io: Io::Plain(stream),
                        remote: peer,
                        _slot: slot,
                        activity: Activity::new(),
                    };
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Some(acceptor) => {
                    let Some(handshake) = handshakes.enter(peer.ip(), max_handshakes) else {
                        tracing::debug!(%peer, "connection refused: too many handshakes from this address");
                        continue;
                    };
                    let (acceptor, tx) = (acceptor.clone(), tx.clone());
                    tokio::spawn(async move {
                        let accepted =
                            tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await;
                        drop(handshake);
                        match accepted {
                            Ok(Ok(s)) => {
                                let conn = Conn {
                                    io: Io::Tls(Box::new(s)),
                                    remote: peer,
                                    _slot: slot,
                                    activity: Activity::new(),
                                };
                                let _ = tx.send(Ok(conn)).await;
                            }
                            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake refused"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_slots_are_counted_per_source_and_released() {
        let table = Arc::new(Handshakes::default());
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let first = table.enter(a, 2).unwrap();
        let second = table.enter(a, 2).unwrap();
        assert!(
            table.enter(a, 2).is_none(),
            "a third handshake from one address"
        );
        assert!(
            table.enter(b, 2).is_some(),
            "another address is not limited by the first"
        );
        drop(first);
        let third = table.enter(a, 2).unwrap();
        drop((second, third));
        assert!(
            table.0.lock().unwrap().is_empty(),
            "released entries are removed"
        );
    }
}
