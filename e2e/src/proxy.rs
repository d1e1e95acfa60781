//! A TCP proxy the tests put between an agent and the gateway, to cut the network under a
//! running command the way a flaky link or a NAT timeout would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A proxy on 127.0.0.1 to `upstream`. The gateway's certificate names 127.0.0.1, so an
/// agent pointed at [`TcpProxy::url`] completes TLS with the real gateway through it.
pub struct TcpProxy {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `upstream`.
    /// Must be called inside a tokio runtime, which runs the proxy until it is dropped.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), upstream).await
    }

    /// [`TcpProxy::start`] listening on `listen` (another address of this machine, for an
    /// agent in a network namespace).
    pub async fn start_on(listen: SocketAddr, upstream: SocketAddr) -> Result<Self> {
        let first = bind(listen)?;
        let addr = first.local_addr()?;
        let (cut, rx) = watch::channel(false);
        let accepted = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(serve(first, addr, upstream, rx, accepted.clone()));
        Ok(Self {
            addr,
            cut,
            accepted,
            task,
        })
    }

    /// A proxy to a gateway URL such as `https://127.0.0.1:PORT`.
    pub async fn to_url(url: &str) -> Result<Self> {
        let hostport = url
            .split_once("://")
            .map_or(url, |(_, rest)| rest)
            .trim_end_matches('/');
        let upstream: SocketAddr = hostport
            .parse()
            .with_context(|| format!("{url} is not https://IP:PORT"))?;
        Self::start(upstream).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL to give an agent as `--gateway`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Connections accepted so far (a reconnect after a cut makes it grow).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Drops every open connection at once and refuses new ones (the port is closed, so a
    /// connect fails with "connection refused") for `duration`; then accepts again on the
    /// same port.
    pub async fn cut(&self, duration: Duration) {
        self.cut.send_replace(true);
        tokio::time::sleep(duration).await;
        self.cut.send_replace(false);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        // Open connections watch the same channel: marking the cut closes them too.
        self.cut.send_replace(true);
        self.task.abort();
    }
}

/// SO_REUSEADDR: the port is taken again after a cut while the connections it dropped
/// still sit in TIME_WAIT.
fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let s = TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.bind(addr)
        .with_context(|| format!("binding the proxy to {addr}"))?;
    Ok(s.listen(128)?)
}

async fn serve(
    first: TcpListener,
    addr: SocketAddr,
    upstream: SocketAddr,
    mut cut: watch::Receiver<bool>,
    accepted: Arc<AtomicU64>,
) {
    let mut listener = Some(first);
    loop {
        let l = match listener.take() {
            Some(l) => l,
            None => match bind(addr) {
                Ok(l) => l,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        loop {
            let for_conn = cut.clone();
            tokio::select! {
                r = l.accept() => {
                    if let Ok((down, _)) = r {
                        accepted.fetch_add(1, Ordering::SeqCst);
                        tokio::spawn(pipe(down, upstream, for_conn));
                    }
                }
                r = cut.wait_for(|c| *c) => {
                    if r.is_err() {
                        return;
                    }
                    break;
                }
            }
        }
        // Closing the listener is what makes new connections fail during the cut.
        drop(l);
        if cut.wait_for(|c| !*c).await.is_err() {
            return;
        }
    }
}

async fn pipe(mut down: TcpStream, upstream: SocketAddr, mut cut: watch::Receiver<bool>) {
    let Ok(mut up) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
        _ = cut.wait_for(|c| *c) => {}
    }
}
