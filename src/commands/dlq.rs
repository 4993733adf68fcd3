//! `agentbridge dlq list|show|replay`: the dead-letter queues, read and replayed safely.
//!
//! Every service declares the operator's consumer group `dlq` on its `dlq.<stage>` topics at
//! startup, so dead letters wait there (Kafka: the log and the group's committed offsets;
//! RabbitMQ: the quorum queue `<prefix>q.dlq`) until an operator acts.
//!
//! - `list` and `show` **browse**: they read as the `dlq` group and never settle what they
//!   read, so the records stay exactly where they were (RabbitMQ requeues them in place when
//!   the CLI disconnects; on Kafka no offset is committed).
//! - `replay` re-publishes each selected record's **original bytes** (with its original key
//!   and headers, attempt counters reset, `x-agentbridge-replay-of: <dead-letter id>` added)
//!   to the topic it was consumed from, and acknowledges the dead letter only after the broker
//!   confirmed the re-publish. A crash in between replays it again on the next run: the
//!   pipeline's idempotency keys (normalizer) and dedup claims (trigger-worker) make that
//!   harmless. Records a filter skips are left in place on RabbitMQ; on Kafka, where a group's
//!   position cannot step over a record, they are re-appended to their dead-letter topic (same
//!   record id) before the position moves past them, so nothing is lost and the replayed
//!   records are not read again.
//! - Two kinds of dead letter replay as a new run, because replaying their original would
//!   change nothing: a timed-out run (`dlq.trigger`, `callback_timeout`) reopens its dedup
//!   claim first, and a failed run (`dlq.validate`: `run_failed`, `run_failed_transient`,
//!   `tool_unavailable`, `attempts_exhausted`) re-publishes the normalized event kept in its run
//!   state to `normalized` as the next re-run (`<event id>.rerun-<n>`); once the run state has
//!   expired it is left in the queue, with the reason printed.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use agentbridge_callback_dispatcher::worker::reason::{
    ATTEMPTS_EXHAUSTED, RUN_FAILED, RUN_FAILED_TRANSIENT, TOOL_UNAVAILABLE,
};
use agentbridge_config::{parse_duration, Config, TransportKind};
use agentbridge_contracts::{trigger_claim_key, Completion, DeadLetter, Envelope, Stage, Topics};
use agentbridge_store::{Reopen, Store};
use agentbridge_transport::{
    Delivery, Message, Subscription, Transport, DLQ_GROUP, HEADER_ATTEMPT, HEADER_REDELIVERIES, HEADER_REPLAY_OF,
};
use agentbridge_trigger_worker::error::reason::CALLBACK_TIMEOUT;
use anyhow::{bail, Context};
use clap::{Args, Subcommand};

const STAGES: [Stage; 6] = Stage::ALL;

#[derive(Args, Clone)]
pub struct Filter {
    /// Only these stages (normalize, trigger, validate, writeback, meter, transport); repeatable.
    #[arg(long = "stage", value_parser = parse_stage)]
    stages: Vec<Stage>,
    /// Only this reason code (e.g. `schema_invalid`, `attempts_exhausted`).
    #[arg(long)]
    reason: Option<String>,
    /// Only records whose original topic is this one (with or without the prefix).
    #[arg(long)]
    topic: Option<String>,
    /// Only these dead-letter ids; repeatable.
    #[arg(long = "id")]
    ids: Vec<String>,
    /// Stop after this many matching records.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Stop reading once the queue has been quiet this long (the first message on Kafka may
    /// take longer: a group join is waited for up to 30 s).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    wait: Duration,
}

