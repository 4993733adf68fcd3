//! Wiring for the `agentbridge-trigger-worker` binary (and the all-in-one mode): connect the
//! transport and store, prepare topics, serve `/metrics` `/healthz` `/readyz`, run the
//! watchdog and the completion poller, consume until the cancellation token fires, drain.

use std::sync::Arc;

use agentbridge_config::Config;
use agentbridge_runtime::ops::{self, Readiness};
use agentbridge_runtime::CancellationToken;

use crate::backend::build_backends;
use crate::error::StartError;
use crate::metrics::Metrics;
use crate::poller::Poller;
use crate::watchdog::Watchdog;
use crate::worker::Worker;

/// Runs the service until `cancel` fires and the in-flight events are settled.
pub async fn run_until_stopped(config: Config, cancel: CancellationToken) -> Result<(), StartError> {
    // A configuration problem is reported before anything connects.
    check(&config)?;
    let transport = agentbridge_transport::connect(&config.transport).await?;
    let store = agentbridge_store::connect(&config.store).await?;
    run_with(config, transport, store, cancel).await
}

/// Checks what the trigger-worker builds from its configuration alone (each agent's backend:
/// base URL, credentials, client settings) without connecting to anything: the first step of
/// starting, and what `agentbridge config check` runs.
pub fn check(config: &Config) -> Result<(), StartError> {
    build_backends(config).map(drop)
}

/// Runs the service on a transport and store the caller connected; the all-in-one `dev` mode
/// passes the in-process bus and store it shares with the other services.
pub async fn run_with(
    config: Config,
    transport: Arc<dyn agentbridge_transport::Transport>,
    store: Arc<dyn agentbridge_store::Store>,
    cancel: CancellationToken,
) -> Result<(), StartError> {
    let metrics = Metrics::new()?;
    let worker = Arc::new(Worker::new(&config, transport.clone(), store.clone(), metrics.clone())?);
    worker.prepare().await?;
    let readiness = Readiness::new().ping("broker", transport.clone(), |t| async move { t.ping().await });
    let readiness = readiness.ping("store", store.clone(), |s| async move { s.ping().await });
    let addr =
        ops::serve(config.trigger_worker.listen, ops::router(metrics.registry.clone(), readiness), cancel.clone())
            .await?;
    tracing::info!(%addr, "ops server listening");
    let backends = build_backends(&config)?;
    let watchdog = Watchdog::new(&config, transport.clone(), store.clone(), metrics.clone(), backends.clone());
    let watchdog = tokio::spawn(watchdog.run(cancel.child_token()));
    // Always running: besides poll-mode agents, it takes over synchronous runs whose
    // completion could not be published at once.
    let poller = Arc::new(Poller::new(&config, transport.clone(), store.clone(), metrics.clone(), backends));
    let poller = tokio::spawn(poller.run(cancel.child_token()));
    let result = worker.run(cancel.clone()).await;
    // The worker also returns when its subscription closes: stop the watchdog and poller with it.
    cancel.cancel();
    if let Err(e) = watchdog.await {
        tracing::warn!(error = %e, "watchdog task ended abnormally");
    }
    if let Err(e) = poller.await {
        tracing::warn!(error = %e, "poller task ended abnormally");
    }
    result?;
    Ok(())
}
