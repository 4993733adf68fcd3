//! The ops HTTP server: `/metrics`, `/healthz`, `/readyz`.
//!
//! `/healthz` answers 200 while the process runs (a liveness probe must not depend on a broker,
//! or a broker outage would restart every pod). `/readyz` runs the service's readiness checks
//! (broker and store reachable, consumer running) and answers 503 with the failing check's
//! name, so Kubernetes stops routing webhooks to a replica that cannot enqueue them.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::future::BoxFuture;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

type Check = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Named readiness checks.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Vec<(String, Check)>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check; `f` returns `Err(reason)` when the service is not ready.
    pub fn check<F>(mut self, name: &str, f: F) -> Self
    where
        F: Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static,
    {
        self.checks.push((name.to_string(), Arc::new(f)));
        self
    }

    /// Adds a check that is ready while `ping(handle)` succeeds: a broker, store or ledger
    /// connection shared with the service (`handle` is cloned per probe, so pass an `Arc`).
    pub fn ping<T, F, Fut, E>(self, name: &str, handle: T, ping: F) -> Self
    where
        T: Clone + Send + Sync + 'static,
        F: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        self.check(name, move || {
            let probe = ping(handle.clone());
            Box::pin(async move { probe.await.map_err(|e| e.to_string()) })
        })
    }

    /// Runs every check; the first failure as `(name, reason)`.
    pub async fn run(&self) -> Result<(), (String, String)> {
        for (name, check) in &self.checks {
            check().await.map_err(|reason| (name.clone(), reason))?;
        }
        Ok(())
    }
}

#[derive(Clone)]
struct OpsState {
    registry: Registry,
    readiness: Readiness,
}

/// The ops routes, to serve alone ([`serve`]) or merge into a service's own router.
pub fn router(registry: Registry, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(OpsState { registry, readiness })
}

async fn metrics(State(s): State<OpsState>) -> Response {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&s.registry.gather(), &mut buf) {
        Ok(()) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], buf).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn ready(State(s): State<OpsState>) -> Response {
    match s.readiness.run().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err((name, reason)) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {name}: {reason}\n")).into_response()
        }
    }
}

/// Serves `router` on `addr` until `cancel` fires; returns the bound address (port 0 allowed).
pub async fn serve(addr: SocketAddr, router: Router, cancel: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        let result =
            axum::serve(listener, router).with_graceful_shutdown(async move { cancel.cancelled().await }).await;
        if let Err(e) = result {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get_path(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let registry = Registry::new();
        let c = prometheus::IntCounter::new("agentbridge_test_events_total", "events").expect("counter");
        registry.register(Box::new(c.clone())).expect("register");
        c.inc();
        let readiness = Readiness::new()
            .check("store", || async { Ok(()) }.boxed())
            .check("broker", || async { Err("connection refused".to_string()) }.boxed());
        let cancel = CancellationToken::new();
        let addr = serve("127.0.0.1:0".parse().expect("addr"), router(registry, readiness), cancel.clone())
            .await
            .expect("serve");
        assert!(get_path(addr, "/metrics").await.contains("agentbridge_test_events_total 1"));
        assert!(get_path(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let ready = get_path(addr, "/readyz").await;
        assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
        assert!(ready.contains("not ready: broker: connection refused"), "{ready}");
        cancel.cancel();
    }

    #[tokio::test]
    async fn ping_checks_follow_their_handle() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let up = Arc::new(AtomicBool::new(true));
        let readiness = Readiness::new().ping("store", up.clone(), |up| async move {
            if up.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("connection reset")
            }
        });
        assert_eq!(readiness.run().await, Ok(()));
        up.store(false, Ordering::Relaxed);
        assert_eq!(readiness.run().await, Err(("store".to_string(), "connection reset".to_string())));
        up.store(true, Ordering::Relaxed);
        assert_eq!(readiness.run().await, Ok(()), "each probe pings again");
    }
}