#[derive(Subcommand)]
pub enum DlqCommand {
    /// Lists dead letters without removing them.
    List {
        #[command(flatten)]
        filter: Filter,
        /// table or json (one record per line, original bytes base64).
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Prints one dead letter in full, with its original message decoded.
    Show {
        id: String,
        #[arg(long, default_value = "3s", value_parser = parse_duration)]
        wait: Duration,
    },
    /// Re-publishes the selected dead letters' original bytes to their original topics.
    Replay {
        #[command(flatten)]
        filter: Filter,
        /// Print what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn parse_stage(s: &str) -> Result<Stage, String> {
    STAGES
        .into_iter()
        .find(|st| st.as_str() == s)
        .ok_or_else(|| format!("unknown stage `{s}` (normalize, trigger, validate, writeback, meter, transport)"))
}

impl Filter {
    fn matches(&self, topics: &Topics, dl: &DeadLetter) -> bool {
        (self.stages.is_empty() || self.stages.contains(&dl.stage))
            && self.reason.as_deref().is_none_or(|r| r == dl.reason)
            && self.topic.as_deref().is_none_or(|t| {
                t == dl.origin.topic || topics.strip(&dl.origin.topic).is_some_and(|stripped| stripped == t)
            })
            && (self.ids.is_empty() || self.ids.iter().any(|id| id == &dl.id))
    }

    fn all(wait: Duration) -> Self {
        Filter { stages: vec![], reason: None, topic: None, ids: vec![], limit: usize::MAX, wait }
    }
}

/// What one pass over the dead-letter queue saw. Holds the subscription and the browsed
/// deliveries unsettled until it is dropped: acks of matched deliveries must happen while the
/// subscription is still open, and browsed ones go back only when it closes.
struct Pass {
    matched: Vec<(DeadLetter, Option<Delivery>)>,
    unreadable: usize,
    skipped: usize,
    _browsed: Vec<Delivery>,
    _sub: Box<dyn Subscription>,
}

/// Reads the `dlq` group until `limit` records matched or the queue is quiet. `settle_skipped`
/// (replay on Kafka) re-appends non-matching records and acks them; otherwise deliveries not
/// returned are dropped unsettled, which gives them back.
async fn read(
    transport: &dyn Transport,
    topics: &Topics,
    filter: &Filter,
    keep_deliveries: bool,
    settle_skipped: bool,
) -> anyhow::Result<Pass> {
    let dlq_topics: Vec<String> = STAGES.iter().map(|s| topics.dlq(s.as_str())).collect();
    transport.declare_group(DLQ_GROUP, &dlq_topics).await.context("declare the dlq group")?;
    let mut sub: Box<dyn Subscription> = transport.subscribe(DLQ_GROUP, &dlq_topics).await.context("subscribe")?;
    let first_wait = if transport.kind() == "kafka" { filter.wait.max(Duration::from_secs(30)) } else { filter.wait };
    let mut matched = Vec::new();
    let (mut unreadable, mut skipped) = (0, 0);
    let mut seen = HashSet::new();
    // Held unsettled until the pass is dropped, so the broker does not hand them out again.
    let mut browsed: Vec<Delivery> = Vec::new();
    let mut got_any = false;
    while matched.len() < filter.limit {
        let wait = if got_any { filter.wait } else { first_wait };
        let d = match tokio::time::timeout(wait, sub.next()).await {
            Ok(Some(Ok(d))) => d,
            Ok(Some(Err(e))) => bail!("reading the dead-letter queue: {e}"),
            Ok(None) | Err(_) => break,
        };
        got_any = true;
        let Ok(dl) = DeadLetter::from_slice(d.payload()) else {
            unreadable += 1;
            if settle_skipped {
                reappend(transport, d).await?;
            } else {
                browsed.push(d);
            }
            continue;
        };
        // A record seen twice was re-appended by this very pass (Kafka): the queue has cycled.
        if !seen.insert(dl.id.clone()) {
            browsed.push(d);
            break;
        }
        if filter.matches(topics, &dl) {
            if keep_deliveries {
                matched.push((dl, Some(d)));
            } else {
                matched.push((dl, None));
                browsed.push(d);
            }
        } else {
            skipped += 1;
            if settle_skipped {
                reappend(transport, d).await?;
            } else {
                browsed.push(d);
            }
        }
    }
    Ok(Pass { matched, unreadable, skipped, _browsed: browsed, _sub: sub })
}

/// Leaves a selected record in its dead-letter queue. RabbitMQ puts it back in place when the
/// CLI disconnects without acknowledging it; on Kafka, where an unacknowledged record would
/// hold the group's position (and the records replayed after it would be read again), it is
/// re-appended like a record the filter skipped.
async fn leave(transport: &dyn Transport, kafka: bool, delivery: Option<Delivery>) -> anyhow::Result<()> {
    match delivery {
        Some(d) if kafka => reappend(transport, d).await,
        _ => Ok(()),
    }
}

/// Moves a record to the back of its dead-letter topic: publish (confirmed), then ack.
async fn reappend(transport: &dyn Transport, d: Delivery) -> anyhow::Result<()> {
    let topic = d.topic().to_string();
    let mut m = Message::new(d.key().map(str::to_string), d.payload().clone());
    m.headers = d.data.headers.clone();
    transport.publish(&topic, m).await.with_context(|| format!("re-append a skipped dead letter to {topic}"))?;
    d.ack().await?;
    Ok(())
}

/// Makes the replay of a timed-out run start a new run. The trigger-worker committed the event's
/// dedup claim to the run that timed out, so a plain replay would be acknowledged as a
/// duplicate; reopening the claim, as the callback-dispatcher does for a re-run, makes the
/// replay claim re-run `n` and trigger it under `<key>.rerun-<n>` (a new platform run). An
/// operator's re-runs are not bounded by `dispatcher.rerun.max_reruns`: each is a deliberate
/// decision.
async fn reopen_timed_out(store: &dyn Store, dl: &DeadLetter, ttl: Duration) -> anyhow::Result<()> {
    let (Some(key), Some(run_id)) = (dl.origin.key.as_deref(), dl.headers.get("run_id")) else {
        eprintln!("{}: no idempotency key or run id recorded; replayed as is", dl.id);
        return Ok(());
    };
    let outcome = store
        .reopen(&trigger_claim_key(key), run_id, u32::MAX, ttl)
        .await
        .with_context(|| format!("reopen the dedup claim of {} for a re-run", dl.id))?;
    match outcome {
        Reopen::Reopened { rerun } | Reopen::AlreadyReopened { rerun } => {
            println!("{}: claim of run {run_id} reopened: the replay starts re-run {rerun}", dl.id)
        }
        Reopen::InProgress => println!("{}: the event is being triggered again already", dl.id),
        Reopen::NotCommitted => {
            println!("{}: the claim no longer records run {run_id}; replayed as a new event", dl.id)
        }
        Reopen::Exhausted { reruns } => bail!("{}: {reruns} re-runs already: the re-run record is full", dl.id),
    }
    Ok(())
}

/// Dead letters of runs that failed (`dlq.validate`). Their original is the failed run's
/// completion: replaying it would only judge the same failure again, so their replay re-runs
/// the business event instead ([`failed_run_rerun`]).
const FAILED_RUN_REASONS: [&str; 4] = [RUN_FAILED, RUN_FAILED_TRANSIENT, TOOL_UNAVAILABLE, ATTEMPTS_EXHAUSTED];

/// The replay of a failed run: the normalized event it was triggered from (kept in the run
/// state) as the next re-run of its business event, to publish to `normalized`, after reopening
/// the trigger-worker's claim as the callback-dispatcher does for its bounded re-runs (an
/// operator's re-runs are not bounded). `None` when it cannot be re-run (said why): the run
/// state expired (kept for `trigger_worker.dedup_ttl`), a later run holds the claim, or the
/// original is not a completion.
async fn failed_run_rerun(
    store: &dyn Store,
    topics: &Topics,
    dl: &DeadLetter,
    ttl: Duration,
) -> anyhow::Result<Option<(String, Message)>> {
    let run_id = Envelope::from_slice(&dl.original)
        .ok()
        .and_then(|e| serde_json::from_value::<Completion>(e.data).ok())
        .map(|c| c.id);
    let Some(run_id) = run_id else {
        // One unreadable record must not stop the replay of the others.
        eprintln!("{}: the original is not a run completion; left in the dead-letter queue", dl.id);
        return Ok(None);
    };
    let state = store.get_run(&run_id).await.with_context(|| format!("read the run state of {run_id}"))?;
    let Some(state) = state.and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok()) else {
        eprintln!(
            "{}: the state of run {run_id}, with the event to re-run, has expired; left in the dead-letter queue (re-send the event from its source)",
            dl.id
        );
        return Ok(None);
    };
    let event = state["event"].as_str().and_then(|e| Envelope::from_slice(e.as_bytes()).ok());
    let (Some(event), Some(key)) = (event, state["idempotency_key"].as_str()) else {
        eprintln!("{}: the state of run {run_id} holds no event to re-run; left in the dead-letter queue", dl.id);
        return Ok(None);
    };
    let outcome = store
        .reopen(&trigger_claim_key(key), &run_id, u32::MAX, ttl)
        .await
        .with_context(|| format!("reopen the dedup claim of {} for a re-run", dl.id))?;
    let rerun = match outcome {
        Reopen::Reopened { rerun } | Reopen::AlreadyReopened { rerun } => rerun,
        Reopen::InProgress => {
            eprintln!("{}: the event is being triggered again already; left in the dead-letter queue", dl.id);
            return Ok(None);
        }
        Reopen::NotCommitted => {
            eprintln!(
                "{}: the dedup claim no longer records run {run_id} (a later run, or it expired); left in the dead-letter queue",
                dl.id
            );
            return Ok(None);
        }
        Reopen::Exhausted { reruns } => bail!("{}: {reruns} re-runs already: the re-run record is full", dl.id),
    };
    println!("{}: run {run_id} failed; its event is re-run {rerun}", dl.id);
    let mut message = Message::new(Some(key.to_string()), event.into_rerun(rerun).to_vec());
    message.headers.insert(HEADER_REPLAY_OF.into(), dl.id.clone());
    Ok(Some((topics.normalized(), message)))
}

/// The original message a replay publishes: the original key, the original headers minus the
/// transport's attempt bookkeeping (a replay starts afresh), plus where it came from.
pub fn replay_message(dl: &DeadLetter) -> Message {
    let mut headers: BTreeMap<String, String> = dl.headers.clone();
    headers.remove(HEADER_ATTEMPT);
    headers.remove(HEADER_REDELIVERIES);
    headers
        .retain(|k, _| !k.starts_with("x-death") && !k.starts_with("x-first-death") && !k.starts_with("x-last-death"));
    headers.insert(HEADER_REPLAY_OF.into(), dl.id.clone());
    let mut m = Message::new(dl.origin.key.clone(), dl.original.clone());
    m.headers = headers;
    m
}

fn excerpt(s: &str, n: usize) -> String {
    let line = s.lines().next().unwrap_or("");
    if line.chars().count() > n {
        format!("{}…", line.chars().take(n).collect::<String>())
    } else {
        line.to_string()
    }
}

fn print_table(topics: &Topics, records: &[&DeadLetter]) {
    println!(
        "{:<36}  {:<9}  {:<22}  {:>3}  {:<20}  {:<20}  detail",
        "id", "stage", "reason", "att", "original topic", "last failure"
    );
    for dl in records {
        println!(
            "{:<36}  {:<9}  {:<22}  {:>3}  {:<20}  {:<20}  {}",
            dl.id,
            dl.stage.as_str(),
            dl.reason,
            dl.attempts,
            topics.strip(&dl.origin.topic).unwrap_or(&dl.origin.topic),
            dl.last_failure_at.format("%Y-%m-%d %H:%M:%S"),
            excerpt(&dl.detail, 60)
        );
    }
}

pub async fn run(config: Option<&Path>, command: DlqCommand) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(config)?;
    if config.transport.kind == TransportKind::Memory {
        bail!("the memory transport lives inside one process; dead letters of a deployment are on kafka or rabbitmq (set transport.kind)");
    }
    // A browse holds what it read unsettled: let the broker hand out as many as asked for.
    let limit = match &command {
        DlqCommand::List { filter, .. } | DlqCommand::Replay { filter, .. } => filter.limit,
        DlqCommand::Show { .. } => 10_000,
    };
    let window = limit.saturating_add(16).min(u16::MAX as usize);
    config.transport.prefetch = config.transport.prefetch.max(window as u16);
    config.transport.kafka.read_ahead = config.transport.kafka.read_ahead.max(window);
    let transport = agentbridge_transport::connect(&config.transport).await.context("connect the transport")?;
    let topics = Topics::new(config.transport.prefix.clone());
    match command {
        DlqCommand::List { filter, format } => {
            let pass = read(transport.as_ref(), &topics, &filter, false, false).await?;
            let records: Vec<&DeadLetter> = pass.matched.iter().map(|(dl, _)| dl).collect();
            match format.as_str() {
                "json" => {
                    for dl in &records {
                        println!("{}", String::from_utf8_lossy(&dl.to_vec()));
                    }
                }
                "table" => {
                    print_table(&topics, &records);
                    println!("\n{} matching, {} other, {} unreadable", records.len(), pass.skipped, pass.unreadable);
                }
                other => bail!("unknown format `{other}` (table or json)"),
            }
        }
        DlqCommand::Show { id, wait } => {
            let mut filter = Filter::all(wait);
            filter.ids = vec![id.clone()];
            filter.limit = 1;
            let pass = read(transport.as_ref(), &topics, &filter, false, false).await?;
            let Some((dl, _)) = pass.matched.first() else {
                eprintln!("no dead letter `{id}` in the dlq group ({} others read)", pass.skipped);
                return Ok(ExitCode::from(3));
            };
            let mut view = serde_json::to_value(dl)?;
            let original = serde_json::from_slice::<serde_json::Value>(&dl.original)
                .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&dl.original).into_owned()));
            view["original"] = original;
            println!("{}", serde_json::to_string_pretty(&view)?);
        }
        DlqCommand::Replay { filter, dry_run } => {
            if filter.stages.is_empty() && filter.reason.is_none() && filter.ids.is_empty() && filter.topic.is_none() {
                bail!("replay needs a selection: --stage, --reason, --topic or --id (replaying everything at once is rarely what anyone wants)");
            }
            let kafka = transport.kind() == "kafka";
            let pass = read(transport.as_ref(), &topics, &filter, !dry_run, !dry_run && kafka).await?;
            if dry_run {
                let records: Vec<&DeadLetter> = pass.matched.iter().map(|(dl, _)| dl).collect();
                print_table(&topics, &records);
                println!("\ndry run: {} would be replayed; nothing changed", records.len());
                return Ok(ExitCode::SUCCESS);
            }
            let (mut replayed, mut left) = (0usize, 0usize);
            let mut store: Option<Arc<dyn Store>> = None;
            for (dl, delivery) in pass.matched {
                if dl.origin.topic.is_empty() {
                    eprintln!("{}: no original topic recorded; left in the dead-letter queue", dl.id);
                    leave(transport.as_ref(), kafka, delivery).await?;
                    left += 1;
                    continue;
                }
                let timed_out = dl.stage == Stage::Trigger && dl.reason == CALLBACK_TIMEOUT;
                let failed_run = dl.stage == Stage::Validate && FAILED_RUN_REASONS.contains(&dl.reason.as_str());
                if (timed_out || failed_run) && store.is_none() {
                    store = Some(agentbridge_store::connect(&config.store).await.context("connect the store")?);
                }
                let (topic, message) = match store.as_deref() {
                    Some(store) if timed_out => {
                        reopen_timed_out(store, &dl, config.trigger_worker.dedup_ttl).await?;
                        (dl.origin.topic.clone(), replay_message(&dl))
                    }
                    Some(store) if failed_run => {
                        match failed_run_rerun(store, &topics, &dl, config.trigger_worker.dedup_ttl).await? {
                            Some(rerun) => rerun,
                            None => {
                                leave(transport.as_ref(), kafka, delivery).await?;
                                left += 1;
                                continue;
                            }
                        }
                    }
                    _ => (dl.origin.topic.clone(), replay_message(&dl)),
                };
                transport.publish(&topic, message).await.with_context(|| format!("replay {} to {topic}", dl.id))?;
                if let Some(d) = delivery {
                    d.ack().await.with_context(|| format!("acknowledge dead letter {}", dl.id))?;
                }
                println!("replayed {} ({} {}) → {topic}", dl.id, dl.stage.as_str(), dl.reason);
                replayed += 1;
            }
            println!("\n{replayed} replayed, {} left in the dead-letter queue", pass.skipped + pass.unreadable + left);
        }
    }
    Ok(ExitCode::SUCCESS)
}
