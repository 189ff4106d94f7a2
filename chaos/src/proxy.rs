//! A TCP fault proxy for one direction of one node pair: node A dials it to reach node B. It can
//! black-hole the link (new connections are held without being forwarded, live ones are cut) or
//! delay every chunk. A partition is a set of blocked links; a one-way partition blocks one.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkState {
    pub blocked: bool,
    pub delay_ms: u64,
    /// Chance, in thousandths, that forwarding a chunk instead drops the connection.
    pub drop_permille: u16,
}

/// Handle to change a link while it runs.
#[derive(Clone)]
pub struct Link {
    tx: watch::Sender<LinkState>,
}

impl Link {
    pub fn set(&self, f: impl FnOnce(&mut LinkState)) {
        self.tx.send_modify(f);
    }

    pub fn state(&self) -> LinkState {
        *self.tx.borrow()
    }
}

/// Starts a proxy on 127.0.0.1 (an ephemeral port) towards `target`.
pub async fn start(
    target: SocketAddr,
) -> std::io::Result<(SocketAddr, Link, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = watch::channel(LinkState::default());
    let task = tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let _ = inbound.set_nodelay(true);
            tokio::spawn(serve(inbound, target, rx.clone()));
        }
    });
    Ok((addr, Link { tx }, task))
}

async fn serve(inbound: TcpStream, target: SocketAddr, mut rx: watch::Receiver<LinkState>) {
    if rx.borrow().blocked {
        // Black hole: hold the connection unanswered while the link is down, then drop it.
        let _ = rx.wait_for(|s| !s.blocked).await;
        return;
    }
    let Ok(outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = outbound.set_nodelay(true);
    let (ri, wi) = inbound.into_split();
    let (ro, wo) = outbound.into_split();
    tokio::select! {
        _ = pump(ri, wo, rx.clone()) => {}
        _ = pump(ro, wi, rx.clone()) => {}
        _ = async { let _ = rx.wait_for(|s| s.blocked).await; } => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    rx: watch::Receiver<LinkState>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let state = *rx.borrow();
        if state.blocked
            || (state.drop_permille > 0 && rand::random::<u16>() % 1000 < state.drop_permille)
        {
            return;
        }
        if state.delay_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(state.delay_ms)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
