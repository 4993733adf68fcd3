//! The in-process bus: the embedded default (`make run`, the CLI, unit tests).
//!
//! It follows RabbitMQ's model: each consumer group has a FIFO queue; a publish appends the
//! message to the queue of every group subscribed to the topic (messages published to a topic
//! no group has joined yet wait in a backlog that the first group to join takes). A delivery
//! stays "in flight" until settled; when its subscription is dropped (the consumer crashed or
//! left) every in-flight message goes back to the front of the queue for another member.
//! Durability is the process's lifetime: this backend is for development and tests only.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use agentbridge_config::TransportConfig;
use agentbridge_contracts::{Origin, Stage};
use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;

use crate::{
    attempt_of, dead_letter_record, redeliveries_of, Delivery, DeliveryData, Message, Publisher, Settle, Subscription,
    Transport, TransportError, HEADER_ATTEMPT, HEADER_REDELIVERIES,
};

/// The in-process transport. Clones share the same bus.
#[derive(Clone)]
pub struct MemoryTransport {
    bus: Arc<Bus>,
}

struct Bus {
    prefix: String,
    delivery_limit: u32,
    state: Mutex<State>,
    next_member: AtomicU64,
}

#[derive(Default)]
struct State {
    /// topic → names of the groups subscribed to it.
    topics: HashMap<String, Vec<String>>,
    /// Messages of topics no group has joined yet.
    backlog: HashMap<String, VecDeque<Stored>>,
    groups: HashMap<String, Arc<Group>>,
}

#[derive(Clone)]
struct Stored {
    topic: String,
    key: Option<String>,
    payload: Bytes,
    headers: BTreeMap<String, String>,
    /// Position in the topic, reported as the "offset" in dead letters.
    offset: i64,
}

struct Group {
    name: String,
    queue: Mutex<GroupQueue>,
    notify: Notify,
}

#[derive(Default)]
struct GroupQueue {
    ready: VecDeque<Stored>,
    /// delivery id → (member, message)
    in_flight: HashMap<u64, (u64, Stored)>,
    next_id: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these collections half-updated in a way
    // that matters more than losing the whole bus, so a poisoned lock is simply taken over.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl MemoryTransport {
    pub fn new(config: &TransportConfig) -> Self {
        Self::with(&config.prefix, config.delivery_limit)
    }

    pub fn with(prefix: &str, delivery_limit: u32) -> Self {
        Self {
            bus: Arc::new(Bus {
                prefix: prefix.to_string(),
                delivery_limit,
                state: Mutex::new(State::default()),
                next_member: AtomicU64::new(1),
            }),
        }
    }

    /// Messages waiting (ready, not in flight) for `group`; for tests and `make run` output.
    pub fn pending(&self, group: &str) -> usize {
        let state = lock(&self.bus.state);
        state.groups.get(group).map(|g| lock(&g.queue).ready.len()).unwrap_or(0)
    }
}

static OFFSETS: AtomicU64 = AtomicU64::new(0);

impl Bus {
    fn enqueue(&self, stored: Stored) {
        let mut state = lock(&self.state);
        let groups = state.topics.get(&stored.topic).cloned().unwrap_or_default();
        if groups.is_empty() {
            state.backlog.entry(stored.topic.clone()).or_default().push_back(stored);
            return;
        }
        for name in groups {
            if let Some(group) = state.groups.get(&name) {
                lock(&group.queue).ready.push_back(stored.clone());
                group.notify.notify_one();
            }
        }
    }

    /// Puts a message back at the front of its group, or dead-letters it past the limit.
    fn requeue(&self, group: &Group, mut stored: Stored) {
        let redeliveries = redeliveries_of(&stored.headers) + 1;
        stored.headers.insert(HEADER_REDELIVERIES.into(), redeliveries.to_string());
        if redeliveries >= self.delivery_limit {
            self.poison(group, stored, redeliveries);
            return;
        }
        lock(&group.queue).ready.push_front(stored);
        group.notify.notify_one();
    }

    fn poison(&self, group: &Group, stored: Stored, redeliveries: u32) {
        let data = data_of(&stored, &group.name, redeliveries);
        let detail = format!(
            "delivered {redeliveries} times to group {} without being settled (delivery limit {})",
            group.name, self.delivery_limit
        );
        let record = dead_letter_record(&data, Stage::Transport, "delivery_limit", &detail, "transport");
        tracing::warn!(group = %group.name, topic = %stored.topic, "poison message moved to dlq.transport");
        self.enqueue(Stored {
            topic: format!("{}dlq.transport", self.prefix),
            key: stored.key,
            payload: Bytes::from(record.to_vec()),
            headers: BTreeMap::new(),
            offset: OFFSETS.fetch_add(1, Ordering::Relaxed) as i64,
        });
    }
}

fn data_of(stored: &Stored, group: &str, redeliveries: u32) -> DeliveryData {
    DeliveryData {
        topic: stored.topic.clone(),
        key: stored.key.clone(),
        payload: stored.payload.clone(),
        headers: stored.headers.clone(),
        attempt: attempt_of(&stored.headers),
        redeliveries,
        origin: Origin {
            transport: "memory".into(),
            topic: stored.topic.clone(),
            queue: Some(group.to_string()),
            partition: None,
            offset: Some(stored.offset),
            key: stored.key.clone(),
        },
    }
}

