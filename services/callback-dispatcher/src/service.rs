//! Wiring: one HTTP server (callback endpoint + `/metrics`, `/healthz`, `/readyz`) and the
//! validation worker, sharing one transport and one store, stopped by one cancellation token.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use agentbridge_config::Config;
use agentbridge_contracts::Topics;
use agentbridge_runtime::ops::{self, Readiness};
use agentbridge_store::{Store, StoreError};
use agentbridge_transport::{Transport, TransportError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::gate::{self, AgentGate, GateError};
use crate::metrics::Metrics;
use crate::server::{self, CallbackState};
use crate::signature::Verifier;
use crate::worker::Worker;
use crate::writeback::{self, Writeback};

/// Why the service could not start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Gate(#[from] GateError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("HTTP server: {0}")]
    Io(#[from] std::io::Error),
    #[error("worker task failed: {0}")]
    Join(String),
}

/// A running dispatcher.
pub struct Running {
    /// Where the HTTP server listens (port 0 in tests resolves here).
    pub addr: SocketAddr,
    pub metrics: Metrics,
    worker: JoinHandle<Result<(), TransportError>>,
}

impl Running {
    /// Waits for the worker to drain after the token was cancelled.
    pub async fn stopped(self) -> Result<(), StartError> {
        self.worker.await.map_err(|e| StartError::Join(e.to_string()))??;
        Ok(())
    }
}

/// What the dispatcher builds from its configuration alone.
struct Prepared {
    verifier: Verifier,
    gates: BTreeMap<String, AgentGate>,
    writebacks: BTreeMap<String, Arc<dyn Writeback>>,
}

fn prepare(config: &Config) -> Result<Prepared, StartError> {
    let d = &config.dispatcher;
    if d.secrets.is_empty() {
        return Err(StartError::Config("dispatcher.secrets: at least one callback secret is required".into()));
    }
    let verifier = Verifier::new(&d.secrets, d.tolerance).map_err(StartError::Config)?;
    let gates = gate::load_all(&config.schemas_dir, &d.rules, &d.risk)?;
    let writebacks = writeback::build_all(&d.writeback_targets, &d.allowed_hosts, d.writeback_timeout)
        .map_err(StartError::Config)?;
    Ok(Prepared { verifier, gates, writebacks })
}

/// Checks what the dispatcher builds from its configuration alone — callback secrets, output
/// schemas, rules and risk rules, write-back targets — without connecting to anything: the
/// first step of starting, and what `agentbridge config check` runs.
pub fn check(config: &Config) -> Result<(), StartError> {
    prepare(config).map(drop)
}

/// Starts the endpoint and the worker on `transport` and `store`.
pub async fn start(
    config: &Config,
    transport: Arc<dyn Transport>,
    store: Arc<dyn Store>,
    cancel: CancellationToken,
) -> Result<Running, StartError> {
    let d = &config.dispatcher;
    let Prepared { verifier, gates, writebacks } = prepare(config)?;
    let metrics = Metrics::new()?;
    let worker = Arc::new(Worker::new(config, transport.clone(), store.clone(), gates, writebacks, metrics.clone()));
    worker.prepare().await?;
    let subscription = worker.subscribe().await?;
    let state = Arc::new(CallbackState {
        verifier,
        store: store.clone(),
        publisher: transport.clone(),
        topics: Topics::new(config.transport.prefix.clone()),
        replay_ttl: d.replay_ttl,
        metrics: metrics.clone(),
    });
    let readiness = Readiness::new().ping("broker", transport.clone(), |t| async move { t.ping().await });
    let readiness = readiness.ping("store", store.clone(), |s| async move { s.ping().await });
    let router = server::router(state, &d.callback_path, d.max_body_bytes)
        .merge(ops::router(metrics.registry.clone(), readiness));
    let addr = ops::serve(d.listen, router, cancel.clone()).await?;
    tracing::info!(%addr, path = %d.callback_path, "callback endpoint listening");
    let worker = tokio::spawn(worker.run(subscription, cancel));
    Ok(Running { addr, metrics, worker })
}

/// Connects the configured transport and store, runs until `cancel` fires and the completions
/// in flight are settled.
pub async fn run_until_stopped(config: Config, cancel: CancellationToken) -> Result<(), StartError> {
    // A configuration problem is reported before anything connects (and does not wait for a
    // broker that may be down).
    check(&config)?;
    let transport = agentbridge_transport::connect(&config.transport).await?;
    let store = agentbridge_store::connect(&config.store).await?;
    let running = start(&config, transport, store, cancel.clone()).await?;
    let result = running.stopped().await;
    // The worker also returns when its subscription closes: stop the HTTP server with it.
    cancel.cancel();
    result
}
