//! RabbitMQ only: a confirmed publish survives a broker restart, and the transport reconnects
//! on its own (the publisher lazily, a subscription on its next `next()`).
//!
//! Restarts the RabbitMQ application of the local node with `rabbitmqctl stop_app` /
//! `start_app`, so it disturbs anything else using that broker meanwhile; it is skipped (with a
//! message) when `rabbitmqctl` cannot reach a node, e.g. when `AGENTBRIDGE_TEST_AMQP_URL` points
//! at a remote broker.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use agentbridge_transport::{Delivery, Message, Subscription, Transport};
use common::{backend_transport, unique_prefix, Backend};
use tokio::time::Instant;

/// Runs `rabbitmqctl <args>` off the async threads; `Err` carries its output.
async fn rabbitmqctl(args: &[&str]) -> Result<(), String> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new("rabbitmqctl").args(&args).output().map_err(|e| format!("rabbitmqctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "rabbitmqctl {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    })
    .await
    .map_err(|e| format!("rabbitmqctl task: {e}"))?
}

/// Stops and starts the RabbitMQ application, and waits until it has booted.
async fn restart_broker() {
    rabbitmqctl(&["stop_app"]).await.expect("stop_app");
    // start_app can lose a race with the node still shutting down its apps; try a few times.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match rabbitmqctl(&["start_app"]).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("start_app not yet: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    rabbitmqctl(&["await_startup", "--timeout", "120"]).await.expect("await_startup");
}

/// Publishes until the broker confirms: right after a restart the transport first has to
/// reconnect, and a quorum queue may refuse messages until it has elected its leader.
async fn publish_until_confirmed(transport: &Arc<dyn Transport>, topic: &str, body: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        match transport.publish(topic, Message::new(Some("k".into()), body.as_bytes().to_vec())).await {
            Ok(()) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("publish after restart not confirmed yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("publish never confirmed after the restart: {e}"),
        }
    }
}

/// The next delivery, skipping the transient errors of a subscription that is resubscribing.
async fn next_delivery(sub: &mut Box<dyn Subscription>, within: Duration) -> Delivery {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sub.next()).await {
            Ok(Some(Ok(d))) => return d,
            Ok(Some(Err(e))) => eprintln!("subscription error (resubscribing): {e}"),
            Ok(None) => panic!("subscription closed"),
            Err(_) => panic!("no delivery within {within:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_publish_survives_broker_restart() {
    if let Err(e) = rabbitmqctl(&["await_startup", "--timeout", "10"]).await {
        eprintln!("SKIPPED: cannot control the local RabbitMQ node: {e}");
        return;
    }
    let prefix = unique_prefix();
    let transport = backend_transport(Backend::Rabbitmq, &prefix).await;
    let topic = format!("{prefix}events");
    let topics = vec![topic.clone()];
    // "stored" holds messages through the restart with nobody consuming; "live" is consuming
    // across it and must resume by itself.
    transport.declare_group("stored", &topics).await.expect("declare group");
    let mut live = transport.subscribe("live", &topics).await.expect("subscribe");

    transport
        .publish(&topic, Message::new(Some("k".into()), b"before-restart".to_vec()))
        .await
        .expect("publish confirmed");
    let d = next_delivery(&mut live, Duration::from_secs(10)).await;
    assert_eq!(d.payload().as_ref(), b"before-restart");
    d.ack().await.expect("ack before the restart");

    let started = Instant::now();
    restart_broker().await;
    eprintln!("broker restarted in {:?}", started.elapsed());

    publish_until_confirmed(&transport, &topic, "after-restart", Duration::from_secs(60)).await;
    transport.ping().await.expect("ping after the restart");

    let mut stored = transport.subscribe("stored", &topics).await.expect("subscribe after the restart");
    for expected in ["before-restart", "after-restart"] {
        let d = next_delivery(&mut stored, Duration::from_secs(30)).await;
        assert_eq!(String::from_utf8_lossy(d.payload()), expected, "queue order kept across the restart");
        d.ack().await.expect("ack");
    }

    // An ack racing the shutdown may not have reached the queue: at-least-once allows the
    // first message once more.
    loop {
        let d = next_delivery(&mut live, Duration::from_secs(60)).await;
        let body = String::from_utf8_lossy(d.payload()).into_owned();
        d.ack().await.expect("ack on the resumed subscription");
        match body.as_str() {
            "after-restart" => break,
            "before-restart" => eprintln!("before-restart redelivered after the restart"),
            other => panic!("unexpected message {other:?}"),
        }
    }
}