#[async_trait]
impl Publisher for MemoryTransport {
    async fn publish(&self, topic: &str, message: Message) -> Result<(), TransportError> {
        self.bus.enqueue(Stored {
            topic: topic.to_string(),
            key: message.key,
            payload: message.payload,
            headers: message.headers,
            offset: OFFSETS.fetch_add(1, Ordering::Relaxed) as i64,
        });
        Ok(())
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn subscribe(&self, group: &str, topics: &[String]) -> Result<Box<dyn Subscription>, TransportError> {
        let mut state = lock(&self.bus.state);
        let g = state
            .groups
            .entry(group.to_string())
            .or_insert_with(|| {
                Arc::new(Group {
                    name: group.to_string(),
                    queue: Mutex::new(GroupQueue::default()),
                    notify: Notify::new(),
                })
            })
            .clone();
        for topic in topics {
            let members = state.topics.entry(topic.clone()).or_default();
            if !members.iter().any(|m| m == group) {
                members.push(group.to_string());
            }
            if let Some(backlog) = state.backlog.remove(topic) {
                lock(&g.queue).ready.extend(backlog);
            }
        }
        g.notify.notify_one();
        let member = self.bus.next_member.fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(MemorySubscription { bus: self.bus.clone(), group: g, member }))
    }

    async fn declare_group(&self, group: &str, topics: &[String]) -> Result<(), TransportError> {
        // Subscribing registers the group; dropping a member that holds nothing changes nothing.
        drop(self.subscribe(group, topics).await?);
        Ok(())
    }

    async fn ensure_topics(&self, _topics: &[String]) -> Result<(), TransportError> {
        Ok(())
    }

    async fn ping(&self) -> Result<(), TransportError> {
        Ok(())
    }
}

struct MemorySubscription {
    bus: Arc<Bus>,
    group: Arc<Group>,
    member: u64,
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn next(&mut self) -> Option<Result<Delivery, TransportError>> {
        loop {
            // Register interest before looking, so a publish between the look and the wait
            // is not missed.
            let notified = self.group.notify.notified();
            {
                let mut q = lock(&self.group.queue);
                if let Some(stored) = q.ready.pop_front() {
                    let id = q.next_id;
                    q.next_id += 1;
                    q.in_flight.insert(id, (self.member, stored.clone()));
                    let more = !q.ready.is_empty();
                    drop(q);
                    if more {
                        // Pass the baton: another waiting member may take the next one.
                        self.group.notify.notify_one();
                    }
                    let data = data_of(&stored, &self.group.name, redeliveries_of(&stored.headers));
                    let settle = MemorySettle { bus: self.bus.clone(), group: self.group.clone(), id };
                    return Some(Ok(Delivery::new(data, Box::new(settle))));
                }
            }
            notified.await;
        }
    }
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        let orphans: Vec<(u64, Stored)> = {
            let mut q = lock(&self.group.queue);
            let ids: Vec<u64> = q.in_flight.iter().filter(|(_, (m, _))| *m == self.member).map(|(id, _)| *id).collect();
            let mut v: Vec<(u64, Stored)> =
                ids.into_iter().filter_map(|id| q.in_flight.remove(&id).map(|(_, s)| (id, s))).collect();
            v.sort_by_key(|(id, _)| std::cmp::Reverse(*id));
            v
        };
        // Re-queued newest first at the front, so the oldest ends up first in line again.
        for (_, stored) in orphans {
            self.bus.requeue(&self.group, stored);
        }
    }
}

struct MemorySettle {
    bus: Arc<Bus>,
    group: Arc<Group>,
    id: u64,
}

impl MemorySettle {
    fn take(&self) -> Option<Stored> {
        lock(&self.group.queue).in_flight.remove(&self.id).map(|(_, s)| s)
    }
}

#[async_trait]
impl Settle for MemorySettle {
    async fn ack(self: Box<Self>) -> Result<(), TransportError> {
        self.take();
        Ok(())
    }

    async fn nack(self: Box<Self>, _delivery: DeliveryData) -> Result<(), TransportError> {
        if let Some(stored) = self.take() {
            self.bus.requeue(&self.group, stored);
        }
        Ok(())
    }

    async fn retry_later(self: Box<Self>, _delivery: DeliveryData, delay: Duration) -> Result<(), TransportError> {
        let Some(mut stored) = self.take() else { return Ok(()) };
        let attempt = attempt_of(&stored.headers) + 1;
        stored.headers.insert(HEADER_ATTEMPT.into(), attempt.to_string());
        let group = self.group.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            lock(&group.queue).ready.push_back(stored);
            group.notify.notify_one();
        });
        Ok(())
    }

    async fn dead_letter(
        self: Box<Self>,
        topic: &str,
        key: Option<String>,
        record: Bytes,
    ) -> Result<(), TransportError> {
        self.bus.enqueue(Stored {
            topic: topic.to_string(),
            key,
            payload: record,
            headers: BTreeMap::new(),
            offset: OFFSETS.fetch_add(1, Ordering::Relaxed) as i64,
        });
        self.take();
        Ok(())
    }
}
