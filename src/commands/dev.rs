//! `agentbridge dev`: the whole pipeline in one process on the embedded default — what
//! `make run` shows. Every service runs for real (normalizer, trigger-worker,
//! callback-dispatcher, metering) on one in-memory bus and store; the agent simulator plays
//! the agent platform (signed Standard Webhooks callbacks over loopback HTTP) and a local
//! capture server stands in for Zendesk, ServiceNow and Coupa. The sample raw events are
//! published to `raw.<source>` as a connector would, and each one is followed to its outcome.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentbridge_config::Config;
use agentbridge_contracts::{DeadLetter, Envelope, RunEvent, RunStage, Topics};
use agentbridge_runtime::CancellationToken;
use agentbridge_store::Store;
use agentbridge_transport::{Message, Transport};
use anyhow::{bail, Context};
use axum::extract::{Request, State};
use axum::Router;
use serde_json::Value;

type Captured = Arc<Mutex<Vec<(String, String, String)>>>;

/// Reads the watched topics until `t` reaches a final outcome (written back, a review item or a
/// dead letter) and the lifecycle events right after it are in, or 15 s pass. A result is not
/// final by itself: its write-back runs after it is published, so the trail waits for the
/// `written_back` (or `dead_lettered`) lifecycle event, up to 3 s after the result.
async fn follow(
    observer: &mut Box<dyn agentbridge_transport::Subscription>,
    topics: &Topics,
    t: &mut Trail,
    started: Instant,
) -> anyhow::Result<()> {
    let mut deadline = started + Duration::from_secs(15);
    let mut settled = false;
    let mut result_at: Option<Instant> = None;
    while Instant::now() < deadline {
        if result_at.is_some_and(|at| at.elapsed() > Duration::from_secs(3)) {
            t.done = true;
        }
        if t.done && !settled {
            // The outcome is known; the lifecycle events that follow it (written_back, usage)
            // arrive within moments.
            settled = true;
            deadline = Instant::now() + Duration::from_millis(300);
        }
        let d = match tokio::time::timeout(Duration::from_millis(300), observer.next()).await {
            Ok(Some(Ok(d))) => d,
            Ok(Some(Err(e))) => bail!("observer: {e}"),
            Ok(None) => break,
            Err(_) => continue,
        };
        let topic = topics.strip(d.topic()).unwrap_or(d.topic()).to_string();
        let at = format!("{:>5.0} ms", started.elapsed().as_secs_f64() * 1000.0);
        if let Some(stage) = topic.strip_prefix("dlq.") {
            if let Ok(dl) = DeadLetter::from_slice(d.payload()) {
                t.steps.push(format!("{at}  dead letter dlq.{stage}: {} — {}", dl.reason, first_line(&dl.detail)));
                t.done = true;
            }
        } else if let Ok(e) = Envelope::from_slice(d.payload()) {
            match topic.as_str() {
                "normalized" => {
                    t.key = e.idempotencykey.clone();
                    t.steps.push(format!(
                        "{at}  normalized → agent {} v{} ({}, {}, key {}…)",
                        e.agent.as_deref().unwrap_or("?"),
                        e.agentversion.as_deref().unwrap_or("?"),
                        e.businessprocess.as_deref().unwrap_or("?"),
                        e.subject.as_deref().unwrap_or("?"),
                        e.idempotencykey.as_deref().map(|k| &k[..12.min(k.len())]).unwrap_or("?")
                    ));
                }
                "runs" => {
                    if let Ok(ev) = serde_json::from_value::<RunEvent>(e.data.clone()) {
                        let extra = ev.reason.or(ev.run_id.map(|r| format!("run {r}"))).unwrap_or_default();
                        t.steps.push(format!("{at}  {} {extra}", ev.stage.as_str()).trim_end().to_string());
                        if matches!(ev.stage, RunStage::WrittenBack | RunStage::DeadLettered | RunStage::Review) {
                            t.done = true;
                        }
                    }
                }
                "usage" => {
                    let u = &e.data;
                    t.steps.push(format!(
                        "{at}  usage: {} input + {} output tokens ({})",
                        u["input_tokens"],
                        u["output_tokens"],
                        u["model"].as_str().unwrap_or("?")
                    ));
                }
                "review" => {
                    t.steps.push(format!("{at}  → review queue: {}", summary(&e.data)));
                    t.done = true;
                }
                other if other.starts_with("results.") => {
                    t.steps.push(format!("{at}  → {other}: {}", summary(&e.data)));
                    result_at = Some(Instant::now());
                }
                _ => {}
            }
        }
        d.ack().await?;
    }
    Ok(())
}

