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

/// Configurations the trigger-worker runs with but that are most likely mistakes: logged at
/// start-up and printed by `agentbridge config check`, failing neither (a route may lead to an
/// agent still being set up; its dead letters can be replayed once it is).
pub fn warnings(config: &Config) -> Vec<String> {
    let triggered = |alias: &str| config.agents.get(alias).is_some_and(|a| a.run.base_url.is_some());
    if !config.agents.keys().any(|a| triggered(a)) {
        return vec![
            "no agent has agents.<alias>.run.base_url: every event will be dead-lettered as agent_unconfigured".into(),
        ];
    }
    let mut named = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        let agent = route.agent.as_str();
        if !triggered(agent) && named.insert(agent) {
            out.push(format!(
                "routes[{i}] leads to agent `{agent}`, which has no agents.{agent}.run.base_url: its events \
                 will be dead-lettered as agent_unconfigured"
            ));
        }
    }
    out
}

/// Runs the service on a transport and store the caller connected; the all-in-one `dev` mode
/// passes the in-process bus and store it shares with the other services.
pub async fn run_with(
    config: Config,
    transport: Arc<dyn agentbridge_transport::Transport>,
    store: Arc<dyn agentbridge_store::Store>,
    cancel: CancellationToken,
) -> Result<(), StartError> {
    for warning in warnings(&config) {
        tracing::warn!("{warning}");
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        Config::from_layers(yaml, Vec::<(String, String)>::new()).expect("valid config")
    }

    #[test]
    fn warns_about_routes_to_agents_it_cannot_run() {
        let none = config("agents:\n  a: {}\n");
        assert_eq!(warnings(&none).len(), 1);
        assert!(warnings(&none)[0].starts_with("no agent has agents.<alias>.run.base_url"));
        let routes = "routes:\n  - {source: s, event_types: [x.y], agent: a, business_process: p}\n  - {source: s, event_types: [x.z], agent: b, business_process: p}\n  - {source: s, event_types: [x.w], agent: b, business_process: p}\n";
        let one = config(&format!(
            "sources:\n  s: {{kind: zendesk}}\n{routes}agents:\n  a: {{run: {{base_url: http://127.0.0.1:1}}}}\n  b: {{}}\n"
        ));
        assert_eq!(
            warnings(&one),
            vec!["routes[1] leads to agent `b`, which has no agents.b.run.base_url: its events will be dead-lettered as agent_unconfigured"]
        );
    }
}
