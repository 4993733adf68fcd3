//! `agentbridge self-check`: exercises the transport and store the configuration points at and
//! reports each step. It checks the plumbing only; it processes no business events.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agentbridge_config::Config;
use agentbridge_contracts::{idempotency_key, DeadLetter, Envelope, Stage, Topics};
use agentbridge_metering::Ledger;
use agentbridge_store::{Claim, Rate};
use agentbridge_transport::{Message, Subscription, DLQ_GROUP};
use anyhow::{bail, Context};
use serde_json::json;

async fn next(sub: &mut Box<dyn Subscription>) -> anyhow::Result<agentbridge_transport::Delivery> {
    match tokio::time::timeout(Duration::from_secs(30), sub.next()).await {
        Ok(Some(Ok(d))) => Ok(d),
        Ok(Some(Err(e))) => Err(e).context("consume"),
        Ok(None) => bail!("subscription closed"),
        Err(_) => bail!("nothing delivered within 30 s"),
    }
}

fn step(name: &str, started: Instant) {
    println!("  ✓ {name} ({:.1} ms)", started.elapsed().as_secs_f64() * 1000.0);
}

pub async fn run(config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = Config::load(config)?;
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    // A private prefix so the check never touches real traffic.
    let topics = Topics::new(format!("{}selfcheck-{}.", config.transport.prefix, &run_id[..8]));
    let transport = agentbridge_transport::connect(&config.transport).await.context("connect transport")?;
    let store = agentbridge_store::connect(&config.store).await.context("connect store")?;
    println!("agentbridge self-check: transport={} store={}", transport.kind(), store.kind());

    let topic = topics.normalized();
    let dlq = topics.dlq("normalize");
    transport.ensure_topics(&[topic.clone(), dlq.clone()]).await.context("create topics")?;
    transport.declare_group(DLQ_GROUP, std::slice::from_ref(&dlq)).await.context("declare dlq group")?;
    let mut sub = transport.subscribe("selfcheck", std::slice::from_ref(&topic)).await.context("subscribe")?;

    let t = Instant::now();
    let key = idempotency_key("selfcheck", &run_id);
    let mut event = Envelope::new(
        format!("selfcheck-{run_id}"),
        "agentbridge/selfcheck",
        "agentbridge.selfcheck.v1",
        json!({"probe": run_id}),
    );
    event.idempotencykey = Some(key.clone());
    let bytes = event.to_vec();
    transport.publish(&topic, Message::new(Some(key.clone()), bytes.clone())).await.context("publish")?;
    let d = next(&mut sub).await?;
    if d.payload().as_ref() != bytes.as_slice() {
        bail!("delivered bytes differ from published bytes");
    }
    Envelope::from_slice(d.payload()).context("parse delivered envelope")?;
    d.ack().await.context("ack")?;
    step("publish (confirmed) → consume → parse CloudEvent → ack", t);

    let t = Instant::now();
    let bad = b"{\"this is\": not json".to_vec();
    transport.publish(&topic, Message::new(Some("bad".into()), bad.clone())).await.context("publish bad")?;
    let d = next(&mut sub).await?;
    let reason = match Envelope::from_slice(d.payload()) {
        Ok(_) => bail!("malformed probe parsed as an envelope"),
        Err(e) => e.to_string(),
    };
    d.dead_letter(&topics, Stage::Normalize, "json_malformed", &reason, "selfcheck").await.context("dead letter")?;
    let mut dl = transport.subscribe(DLQ_GROUP, &[dlq]).await.context("subscribe dlq")?;
    let d = next(&mut dl).await?;
    let record = DeadLetter::from_slice(d.payload()).context("parse dead letter")?;
    if record.original != bad {
        bail!("dead letter lost the original bytes");
    }
    d.ack().await.context("ack dead letter")?;
    step(&format!("malformed message → dlq.normalize (reason {}, original bytes kept)", record.reason), t);

    let t = Instant::now();
    let lease = Duration::from_secs(5);
    let Claim::Acquired { token, .. } = store.claim(&key, lease).await.context("claim")? else {
        bail!("a fresh key was not claimable");
    };
    if store.claim(&key, lease).await.context("second claim")? != Claim::InProgress {
        bail!("a claimed key was claimable twice");
    }
    store.commit(&key, &token, "run-selfcheck", Duration::from_secs(60)).await.context("commit")?;
    match store.claim(&key, lease).await.context("claim after commit")? {
        Claim::Done { value } if value == "run-selfcheck" => {}
        other => bail!("a committed key was not a duplicate: {other:?}"),
    }
    let decision =
        store.rate_limit(&format!("selfcheck:{run_id}"), Rate::per_second(10)).await.context("rate limit")?;
    if !decision.allowed {
        bail!("first event of a fresh rate limiter was refused");
    }
    step("claim → duplicate claim refused → commit → duplicate detected; rate limiter admits", t);

    // The metering ledger, when it is a server: a wrong password or database name shows up
    // here rather than as a crash-looping metering service. The embedded SQLite file is left
    // alone (opening it would create it in the working directory).
    let t = Instant::now();
    let url = config.metering.ledger_url.expose();
    if url.starts_with("sqlite:") {
        println!("  - metering ledger: embedded SQLite, not checked");
    } else {
        let ledger = Ledger::connect(url, 1).await.context("connect the metering ledger (metering.ledger_url)")?;
        ledger.ping().await.context("query the metering ledger")?;
        let (applied, known) = ledger.migration_status().await.context("read the ledger's migrations")?;
        ledger.close().await;
        let rest = if applied < known as i64 { "; the metering service applies the rest at start-up" } else { "" };
        step(
            &format!(
                "metering ledger ({}): reachable, {applied} of {known} migrations applied{rest}",
                ledger.backend()
            ),
            t,
        );
    }

    // Servers that work today can still break the guarantees later (Redis evicting claims at
    // its memory limit, Kafka deleting dead letters nobody replayed): a pre-deploy check should
    // fail on that, not only log it.
    let t = Instant::now();
    let (mut risks, mut unchecked) = (Vec::new(), false);
    match transport.configuration_risks().await {
        Ok(found) => risks.extend(found),
        // The broker answered every call above, so this is a refused admin request (ACLs).
        Err(e) => {
            unchecked = true;
            println!(
                "  ? {} topic settings not checked ({e}): check the dead-letter topics' retention by hand",
                transport.kind()
            );
        }
    }
    match store.configuration_risks().await {
        Ok(found) => risks.extend(found),
        // The store answered every call above, so this is a server that refuses `INFO` (a
        // managed Redis's ACLs): not a fault of the plumbing, but the operator must check by hand.
        Err(e) => {
            unchecked = true;
            println!(
                "  ? store configuration not checked ({e}): make sure Redis runs with maxmemory-policy noeviction"
            );
        }
    }
    if !risks.is_empty() {
        for risk in &risks {
            println!("  ✗ {risk}");
        }
        bail!("the servers' configuration can break agentbridge's guarantees (above)");
    }
    step(
        if unchecked {
            "server settings: no risk in what could be read"
        } else {
            "server settings: nothing agentbridge keeps can be evicted or expire early"
        },
        t,
    );
    println!("ok");
    Ok(ExitCode::SUCCESS)
}
