//! Accepting connections on the gRPC and HTTP listeners: a cap on how many are open at once, a
//! deadline for each new one's first bytes, and one for a gRPC connection's first authenticated
//! call.
//!
//! Without them, sockets that connect and then say nothing (or one byte a minute) stay open
//! forever; enough of them use up the server's file descriptors, and then every agent fails
//! closed because it cannot reach its control plane. A new connection must send its first
//! [`FIRST_BYTES`] bytes (a TLS ClientHello, the HTTP/2 preface, an HTTP/1 request line) within
//! the handshake time; TLS itself must then finish within that time too (tonic's handshake
//! timeout), and an HTTP request's headers within the header time (hyper's timer).
//!
//! A gRPC connection that speaks HTTP/2 correctly can still stay idle, or call only the
//! unauthenticated services (health, reflection, enrolment), for ever, and hold a place under the
//! cap that an agent needs. So it must also make one authenticated call within the auth time
//! ([`Callers`]); after that it keeps its place for as long as it is open.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::config::Connections;

/// Bytes a new connection must send within the handshake time: the length of the HTTP/2
/// preface; a TLS ClientHello or an HTTP/1 request line is longer.
pub const FIRST_BYTES: usize = 24;

/// The two ends of a TCP connection, local first: unique among open connections (a
/// listener on several addresses can see one peer address on two of them).
pub type Ends = (SocketAddr, SocketAddr);

/// The gRPC connections that have not made an authenticated call yet, by their [`Ends`]. The
/// authentication layer vouches for a connection when a call on it passes; one that is not
/// vouched for within the auth time is closed.
#[derive(Clone, Default)]
pub struct Callers {
    waiting: Arc<Mutex<HashMap<Ends, Arc<AtomicBool>>>>,
}

impl Callers {
    /// Marks the connection `ends` as having made an authenticated call.
    pub fn vouch(&self, ends: Ends) {
        let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(flag) = waiting.get(&ends) {
            flag.store(true, Ordering::Release);
        }
    }

    fn wait_for(&self, ends: Ends) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.insert(ends, flag.clone());
        flag
    }

    fn forget(&self, ends: Ends, flag: &Arc<AtomicBool>) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        // Only its own entry: the ends may already be another connection's.
        if waiting.get(&ends).is_some_and(|f| Arc::ptr_eq(f, flag)) {
            waiting.remove(&ends);
        }
    }
}

/// A connection's wait for its first authenticated call.
struct AuthWait {
    callers: Callers,
    ends: Ends,
    vouched: Arc<AtomicBool>,
    deadline: Pin<Box<Sleep>>,
}

impl Drop for AuthWait {
    fn drop(&mut self) {
        self.callers.forget(self.ends, &self.vouched);
    }
}

/// An accepted connection: holds its place under the cap until dropped, and fails its reads
/// with `TimedOut` when its first bytes, or (gRPC) its first authenticated call, do not come in
/// time.
pub struct Guarded {
    stream: TcpStream,
    peer: SocketAddr,
    /// Bytes still owed before the deadline; 0 once they came.
    owed: usize,
    deadline: Option<Pin<Box<Sleep>>>,
    auth: Option<AuthWait>,
    _permit: OwnedSemaphorePermit,
}

impl Guarded {
    /// The address of the other end.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
}