/// Records every request; answers 200 with an empty JSON object, like a vendor API that
/// accepted the update.
async fn capture_server(cancel: CancellationToken) -> anyhow::Result<(SocketAddr, Captured)> {
    let captured: Captured = Arc::default();
    let app = Router::new().fallback(|State(c): State<Captured>, req: Request| async move {
        let (parts, body) = req.into_parts();
        let body = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
        if let Ok(mut c) = c.lock() {
            c.push((
                parts.method.to_string(),
                parts.uri.path().to_string(),
                String::from_utf8_lossy(&body).into_owned(),
            ));
        }
        axum::Json(serde_json::json!({}))
    });
    let addr = agentbridge_runtime::ops::serve("127.0.0.1:0".parse()?, app.with_state(captured.clone()), cancel)
        .await
        .context("bind the capture server")?;
    Ok((addr, captured))
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(l.local_addr()?)
}

/// One sample event and what happened to it.
struct Trail {
    file: String,
    source: String,
    key: Option<String>,
    steps: Vec<String>,
    done: bool,
}

pub async fn run(config: Option<&Path>, samples: &Path) -> anyhow::Result<ExitCode> {
    let path = config.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("deploy/dev.yaml"));
    let mut config = Config::load(Some(&path)).with_context(|| format!("load {}", path.display()))?;
    agentbridge_runtime::telemetry::init(&config.telemetry);
    std::fs::create_dir_all(".run").context("create .run/")?;
    let _ = std::fs::remove_file(".run/dev-ledger.db");
    let cancel = CancellationToken::new();

    // Loopback stand-ins for the outside world.
    let (capture, captured) = capture_server(cancel.clone()).await?;
    let dispatcher = free_port()?;
    config.dispatcher.listen = dispatcher;
    config.trigger_worker.callback_url = format!("http://{dispatcher}{}", config.dispatcher.callback_path);
    let secret = config.dispatcher.secrets.first().map(|s| s.expose().to_string()).unwrap_or_default();
    let signing = agentbridge_trigger_worker::simulator::Signing::StandardWebhooks { secret };
    let simulator = agentbridge_trigger_worker::simulator::Simulator::start(
        "127.0.0.1:0".parse()?,
        agentbridge_trigger_worker::simulator::SimulatorConfig { signing, ..Default::default() },
        cancel.clone(),
    )
    .await
    .context("start the agent simulator")?;
    for agent in config.agents.values_mut() {
        agent.run.base_url = Some(simulator.base_url());
    }
    for target in config.dispatcher.writeback_targets.values_mut() {
        target.base_url = format!("http://{capture}");
    }

    // One bus and one store shared by every service, as the brokers and Redis would be.
    let transport: Arc<dyn Transport> =
        Arc::new(agentbridge_transport::memory::MemoryTransport::new(&config.transport));
    let store: Arc<dyn Store> = Arc::new(agentbridge_store::memory::MemoryStore::new());
    let topics = Topics::new(config.transport.prefix.clone());

    // The observer joins before anything is published, so it sees every message.
    let processes: Vec<String> = config.routes.iter().map(|r| r.business_process.clone()).collect();
    let mut watch = vec![topics.normalized(), topics.runs(), topics.review(), topics.usage()];
    watch.extend(["normalize", "trigger", "validate", "writeback", "meter"].map(|s| topics.dlq(s)));
    watch.extend(processes.iter().map(|p| topics.results(p)));
    let mut observer = transport.subscribe("dev-observer", &watch).await?;

    let running =
        agentbridge_callback_dispatcher::service::start(&config, transport.clone(), store.clone(), cancel.clone())
            .await
            .context("start the callback-dispatcher")?;
    let trigger = tokio::spawn(agentbridge_trigger_worker::service::run_with(
        config.clone(),
        transport.clone(),
        store.clone(),
        cancel.clone(),
    ));
    let m = &config.metering;
    let ledger =
        agentbridge_metering::Ledger::open_bounded(m.ledger_url.expose(), m.max_connections, Some(m.statement_timeout))
            .await
            .context("open the ledger")?;
    let metering = agentbridge_metering::Metering::new(
        config.metering.clone(),
        ledger.clone(),
        store.clone(),
        transport.clone(),
        topics.clone(),
        &agentbridge_runtime::prometheus::Registry::new(),
    )?;
    let metering_task = {
        let cancel = cancel.clone();
        tokio::spawn(async move { metering.run(cancel).await })
    };
    let normalizer =
        agentbridge_normalizer::service::Normalizer::build(config.clone(), transport.clone(), store.clone())?
            .start(cancel.clone())
            .await
            .context("start the normalizer")?;

    println!("agentbridge dev — every service in one process on the embedded in-memory bus and store");
    println!("  normalizer           http://{}  (POST /ingest/<source>, /metrics)", normalizer.http_addr);
    println!("  callback-dispatcher  http://{}{}", running.addr, config.dispatcher.callback_path);
    println!("  agent simulator      {}  (signed Standard Webhooks callbacks)", simulator.base_url());
    println!("  vendor APIs (fake)   http://{capture}  (Zendesk, ServiceNow, Coupa write-back)");
    println!("  ledger               {}", config.metering.ledger_url.expose());
    println!();

    // Publish the samples one at a time, as a connector would, and follow each to its outcome
    // (one at a time so every message on the watched topics belongs to the current sample).
    let mut files: Vec<PathBuf> = std::fs::read_dir(samples)
        .with_context(|| format!("read {}", samples.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut trails = Vec::new();
    for f in &files {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let source = name.split('-').next().unwrap_or_default().to_string();
        if !config.sources.contains_key(&source) {
            continue;
        }
        let bytes = std::fs::read(f)?;
        let mut t = Trail { file: name, source, key: None, steps: Vec::new(), done: false };
        let started = Instant::now();
        transport.publish(&topics.raw(&t.source), Message::new(None, bytes)).await?;
        follow(&mut observer, &topics, &mut t, started).await?;
        trails.push(t);
    }

    // Late stragglers (usage after the result) are not waited for: a moment for the ledger.
    tokio::time::sleep(Duration::from_millis(500)).await;

    for t in &trails {
        println!("\n{} ({})", t.file, t.source);
        for s in &t.steps {
            println!("  {s}");
        }
        if !t.done {
            println!("  (no final outcome within 30 s)");
        }
    }
    let calls = captured.lock().map(|c| c.clone()).unwrap_or_default();
    println!("\nwrite-backs received by the fake vendor APIs: {}", calls.len());
    for (method, path, body) in &calls {
        let body: String = body.chars().take(160).collect();
        println!("  {method} {path}  {body}");
    }
    let period = chrono::Utc::now().format("%Y-%m").to_string();
    match agentbridge_metering::report::chargeback(&ledger, &period, agentbridge_metering::Dimension::CostCenter).await
    {
        Ok(c) => {
            println!("\nchargeback {period} by cost center (from the ledger):");
            print!(
                "{}",
                agentbridge_metering::report::render_chargeback(&c, agentbridge_metering::report::Format::Table)
            );
        }
        Err(e) => println!("\nchargeback report failed: {e}"),
    }
    let stats = simulator.stats();
    println!("\nagent simulator: {} trigger requests, {} runs", stats.requests_total, stats.runs_total);

    cancel.cancel();
    let _ = normalizer.stopped().await;
    let _ = running.stopped().await;
    let _ = trigger.await;
    let _ = metering_task.await;
    ledger.close().await;
    let unfinished = trails.iter().filter(|t| !t.done).count();
    if unfinished > 0 {
        println!("\n{unfinished} sample(s) without a final outcome");
        return Ok(ExitCode::FAILURE);
    }
    println!("\nall {} samples reached an outcome", trails.len());
    Ok(ExitCode::SUCCESS)
}

fn first_line(s: &str) -> &str {
    let line = s.lines().next().unwrap_or_default();
    &line[..line.len().min(line.char_indices().nth(140).map_or(line.len(), |(i, _)| i))]
}

fn summary(data: &Value) -> String {
    let out = data.get("output").unwrap_or(data);
    let pick = |k: &str| out.get(k).and_then(Value::as_str).map(|v| format!("{k}={v}"));
    let mut parts: Vec<String> =
        ["severity", "recommended_queue", "decision", "risk_level"].iter().filter_map(|k| pick(k)).collect();
    if let Some(d) = data.get("decision").and_then(Value::as_str) {
        parts.push(format!("gate={d}"));
    }
    if let Some(r) = data.get("reason").and_then(Value::as_str) {
        parts.push(format!("reason={r}"));
    }
    parts.join(", ")
}
