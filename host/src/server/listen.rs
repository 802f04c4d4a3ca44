//! Accepting connections, for the API and the admin listener alike: HTTP/1 with a deadline for
//! a request's headers (which also closes keep-alive connections left idle that long, and
//! half-open ones), at most `max_connections` connections at once (more wait in the kernel's
//! backlog), and on shutdown a drain of the requests in flight bounded by a deadline, after
//! which whatever is still open is cut off and counted.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How a listener treats its connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// A request's headers must arrive within this, counted from when the connection is ready
    /// for a request (so an idle keep-alive connection is closed after it too).
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// How long a shutdown waits for the requests in flight.
    pub drain_timeout: Duration,
}

/// How a listener's shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Connections still open at the drain deadline, closed with whatever they were doing.
    pub cut_off: usize,
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains (see the module docs).
/// Handlers can read the peer's address as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<Drained> {
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            tower::ServiceExt::oneshot(app.clone(), request)
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let open = limits.max_connections.max(1) - permits.available_permits();
    if open > 0 {
        tracing::info!(connections = open, deadline_s = limits.drain_timeout.as_secs_f64(), "draining connections");
    }
    match tokio::time::timeout(limits.drain_timeout, graceful.shutdown()).await {
        Ok(()) => Ok(Drained { cut_off: 0 }),
        Err(_) => Ok(Drained { cut_off: limits.max_connections.max(1) - permits.available_permits() }),
    }
}