impl Guarded {
    /// The error that closes this connection if one of its deadlines has passed. Polled on
    /// every read and write, after the I/O, so that a waker is registered whichever of them the
    /// connection waits on: a peer that never reads stalls the server's writes, and then its
    /// reads are no longer polled.
    fn overdue(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if let Some(deadline) = &mut self.deadline {
            if self.owed == 0 {
                self.deadline = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the connection's first bytes did not arrive in time",
                ));
            }
        }
        if let Some(auth) = &mut self.auth {
            if auth.vouched.load(Ordering::Acquire) {
                self.auth = None;
            } else if auth.deadline.as_mut().poll(cx).is_ready() {
                tracing::debug!(peer = %self.peer, "closing a gRPC connection that made no authenticated call in time");
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the connection made no authenticated call in time",
                ));
            }
        }
        None
    }

    /// `polled`, the result of an I/O call, unless a deadline has passed (see [`Self::overdue`]).
    fn unless_overdue<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match self.overdue(cx) {
            Some(e) => Poll::Ready(Err(e)),
            None => polled,
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) {
            let got = buf.filled().len() - before;
            this.owed = this.owed.saturating_sub(got);
        }
        this.unless_overdue(cx, polled)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.unless_overdue(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_flush(cx);
        self.unless_overdue(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.unless_overdue(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// The connections `listener` accepts, at most `max` open at once: when the cap is reached,
/// accepting waits (new peers queue in the kernel's backlog) until one closes. Accept errors
/// (out of file descriptors, a peer that reset) are logged and retried, never the end of the
/// stream: the server must go on serving.
///
/// `first_bytes` is what each connection owes within `handshake` (0: nothing); with `auth`,
/// each must also be vouched for in its [`Callers`] within its time.
pub fn accept(
    listener: TcpListener,
    max: usize,
    first_bytes: usize,
    handshake: Duration,
    auth: Option<(Callers, Duration)>,
    what: &'static str,
) -> impl Stream<Item = io::Result<Guarded>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(max.max(1)));
    futures::stream::unfold(listener, move |listener| {
        let slots = slots.clone();
        let auth = auth.clone();
        async move {
            let permit = match slots.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    tracing::warn!(
                        listener = what,
                        max,
                        "connection cap reached; new connections wait until one closes"
                    );
                    slots.acquire_owned().await.ok()?
                }
            };
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        // Small messages both ways (requests, decisions): no Nagle delay.
                        let _ = stream.set_nodelay(true);
                        let auth = match (&auth, stream.local_addr()) {
                            (Some((callers, within)), Ok(local)) => Some(AuthWait {
                                vouched: callers.wait_for((local, peer)),
                                callers: callers.clone(),
                                ends: (local, peer),
                                deadline: Box::pin(tokio::time::sleep(*within)),
                            }),
                            // A socket whose address cannot be read is closing already.
                            (Some(_), Err(e)) => {
                                tracing::debug!(peer = %peer, error = %e, "accepted a socket with no local address");
                                continue;
                            }
                            (None, _) => None,
                        };
                        let guarded = Guarded {
                            stream,
                            peer,
                            owed: first_bytes,
                            deadline: (first_bytes > 0)
                                .then(|| Box::pin(tokio::time::sleep(handshake))),
                            auth,
                            _permit: permit,
                        };
                        return Some((Ok(guarded), listener));
                    }
                    Err(e) => {
                        tracing::warn!(listener = what, error = %e, "accepting a connection failed");
                        // EMFILE and the like do not clear at once; do not spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    })
}

/// [`accept`] with the gRPC listener's settings from `[connections]`; the authentication
/// layer vouches for connections in `callers`.
pub fn grpc(
    listener: TcpListener,
    c: &Connections,
    callers: Callers,
) -> impl Stream<Item = io::Result<Guarded>> + Send + 'static {
    accept(
        listener,
        c.max_grpc_connections,
        FIRST_BYTES,
        c.handshake_timeout(),
        Some((callers, c.auth_timeout())),
        "grpc",
    )
}

/// Serves `app` over HTTP/1.1 on `listener` until `shutdown`, with `[connections]`' cap and
/// header timeout (which also closes a keep-alive connection left idle that
/// long). Each request carries the peer's address as axum's `ConnectInfo` (login throttling
/// counts failures per client). After `shutdown`, open connections finish their requests.
pub async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    c: &Connections,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    use futures::StreamExt;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;

    let mut incoming = std::pin::pin!(accept(
        listener,
        c.max_http_connections,
        // hyper's header timer runs from the moment the connection is served.
        0,
        c.header_timeout(),
        // Browsers log in over these connections; the header timer closes idle ones.
        None,
        "http",
    ));
    let header = c.header_timeout();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            conn = incoming.next() => conn,
        };
        let conn = match conn {
            Some(Ok(conn)) => conn,
            Some(Err(_)) => continue,
            // The accept stream ends only if its slots were closed: nothing more will come.
            None => break,
        };
        let peer = conn.peer();
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            app.clone().oneshot(req.map(axum::body::Body::new))
        });
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header)
                .serve_connection(TokioIo::new(conn), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(peer = %peer, error = %e, "http connection ended");
                    }
                    return;
                }
                _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
    Ok(())
}
