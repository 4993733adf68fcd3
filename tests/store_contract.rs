//! The store contract: one suite, run against the in-memory store and real Redis at
//! 127.0.0.1:6379 (`AGENTBRIDGE_TEST_REDIS_URL`). Each test uses its own key prefix, so the
//! suite runs in parallel on one Redis and leaves nothing behind. "Two clients" means two
//! separate `RedisStore`s (two connections, as two replicas would have) or, in memory, two
//! handles on one store. Timing assertions follow causality (what a call may see given when it
//! started and ended) rather than sleeping and hoping, so a loaded machine slows the suite
//! down without making it flaky.

mod common;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use agentbridge_config::{RedisConfig, Secret, StoreConfig, StoreKind};
use agentbridge_store::{Admission, Claim, Gate, Rate, Reopen, Store, StoreError};
use common::{delete_redis_keys, redis_url, unique_prefix};
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Memory,
    Redis,
    /// Redis reached as the least-privilege user of `deploy/redis-users.acl`.
    RedisAcl,
}

/// The documented least-privilege user, its key pattern moved to `prefix`: created in Redis
/// and deleted on drop. Returns the URL to reach Redis as it, or `None` when the test Redis is
/// already reached with credentials (a user cannot be spliced into such a URL).
struct AclUser {
    name: String,
}

impl AclUser {
    fn create(prefix: &str) -> Option<(AclUser, String)> {
        Self::create_without(prefix, &[])
    }

    /// The documented user without the rules in `dropped` (to see how a refusal reads).
    fn create_without(prefix: &str, dropped: &[&str]) -> Option<(AclUser, String)> {
        let url = redis_url();
        let rest = url.strip_prefix("redis://").filter(|r| !r.contains('@'))?.to_string();
        let acl = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/redis-users.acl"))
            .expect("deploy/redis-users.acl");
        let line = acl.lines().find(|l| l.starts_with("user ")).expect("a user line");
        let name = format!("abtest-acl-{}", unique_prefix().trim_end_matches('.'));
        let password = "contract-pw";
        let rules: Vec<String> = line
            .split_whitespace()
            .skip(2)
            .filter(|rule| !dropped.contains(rule))
            .map(|rule| match rule {
                r if r.starts_with('>') => format!(">{password}"),
                "~agentbridge:*" => format!("~{prefix}*"),
                r => r.to_string(),
            })
            .collect();
        assert!(rules.iter().any(|r| *r == format!("~{prefix}*")), "the file's key pattern is ~agentbridge:*");
        let mut conn = ::redis::Client::open(url.as_str()).expect("redis url").get_connection().expect("redis");
        let _: () = ::redis::cmd("ACL").arg("SETUSER").arg(&name).arg(&rules).query(&mut conn).expect("ACL SETUSER");
        Some((AclUser { name: name.clone() }, format!("redis://{name}:{password}@{rest}")))
    }
}

impl Drop for AclUser {
    fn drop(&mut self) {
        let client = ::redis::Client::open(redis_url()).expect("redis url");
        if let Ok(mut conn) = client.get_connection() {
            let _: Result<i64, _> = ::redis::cmd("ACL").arg("DELUSER").arg(&self.name).query(&mut conn);
        }
    }
}

fn redis_config(url: &str, key_prefix: &str, timeout: Duration) -> RedisConfig {
    RedisConfig { url: Secret::new(url), key_prefix: key_prefix.to_string(), timeout }
}

/// Two clients of one store, and the key prefix they share.
struct Ctx {
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
    prefix: String,
    backend: Backend,
    _acl: Option<AclUser>,
}

impl Ctx {
    async fn new(backend: Backend) -> Self {
        let prefix = format!("abtest:{}", unique_prefix());
        let (acl, url) = match backend {
            Backend::RedisAcl => match AclUser::create(&prefix) {
                Some((user, url)) => (Some(user), url),
                None => (None, redis_url()),
            },
            _ => (None, redis_url()),
        };
        let config = |kind| StoreConfig { kind, redis: redis_config(&url, &prefix, Duration::from_secs(2)) };
        let (a, b) = match backend {
            Backend::Memory => {
                let a = agentbridge_store::connect(&config(StoreKind::Memory)).await.expect("memory store");
                (a.clone(), a)
            }
            Backend::Redis | Backend::RedisAcl => (
                agentbridge_store::connect(&config(StoreKind::Redis)).await.expect("redis store a"),
                agentbridge_store::connect(&config(StoreKind::Redis)).await.expect("redis store b"),
            ),
        };
        let expected = match backend {
            Backend::Memory => "memory",
            Backend::Redis | Backend::RedisAcl => "redis",
        };
        assert_eq!(a.kind(), expected);
        a.ping().await.expect("ping a");
        b.ping().await.expect("ping b");
        if acl.is_some() {
            // The least-privilege user can read the policy too (`+info`).
            a.configuration_risks().await.expect("INFO as the ACL user");
        }
        Self { a, b, prefix, backend, _acl: acl }
    }

    /// Client `i % 2`, to spread concurrent callers over both.
    fn client(&self, i: usize) -> Arc<dyn Store> {
        match i % 2 {
            0 => self.a.clone(),
            _ => self.b.clone(),
        }
    }

    /// Deletes what the test left in Redis (flags and deadlines have no TTL).
    async fn cleanup(self) {
        if self.backend == Backend::Memory {
            return;
        }
        delete_redis_keys(&self.prefix).await;
    }
}

fn token(c: Claim) -> String {
    match c {
        Claim::Acquired { token, .. } => token,
        other => panic!("expected an acquired claim, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Claim-then-commit dedup
// ---------------------------------------------------------------------------------------------

async fn concurrent_claims_have_exactly_one_winner(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    const TASKS: usize = 50;
    for round in 0..5 {
        let key = format!("event-{round}");
        let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
        let tasks: Vec<_> = (0..TASKS)
            .map(|i| {
                let (store, key, barrier) = (ctx.client(i), key.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.claim(&key, Duration::from_secs(30)).await.expect("claim")
                })
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            match t.await.expect("task") {
                Claim::Acquired { token, .. } => winners.push(token),
                Claim::InProgress => {}
                other => panic!("nothing was committed, got {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one claim wins");
        assert!(ctx.b.commit(&key, &winners[0], "run-1", Duration::from_secs(30)).await.expect("commit"));
        for i in 0..4 {
            assert_eq!(
                ctx.client(i).claim(&key, Duration::from_secs(30)).await.expect("claim"),
                Claim::Done { value: "run-1".into() }
            );
        }
    }
    ctx.cleanup().await;
}

async fn dead_holders_claim_is_reclaimable_after_its_lease(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let lease = Duration::from_millis(300);
    // Allows for Redis expiring on its own millisecond clock.
    let slack = Duration::from_millis(5);
    let a_start = Instant::now();
    let dead = token(ctx.a.claim("k", lease).await.expect("claim"));
    let a_end = Instant::now();

    let mut seen_in_progress = 0;
    let taken = loop {
        let start = Instant::now();
        let c = ctx.b.claim("k", lease).await.expect("claim");
        let end = Instant::now();
        match c {
            Claim::InProgress => {
                // Seen as held, so the claim cannot have been over when this call began.
                assert!(start.duration_since(a_end) < lease + slack, "still held {:?} after the lease", start - a_end);
                seen_in_progress += 1;
            }
            Claim::Acquired { token, .. } => {
                // Taken over, so the lease must have run out before this call ended.
                assert!(end.duration_since(a_start) + slack >= lease, "taken over after only {:?}", end - a_start);
                break token;
            }
            other => panic!("never committed, got {other:?}"),
        }
        assert!(a_start.elapsed() < Duration::from_secs(5), "a dead claim was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(seen_in_progress > 0, "the live claim was never seen as in progress");

    // The dead holder wakes up: its token no longer commits or releases anything.
    assert!(!ctx.a.commit("k", &dead, "stale", Duration::from_secs(30)).await.expect("commit"));
    assert!(!ctx.a.release("k", &dead).await.expect("release"));
    assert_eq!(ctx.a.claim("k", lease).await.expect("claim"), Claim::InProgress);
    assert!(ctx.b.commit("k", &taken, "run-2", Duration::from_secs(30)).await.expect("commit"));
    assert_eq!(ctx.a.claim("k", lease).await.expect("claim"), Claim::Done { value: "run-2".into() });
    ctx.cleanup().await;
}

async fn commit_marks_done_for_its_ttl_and_release_frees_at_once(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let lease = Duration::from_secs(30);
    let ttl = Duration::from_millis(500);

    // Commit: duplicates see the committer's value until the TTL ends.
    let t = token(ctx.a.claim("done", lease).await.expect("claim"));
    assert!(!ctx.b.commit("done", "not-the-token", "x", ttl).await.expect("commit"), "a wrong token commits nothing");
    assert_eq!(ctx.b.claim("done", lease).await.expect("claim"), Claim::InProgress, "a wrong token changed nothing");
    let committed = Instant::now();
    assert!(ctx.a.commit("done", &t, "run-42", ttl).await.expect("commit"));
    assert_eq!(ctx.b.claim("done", lease).await.expect("claim"), Claim::Done { value: "run-42".into() });
    assert_eq!(ctx.a.claim("done", lease).await.expect("claim"), Claim::Done { value: "run-42".into() });
    assert!(!ctx.a.commit("done", &t, "again", ttl).await.expect("commit"), "a token commits once");
    assert!(!ctx.a.release("done", &t).await.expect("release"), "a committed key is not released");
    tokio::time::sleep_until(committed + ttl + Duration::from_millis(100)).await;
    token(ctx.b.claim("done", lease).await.expect("claim after the ttl"));

    // A token whose lease ran out commits nothing, and the key is free.
    let t = token(ctx.a.claim("expired", Duration::from_millis(100)).await.expect("claim"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!ctx.a.commit("expired", &t, "late", ttl).await.expect("commit"));
    token(ctx.b.claim("expired", lease).await.expect("claim"));

    // Release: the key can be claimed again at once, by anyone; a wrong token releases nothing.
    let t = token(ctx.a.claim("released", lease).await.expect("claim"));
    assert!(!ctx.b.release("released", "not-the-token").await.expect("release"));
    assert!(ctx.a.release("released", &t).await.expect("release"));
    assert!(!ctx.a.release("released", &t).await.expect("release"), "released twice");
    let t2 = token(ctx.b.claim("released", lease).await.expect("claim"));
    assert_ne!(t, t2);
    assert!(!ctx.a.commit("released", &t, "x", ttl).await.expect("commit"), "the released token is dead");
    ctx.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Bounded re-runs: reopening a committed claim
// ---------------------------------------------------------------------------------------------

async fn reopen_counts_reruns_and_stops_at_the_bound(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let (lease, ttl) = (Duration::from_secs(30), Duration::from_secs(60));
    let t = token(ctx.a.claim("event", lease).await.expect("claim"));
    // Nothing to reopen while the first run is being triggered.
    assert_eq!(ctx.b.reopen("event", "run-1", 2, ttl).await.expect("reopen"), Reopen::InProgress, "claimed");
    assert!(ctx.a.commit("event", &t, "run-1", ttl).await.expect("commit"));
    assert_eq!(ctx.b.reopen("event", "run-0", 2, ttl).await.expect("reopen"), Reopen::NotCommitted, "other value");
    assert_eq!(ctx.b.reopen("unknown", "run-1", 2, ttl).await.expect("reopen"), Reopen::NotCommitted, "no key");

    // Re-run 1: the key is free for the trigger-worker; asking again changes nothing.
    assert_eq!(ctx.b.reopen("event", "run-1", 2, ttl).await.expect("reopen"), Reopen::Reopened { rerun: 1 });
    assert_eq!(ctx.a.reopen("event", "run-1", 2, ttl).await.expect("reopen"), Reopen::AlreadyReopened { rerun: 1 });
    let t = token(ctx.a.claim("event", lease).await.expect("the reopened key is claimable"));
    assert_eq!(ctx.b.reopen("event", "run-1", 2, ttl).await.expect("reopen"), Reopen::AlreadyReopened { rerun: 1 });
    assert!(ctx.a.commit("event", &t, "run-2", ttl).await.expect("commit"));

    // Re-run 2, then the bound: the third failure keeps the key committed.
    assert_eq!(ctx.b.reopen("event", "run-2", 2, ttl).await.expect("reopen"), Reopen::Reopened { rerun: 2 });
    assert_eq!(ctx.a.reopen("event", "run-1", 2, ttl).await.expect("reopen"), Reopen::NotCommitted, "superseded");
    let t = token(ctx.a.claim("event", lease).await.expect("claim"));
    assert_eq!(ctx.b.reopen("event", "run-1", 2, ttl).await.expect("reopen"), Reopen::InProgress, "re-run 2 running");
    assert!(ctx.a.commit("event", &t, "run-3", ttl).await.expect("commit"));
    assert_eq!(ctx.b.reopen("event", "run-3", 2, ttl).await.expect("reopen"), Reopen::Exhausted { reruns: 2 });
    assert_eq!(ctx.a.reopen("event", "run-3", 2, ttl).await.expect("reopen"), Reopen::Exhausted { reruns: 2 });
    assert_eq!(ctx.a.claim("event", lease).await.expect("claim"), Claim::Done { value: "run-3".into() });
    // A larger bound (configuration changed) allows one more, counting on from 2.
    assert_eq!(ctx.a.reopen("event", "run-3", 3, ttl).await.expect("reopen"), Reopen::Reopened { rerun: 3 });

    // Keys count separately; a bound of 0 never reopens; values with colons are kept whole.
    let t = token(ctx.a.claim("other", lease).await.expect("claim"));
    assert!(ctx.a.commit("other", &t, "run:a:b", ttl).await.expect("commit"));
    assert_eq!(ctx.b.reopen("other", "run:a:b", 0, ttl).await.expect("reopen"), Reopen::Exhausted { reruns: 0 });
    assert_eq!(ctx.b.reopen("other", "run:a:b", 1, ttl).await.expect("reopen"), Reopen::Reopened { rerun: 1 });
    assert_eq!(ctx.a.reopen("other", "run:a:b", 1, ttl).await.expect("reopen"), Reopen::AlreadyReopened { rerun: 1 });
    ctx.cleanup().await;
}

/// The claim that starts a re-run says which re-run it is, whoever asks for it: the re-run event
/// the dispatcher publishes, or a replay of the original event that got there first. A claim on
/// a key that was never reopened starts re-run 0.
async fn a_claim_on_a_reopened_key_reports_its_rerun(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let (lease, ttl) = (Duration::from_secs(30), Duration::from_secs(60));
    let rerun_of = |c: Claim| match c {
        Claim::Acquired { rerun, .. } => rerun,
        other => panic!("expected an acquired claim, got {other:?}"),
    };
    let first = ctx.a.claim("event", lease).await.expect("claim");
    assert_eq!(rerun_of(first.clone()), 0, "never reopened");
    assert!(ctx.a.commit("event", &token(first), "run-0", ttl).await.expect("commit"));
    assert_eq!(ctx.b.reopen("event", "run-0", 3, ttl).await.expect("reopen"), Reopen::Reopened { rerun: 1 });

    // Through `claim` and through `admit` (a batched script on Redis): both say re-run 1.
    let c = ctx.b.claim("event", Duration::from_millis(200)).await.expect("claim");
    assert_eq!(rerun_of(c.clone()), 1);
    assert!(ctx.b.release("event", &token(c)).await.expect("release"));
    let got = ctx.a.admit(&gate(&[], None, "event")).await.expect("admit");
    let Admission::Claimed(c) = got else { panic!("expected a claim, got {got:?}") };
    assert_eq!(rerun_of(c.clone()), 1, "a released re-run claim is still re-run 1");
    assert!(ctx.a.commit("event", &token(c), "run-1", ttl).await.expect("commit"));
    assert_eq!(ctx.a.claim("event", lease).await.expect("claim"), Claim::Done { value: "run-1".into() });

    assert_eq!(ctx.b.reopen("event", "run-1", 3, ttl).await.expect("reopen"), Reopen::Reopened { rerun: 2 });
    assert_eq!(rerun_of(ctx.a.claim("event", lease).await.expect("claim")), 2);
    // Other keys are not affected.
    assert_eq!(rerun_of(ctx.a.claim("other", lease).await.expect("claim")), 0);
    ctx.cleanup().await;
}

async fn concurrent_reopens_of_one_failed_run_reopen_once(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let ttl = Duration::from_secs(60);
    const TASKS: usize = 40;
    for round in 0..3 {
        let key = format!("event-{round}");
        let t = token(ctx.a.claim(&key, ttl).await.expect("claim"));
        assert!(ctx.a.commit(&key, &t, "run-failed", ttl).await.expect("commit"));
        // Two replicas handling duplicates of the failed completion, and one (stale) completion
        // of another run, all at once.
        let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
        let tasks: Vec<_> = (0..TASKS)
            .map(|i| {
                let (store, key, barrier) = (ctx.client(i), key.clone(), barrier.clone());
                let value = if i == TASKS - 1 { "run-other" } else { "run-failed" };
                tokio::spawn(async move {
                    barrier.wait().await;
                    (value, store.reopen(&key, value, 2, ttl).await.expect("reopen"))
                })
            })
            .collect();
        let mut reopened = 0;
        for task in tasks {
            match task.await.expect("task") {
                ("run-other", outcome) => assert_eq!(outcome, Reopen::NotCommitted),
                (_, Reopen::Reopened { rerun: 1 }) => reopened += 1,
                (_, Reopen::AlreadyReopened { rerun: 1 }) => {}
                (_, other) => panic!("round {round}: unexpected {other:?}"),
            }
        }
        assert_eq!(reopened, 1, "round {round}: exactly one reopen");
        token(ctx.b.claim(&key, ttl).await.expect("the key is free for the re-run"));
    }
    ctx.cleanup().await;
}

async fn rerun_count_lives_for_its_ttl(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let lease = Duration::from_secs(30);
    let ttl = Duration::from_millis(400);
    let t = token(ctx.a.claim("event", lease).await.expect("claim"));
    assert!(ctx.a.commit("event", &t, "run-1", Duration::from_secs(60)).await.expect("commit"));
    let reopened_at = Instant::now();
    assert_eq!(ctx.b.reopen("event", "run-1", 1, ttl).await.expect("reopen"), Reopen::Reopened { rerun: 1 });
    let t = token(ctx.a.claim("event", lease).await.expect("claim"));
    assert!(ctx.a.commit("event", &t, "run-2", Duration::from_secs(60)).await.expect("commit"));
    let before = Instant::now();
    let early = ctx.b.reopen("event", "run-2", 1, ttl).await.expect("reopen");
    if before.duration_since(reopened_at) < ttl {
        assert_eq!(early, Reopen::Exhausted { reruns: 1 }, "the count is still known");
    }
    // Once the record expired (with the commit it belongs to, in real use) counting starts over.
    tokio::time::sleep_until(reopened_at + ttl + Duration::from_millis(100)).await;
    assert_eq!(ctx.b.reopen("event", "run-2", 1, ttl).await.expect("reopen"), Reopen::Reopened { rerun: 1 });
    ctx.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Admission: hold flags, rate limit and claim in one step
// ---------------------------------------------------------------------------------------------

fn gate<'a>(flags: &'a [&'a str], rate: Option<(&'a str, Rate)>, key: &'a str) -> Gate<'a> {
    Gate { hold_flags: flags, rate_limit: rate, claim_key: key, lease: Duration::from_secs(30) }
}

async fn admit_checks_flags_then_rate_limit_then_claim(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let flags = ["paused:a", "slowdown:a"];
    // One event per 10 s, no burst: the limiter admits exactly one event here.
    let rate = Rate { limit: 1, period: Duration::from_secs(10), burst: 1 };

    // A set flag holds the event: nothing consumed, nothing claimed.
    ctx.a.set_flag("slowdown:a", "1700000000000", None).await.expect("set");
    for _ in 0..3 {
        let got = ctx.b.admit(&gate(&flags, Some(("lim", rate)), "e1")).await.expect("admit");
        assert_eq!(got, Admission::Held { flag: 1, value: "1700000000000".into() });
    }
    ctx.a.set_flag("paused:a", "operator", None).await.expect("set");
    let got = ctx.a.admit(&gate(&flags, Some(("lim", rate)), "e1")).await.expect("admit");
    assert_eq!(got, Admission::Held { flag: 0, value: "operator".into() }, "the first set flag answers");
    ctx.a.clear_flag("paused:a").await.expect("clear");
    ctx.a.clear_flag("slowdown:a").await.expect("clear");

    // Flags clear: the limiter takes the event (the held ones did not use it up), then the claim.
    let got = ctx.b.admit(&gate(&flags, Some(("lim", rate)), "e1")).await.expect("admit");
    let Admission::Claimed(claim) = got else { panic!("expected a claim, got {got:?}") };
    let t1 = token(claim);

    // The limiter is spent: the next event is refused before its claim.
    let got = ctx.a.admit(&gate(&flags, Some(("lim", rate)), "e2")).await.expect("admit");
    let Admission::RateLimited { retry_after } = got else { panic!("expected a rate limit, got {got:?}") };
    assert!(retry_after > Duration::from_secs(8) && retry_after <= Duration::from_secs(10), "{retry_after:?}");
    assert!(matches!(ctx.b.claim("e2", Duration::from_secs(30)).await.expect("claim"), Claim::Acquired { .. }));

    // Without a limiter: the claim's own answers, in progress and done.
    let got = ctx.a.admit(&gate(&flags, None, "e1")).await.expect("admit");
    assert_eq!(got, Admission::Claimed(Claim::InProgress));
    assert!(ctx.b.commit("e1", &t1, "run-1", Duration::from_secs(60)).await.expect("commit"));
    let got = ctx.a.admit(&gate(&[], None, "e1")).await.expect("admit");
    assert_eq!(got, Admission::Claimed(Claim::Done { value: "run-1".into() }));
    ctx.cleanup().await;
}

async fn concurrent_admissions_claim_once(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    const TASKS: usize = 50;
    let rate = Rate::per_second(1_000_000);
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let (store, barrier) = (ctx.client(i), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store.admit(&gate(&["paused:x"], Some(("lim-x", rate)), "storm")).await.expect("admit")
            })
        })
        .collect();
    let mut acquired = 0;
    for t in tasks {
        match t.await.expect("task") {
            Admission::Claimed(Claim::Acquired { .. }) => acquired += 1,
            Admission::Claimed(Claim::InProgress) => {}
            other => panic!("unexpected admission {other:?}"),
        }
    }
    assert_eq!(acquired, 1, "exactly one of {TASKS} concurrent admissions claims the key");
    ctx.cleanup().await;
}

/// Many events admitted, recorded and committed at once (on Redis they share flushes: several
/// admissions in one script call, several commits in another): each gets its own answer, the
/// shared limiter admits exactly its burst, a held flag holds every one of them, and a commit
/// with a stale token is refused beside good ones.
async fn concurrent_admissions_and_commits_answer_each_event(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    const EVENTS: usize = 40;
    const BURST: u32 = 10;
    // A limiter that refills one event per hour: exactly its burst is admitted.
    let rate = Rate { limit: 1, period: Duration::from_secs(3600), burst: BURST };
    let admit_all = |flags: &'static [&'static str], tag: &'static str| {
        let tasks: Vec<_> = (0..EVENTS)
            .map(|i| {
                let store = ctx.client(i);
                tokio::spawn(async move {
                    let key = format!("{tag}-{i}");
                    let got = store.admit(&gate(flags, Some(("lim-many", rate)), &key)).await.expect("admit");
                    (key, got)
                })
            })
            .collect();
        async move {
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("task"));
            }
            out
        }
    };

    // Paused: every one is held, none spends a token or takes its claim.
    ctx.a.set_flag("paused:many", "operator", None).await.expect("pause");
    for (_, got) in admit_all(&["paused:many"], "held").await {
        assert_eq!(got, Admission::Held { flag: 0, value: "operator".into() });
    }
    ctx.a.clear_flag("paused:many").await.expect("resume");

    let results = admit_all(&["paused:many"], "ev").await;
    let mut claimed = Vec::new();
    for (key, got) in results {
        match got {
            Admission::Claimed(Claim::Acquired { token, .. }) => claimed.push((key, token)),
            Admission::RateLimited { retry_after } => {
                assert!(retry_after > Duration::from_secs(3000), "{retry_after:?}")
            }
            other => panic!("unexpected admission {other:?}"),
        }
    }
    assert_eq!(claimed.len(), BURST as usize, "the shared limiter admits exactly its burst");

    // Commit them all at once, plus one with a token that is not the holder's.
    let (stale_key, _) = claimed[0].clone();
    let mut tasks: Vec<_> = claimed
        .iter()
        .enumerate()
        .map(|(i, (key, token))| {
            let (store, key, token) = (ctx.client(i), key.clone(), token.clone());
            tokio::spawn(
                async move { store.commit(&key, &token, &format!("run-{key}"), Duration::from_secs(60)).await },
            )
        })
        .collect();
    let store = ctx.client(1);
    tasks.push(tokio::spawn(async move {
        store.commit(&stale_key, "not-the-token", "run-x", Duration::from_secs(60)).await
    }));
    let mut committed = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let ok = t.await.expect("task").expect("commit");
        if i < claimed.len() {
            assert!(ok, "the holder's commit succeeds");
            committed += 1;
        } else {
            assert!(!ok, "a stale token commits nothing");
        }
    }
    assert_eq!(committed, BURST as usize);
    for (key, _) in &claimed {
        let got = ctx.b.admit(&gate(&[], None, key)).await.expect("admit");
        assert_eq!(
            got,
            Admission::Claimed(Claim::Done { value: format!("run-{key}") }),
            "committed with its own value"
        );
    }
    ctx.cleanup().await;
}

async fn record_run_writes_state_deadline_and_poll(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let ttl = Duration::from_secs(60);
    ctx.a.record_run("run-a", r#"{"run_id":"run-a"}"#, ttl, 1_000, Some(2_000)).await.expect("record");
    ctx.a.record_run("run-b", r#"{"run_id":"run-b"}"#, ttl, 1_500, None).await.expect("record");
    assert_eq!(ctx.b.get_run("run-a").await.expect("get").as_deref(), Some(r#"{"run_id":"run-a"}"#));
    assert_eq!(ctx.b.get_run("run-b").await.expect("get").as_deref(), Some(r#"{"run_id":"run-b"}"#));
    assert_eq!(ctx.b.take_due(1_200, 10).await.expect("take"), ["run-a"]);
    assert_eq!(ctx.b.take_due(1_600, 10).await.expect("take"), ["run-b"]);
    assert_eq!(ctx.b.take_due_polls(10_000, 10).await.expect("take polls"), ["run-a"], "only the polled run");
    // Recording again (a retried event) replaces, never duplicates.
    ctx.a.record_run("run-a", r#"{"run_id":"run-a","v":2}"#, ttl, 3_000, None).await.expect("record again");
    ctx.a.record_run("run-a", r#"{"run_id":"run-a","v":2}"#, ttl, 3_000, None).await.expect("record again");
    assert_eq!(ctx.b.take_due(5_000, 10).await.expect("take"), ["run-a"]);
    assert_eq!(ctx.b.get_run("run-a").await.expect("get").as_deref(), Some(r#"{"run_id":"run-a","v":2}"#));
    ctx.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Rate limiting
// ---------------------------------------------------------------------------------------------

async fn rate_limit_admits_the_rate_across_two_clients(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let rate = Rate { limit: 50, period: Duration::from_secs(1), burst: 5 };
    let run = Duration::from_secs(3);
    const TASKS_PER_CLIENT: usize = 3;

    let end = Instant::now() + run;
    let tasks: Vec<_> = (0..2 * TASKS_PER_CLIENT)
        .map(|i| {
            let store = ctx.client(i);
            tokio::spawn(async move {
                let (mut admitted, mut denied) = (0u32, 0u32);
                while Instant::now() < end {
                    let d = store.rate_limit("agent-1", rate).await.expect("rate limit");
                    if d.allowed {
                        assert_eq!(d.retry_after, Duration::ZERO);
                        admitted += 1;
                    } else {
                        // Denied means the next slot is at most one emission interval away.
                        assert!(
                            d.retry_after >= Duration::from_millis(1) && d.retry_after <= Duration::from_millis(20),
                            "implausible retry_after {:?}",
                            d.retry_after
                        );
                        denied += 1;
                        // Retry well before the advertised time, to keep hammering.
                        tokio::time::sleep(d.retry_after / 4).await;
                    }
                }
                (i % 2, admitted, denied)
            })
        })
        .collect();
    let mut per_client = [0u32; 2];
    let mut denied = 0;
    for t in tasks {
        let (client, a, d) = t.await.expect("task");
        per_client[client] += a;
        denied += d;
    }
    let admitted = per_client[0] + per_client[1];
    eprintln!("{backend:?}: admitted {admitted} {per_client:?}, denied {denied}");
    let expected = 50.0 * run.as_secs_f64() + 5.0;
    let lo = (expected * 0.9).floor() as u32;
    let hi = (expected * 1.1).ceil() as u32;
    assert!(
        (lo..=hi).contains(&admitted),
        "admitted {admitted} (clients {per_client:?}), expected {expected} ± 10 %; {denied} denied"
    );
    assert!(denied > 0, "the clients never hit the limit");
    assert!(per_client.iter().all(|&n| n > 0), "both clients share the limiter: {per_client:?}");

    // Another key is another limiter.
    assert!(ctx.a.rate_limit("agent-2", rate).await.expect("rate limit").allowed);
    ctx.cleanup().await;
}

async fn rate_limit_burst_then_retry_after(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    // One event per 200 ms, bursts of 3: a fresh key admits 3 at once.
    let rate = Rate { limit: 5, period: Duration::from_secs(1), burst: 3 };
    for i in 0..3 {
        assert!(ctx.client(i).rate_limit("k", rate).await.expect("rate limit").allowed, "burst event {i}");
    }
    let d = ctx.b.rate_limit("k", rate).await.expect("rate limit");
    assert!(!d.allowed);
    assert!(d.retry_after > Duration::from_millis(100) && d.retry_after <= Duration::from_millis(200), "{d:?}");
    tokio::time::sleep(d.retry_after).await;
    assert!(ctx.a.rate_limit("k", rate).await.expect("rate limit").allowed, "admitted at retry_after");
    ctx.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Flags, replay protection, run state
// ---------------------------------------------------------------------------------------------

async fn flags_set_get_clear_list_and_expire(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    assert_eq!(ctx.a.get_flag("paused:agent-1").await.expect("get"), None);
    assert!(!ctx.a.clear_flag("paused:agent-1").await.expect("clear"));

    ctx.a.set_flag("paused:agent-2", "maintenance", None).await.expect("set");
    ctx.a.set_flag("paused:agent-1", "incident", None).await.expect("set");
    ctx.a.set_flag("drain:agent-1", "yes", None).await.expect("set");
    // Glob characters in names are literal: listing `odd:a*` must not match `odd:aXb`.
    ctx.a.set_flag("odd:a*b", "star", None).await.expect("set");
    ctx.a.set_flag("odd:aXb", "x", None).await.expect("set");

    assert_eq!(ctx.b.get_flag("paused:agent-1").await.expect("get").as_deref(), Some("incident"));
    let paused = ctx.b.list_flags("paused:").await.expect("list");
    assert_eq!(
        paused,
        [("paused:agent-1".to_string(), "incident".to_string()), ("paused:agent-2".into(), "maintenance".into())],
        "sorted by name, only the prefix"
    );
    assert_eq!(ctx.b.list_flags("odd:a*").await.expect("list"), [("odd:a*b".to_string(), "star".to_string())]);
    assert_eq!(ctx.b.list_flags("").await.expect("list").len(), 5);

    ctx.b.set_flag("paused:agent-1", "overwritten", None).await.expect("set");
    assert_eq!(ctx.a.get_flag("paused:agent-1").await.expect("get").as_deref(), Some("overwritten"));
    assert!(ctx.b.clear_flag("paused:agent-1").await.expect("clear"));
    assert!(!ctx.b.clear_flag("paused:agent-1").await.expect("clear"), "cleared twice");
    assert_eq!(ctx.a.get_flag("paused:agent-1").await.expect("get"), None);

    // TTLs: a flag expires; setting it again without a TTL keeps it.
    let ttl = Duration::from_millis(400);
    let set_at = Instant::now();
    ctx.a.set_flag("paused:short", "1", Some(ttl)).await.expect("set");
    ctx.a.set_flag("paused:made-permanent", "1", Some(ttl)).await.expect("set");
    ctx.a.set_flag("paused:made-permanent", "2", None).await.expect("set");
    assert_eq!(ctx.b.get_flag("paused:short").await.expect("get").as_deref(), Some("1"));
    tokio::time::sleep_until(set_at + ttl + Duration::from_millis(100)).await;
    assert_eq!(ctx.b.get_flag("paused:short").await.expect("get"), None);
    assert_eq!(ctx.b.get_flag("paused:made-permanent").await.expect("get").as_deref(), Some("2"));
    let names: Vec<String> = ctx.b.list_flags("paused:").await.expect("list").into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["paused:agent-2", "paused:made-permanent"]);
    ctx.cleanup().await;
}

async fn first_seen_then_replay_then_again_after_ttl(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let ttl = Duration::from_millis(400);
    let first = Instant::now();
    assert!(ctx.a.first_seen("delivery-1", ttl).await.expect("seen"));
    assert!(!ctx.b.first_seen("delivery-1", ttl).await.expect("seen"), "a replay on another client");
    assert!(!ctx.a.first_seen("delivery-1", ttl).await.expect("seen"), "a replay on the same client");
    assert!(ctx.b.first_seen("delivery-2", ttl).await.expect("seen"), "ids are independent");
    tokio::time::sleep_until(first + ttl + Duration::from_millis(100)).await;
    assert!(ctx.b.first_seen("delivery-1", ttl).await.expect("seen"), "forgotten after the ttl");
    assert!(!ctx.a.first_seen("delivery-1", ttl).await.expect("seen"));

    // Exactly one of many concurrent first sightings wins.
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = ctx.client(i);
            tokio::spawn(async move { store.first_seen("delivery-3", Duration::from_secs(30)).await.expect("seen") })
        })
        .collect();
    let mut firsts = 0;
    for t in tasks {
        firsts += usize::from(t.await.expect("task"));
    }
    assert_eq!(firsts, 1);
    ctx.cleanup().await;
}

async fn run_state_put_get_delete_and_expire(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let long = Duration::from_secs(60);
    assert_eq!(ctx.a.get_run("run-1").await.expect("get"), None);
    ctx.a.put_run("run-1", r#"{"status":"running"}"#, long).await.expect("put");
    assert_eq!(ctx.b.get_run("run-1").await.expect("get").as_deref(), Some(r#"{"status":"running"}"#));
    ctx.b.put_run("run-1", r#"{"status":"done"}"#, long).await.expect("put");
    assert_eq!(ctx.a.get_run("run-1").await.expect("get").as_deref(), Some(r#"{"status":"done"}"#));
    ctx.a.delete_run("run-1").await.expect("delete");
    assert_eq!(ctx.b.get_run("run-1").await.expect("get"), None);
    ctx.a.delete_run("run-1").await.expect("deleting a missing run is fine");

    let ttl = Duration::from_millis(400);
    let put_at = Instant::now();
    ctx.a.put_run("run-2", "{}", ttl).await.expect("put");
    assert_eq!(ctx.b.get_run("run-2").await.expect("get").as_deref(), Some("{}"));
    tokio::time::sleep_until(put_at + ttl + Duration::from_millis(100)).await;
    assert_eq!(ctx.b.get_run("run-2").await.expect("get"), None);
    ctx.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Watchdog deadlines
// ---------------------------------------------------------------------------------------------

async fn deadlines_schedule_cancel_and_take_due_once(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    // Deadlines are caller-given times, so a fixed timeline keeps the test independent of clocks.
    let now: i64 = 1_700_000_000_000;

    ctx.a.schedule_deadline("cancelled", now - 10).await.expect("schedule");
    assert!(ctx.b.cancel_deadline("cancelled").await.expect("cancel"), "a scheduled deadline is removed");
    assert!(!ctx.b.cancel_deadline("cancelled").await.expect("cancel"), "cancelled twice");
    ctx.a.schedule_deadline("moved", now - 5).await.expect("schedule");
    ctx.b.schedule_deadline("moved", now + 1_000).await.expect("re-schedule replaces the deadline");
    ctx.a.schedule_deadline("future", now + 60_000).await.expect("schedule");
    ctx.a.schedule_deadline("exactly-now", now).await.expect("schedule");
    assert_eq!(ctx.b.take_due(now, 10).await.expect("take"), ["exactly-now"], "due at or before now");
    assert!(ctx.b.take_due(now, 10).await.expect("take").is_empty(), "handed out once");
    assert!(ctx.b.take_due(now, 0).await.expect("take").is_empty(), "limit 0 takes nothing");

    // Many due ids, two clients with two callers each taking small batches concurrently: every
    // id comes out exactly once.
    const DUE: usize = 300;
    for i in 0..DUE {
        ctx.client(i).schedule_deadline(&format!("run-{i:03}"), now - (i as i64 % 50)).await.expect("schedule");
    }
    let all = drain_concurrently(&ctx, DueSet::Deadlines, now, 7).await;
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), DUE, "every due id once");
    assert_eq!(unique.len(), DUE, "no id twice");
    assert!(!unique.iter().any(|id| id.as_str() == "moved" || id.as_str() == "future"), "not-yet-due ids stay");

    // The ones not yet due come out when their time comes, earliest first.
    assert!(ctx.a.take_due(now + 999, 10).await.expect("take").is_empty());
    assert_eq!(ctx.a.take_due(now + 60_000, 10).await.expect("take"), ["moved", "future"]);
    assert!(!ctx.a.cancel_deadline("future").await.expect("cancel"), "taken means gone");
    ctx.cleanup().await;
}

#[derive(Clone, Copy)]
enum DueSet {
    Deadlines,
    Polls,
}

/// Four callers on the two clients take due ids in batches of `limit` until none is left;
/// returns everything they got.
async fn drain_concurrently(ctx: &Ctx, set: DueSet, now: i64, limit: usize) -> Vec<String> {
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let store = ctx.client(i);
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let batch = match set {
                        DueSet::Deadlines => store.take_due(now, limit).await,
                        DueSet::Polls => store.take_due_polls(now, limit).await,
                    }
                    .expect("take");
                    assert!(batch.len() <= limit, "limit honoured");
                    if batch.is_empty() {
                        return got;
                    }
                    got.extend(batch);
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all
}

async fn polls_schedule_cancel_and_take_due_once_apart_from_deadlines(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let now: i64 = 1_700_000_000_000;

    // The same run id in both sets: each set hands it out on its own schedule.
    ctx.a.schedule_deadline("run-1", now + 60_000).await.expect("deadline");
    ctx.a.schedule_poll("run-1", now - 1).await.expect("poll");
    ctx.b.schedule_poll("run-1", now).await.expect("re-scheduling replaces the poll time");
    ctx.a.schedule_poll("cancelled", now - 10).await.expect("poll");
    assert!(ctx.b.cancel_poll("cancelled").await.expect("cancel"), "a scheduled poll is removed");
    assert!(!ctx.b.cancel_poll("cancelled").await.expect("cancel"), "cancelled twice");
    ctx.a.schedule_poll("later", now + 500).await.expect("poll");
    assert!(ctx.b.take_due(now, 10).await.expect("take").is_empty(), "no deadline is due");
    assert!(ctx.b.take_due_polls(now, 0).await.expect("take").is_empty(), "limit 0 takes nothing");
    assert_eq!(ctx.b.take_due_polls(now, 10).await.expect("take"), ["run-1"]);
    assert!(ctx.a.take_due_polls(now, 10).await.expect("take").is_empty(), "handed out once");
    assert!(ctx.a.cancel_deadline("run-1").await.expect("cancel"), "taking the poll left the deadline");

    // Concurrent takers on two clients: every due poll comes out exactly once.
    const DUE: usize = 120;
    for i in 0..DUE {
        ctx.client(i).schedule_poll(&format!("poll-{i:03}"), now - (i as i64 % 20)).await.expect("poll");
    }
    let all = drain_concurrently(&ctx, DueSet::Polls, now, 5).await;
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!((all.len(), unique.len()), (DUE, DUE), "every due poll once");
    assert_eq!(ctx.a.take_due_polls(now + 500, 10).await.expect("take"), ["later"]);
    ctx.cleanup().await;
}

/// A Redis user missing a grant gets an error that points at deploy/redis-users.acl, whether
/// Redis refuses a plain command (NOPERM) or one inside a script; it is "unavailable" (waited
/// out, events held), never an answer.
#[tokio::test]
async fn an_acl_refusal_names_the_grants_to_add() {
    let prefix = format!("abtest:{}", unique_prefix());
    for (dropped, what) in [("+set", "a plain command"), ("+time", "a command inside a script")] {
        let Some((_user, url)) = AclUser::create_without(&prefix, &[dropped]) else { return };
        let config = StoreConfig { kind: StoreKind::Redis, redis: redis_config(&url, &prefix, Duration::from_secs(2)) };
        let store = agentbridge_store::connect(&config).await.expect("redis store");
        let refused = match dropped {
            "+set" => store.set_flag("paused:acl", "operator", None).await.map(|_| ()),
            _ => {
                store.rate_limit("acl", Rate { limit: 10, period: Duration::from_secs(1), burst: 10 }).await.map(|_| ())
            }
        };
        match refused {
            Err(StoreError::Unavailable(m)) => {
                assert!(m.contains("(ACL)") && m.contains("deploy/redis-users.acl"), "{what}: {m}")
            }
            other => panic!("{what}: expected an ACL refusal, got {other:?}"),
        }
    }
    delete_redis_keys(&prefix).await;
}

macro_rules! contract {
    ($backend:ident, $modname:ident) => {
        mod $modname {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_claims_have_exactly_one_winner() {
                super::concurrent_claims_have_exactly_one_winner(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dead_holders_claim_is_reclaimable_after_its_lease() {
                super::dead_holders_claim_is_reclaimable_after_its_lease(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn commit_marks_done_for_its_ttl_and_release_frees_at_once() {
                super::commit_marks_done_for_its_ttl_and_release_frees_at_once(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn reopen_counts_reruns_and_stops_at_the_bound() {
                super::reopen_counts_reruns_and_stops_at_the_bound(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_claim_on_a_reopened_key_reports_its_rerun() {
                super::a_claim_on_a_reopened_key_reports_its_rerun(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_reopens_of_one_failed_run_reopen_once() {
                super::concurrent_reopens_of_one_failed_run_reopen_once(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rerun_count_lives_for_its_ttl() {
                super::rerun_count_lives_for_its_ttl(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn admit_checks_flags_then_rate_limit_then_claim() {
                super::admit_checks_flags_then_rate_limit_then_claim(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_admissions_claim_once() {
                super::concurrent_admissions_claim_once(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_admissions_and_commits_answer_each_event() {
                super::concurrent_admissions_and_commits_answer_each_event(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn record_run_writes_state_deadline_and_poll() {
                super::record_run_writes_state_deadline_and_poll(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rate_limit_admits_the_rate_across_two_clients() {
                super::rate_limit_admits_the_rate_across_two_clients(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rate_limit_burst_then_retry_after() {
                super::rate_limit_burst_then_retry_after(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn flags_set_get_clear_list_and_expire() {
                super::flags_set_get_clear_list_and_expire(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn first_seen_then_replay_then_again_after_ttl() {
                super::first_seen_then_replay_then_again_after_ttl(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn run_state_put_get_delete_and_expire() {
                super::run_state_put_get_delete_and_expire(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn deadlines_schedule_cancel_and_take_due_once() {
                super::deadlines_schedule_cancel_and_take_due_once(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn polls_schedule_cancel_and_take_due_once_apart_from_deadlines() {
                super::polls_schedule_cancel_and_take_due_once_apart_from_deadlines(Backend::$backend).await
            }
        }
    };
}

contract!(Memory, memory);
contract!(Redis, redis_backend);
contract!(RedisAcl, redis_acl);

// ---------------------------------------------------------------------------------------------
// Fail closed (Redis only: memory has nothing to lose)
// ---------------------------------------------------------------------------------------------

/// Runs every store operation and asserts each one fails within `bound`.
async fn assert_every_call_fails(store: &dyn Store, bound: Duration) {
    async fn fails<T: std::fmt::Debug>(what: &str, bound: Duration, fut: impl Future<Output = Result<T, StoreError>>) {
        let start = Instant::now();
        // The outer timeout only turns a hang into a readable failure.
        let result = tokio::time::timeout(bound * 4, fut).await;
        let took = start.elapsed();
        match result {
            Ok(Err(StoreError::Unavailable(_) | StoreError::Timeout(_))) => {}
            Ok(Err(e)) => panic!("{what}: failed with an unexpected error kind: {e}"),
            Ok(Ok(v)) => panic!("{what}: answered {v:?} without a store: must fail closed"),
            Err(_) => panic!("{what}: still hanging after {:?}", bound * 4),
        }
        assert!(took <= bound, "{what}: took {took:?}, more than {bound:?}");
    }
    let ttl = Duration::from_secs(10);
    fails("ping", bound, store.ping()).await;
    fails("claim", bound, store.claim("k", ttl)).await;
    fails("commit", bound, store.commit("k", "token", "v", ttl)).await;
    fails("release", bound, store.release("k", "token")).await;
    fails("reopen", bound, store.reopen("k", "run", 2, ttl)).await;
    fails("rate_limit", bound, store.rate_limit("k", Rate::per_second(10))).await;
    let g = Gate { hold_flags: &["f"], rate_limit: Some(("k", Rate::per_second(10))), claim_key: "k", lease: ttl };
    fails("admit", bound, store.admit(&g)).await;
    fails("set_flag", bound, store.set_flag("f", "v", None)).await;
    fails("get_flag", bound, store.get_flag("f")).await;
    fails("clear_flag", bound, store.clear_flag("f")).await;
    fails("list_flags", bound, store.list_flags("")).await;
    fails("first_seen", bound, store.first_seen("id", ttl)).await;
    fails("put_run", bound, store.put_run("r", "{}", ttl)).await;
    fails("record_run", bound, store.record_run("r", "{}", ttl, 0, Some(0))).await;
    fails("get_run", bound, store.get_run("r")).await;
    fails("delete_run", bound, store.delete_run("r")).await;
    fails("schedule_deadline", bound, store.schedule_deadline("r", 0)).await;
    fails("cancel_deadline", bound, store.cancel_deadline("r")).await;
    fails("take_due", bound, store.take_due(i64::MAX, 10)).await;
    fails("schedule_poll", bound, store.schedule_poll("r", 0)).await;
    fails("cancel_poll", bound, store.cancel_poll("r")).await;
    fails("take_due_polls", bound, store.take_due_polls(i64::MAX, 10)).await;
    fails("configuration_risks", bound, store.configuration_risks()).await;
    fails("ping again", bound, store.ping()).await;
}

/// Room for scheduling on a loaded machine on top of the configured timeout.
const SLACK: Duration = Duration::from_millis(250);

mod fail_closed {
    use super::*;

    /// Nothing listens on port 1: connection refused on every attempt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_redis_fails_every_call() {
        let timeout = Duration::from_millis(300);
        let config =
            StoreConfig { kind: StoreKind::Redis, redis: redis_config("redis://127.0.0.1:1", "abtest:dead:", timeout) };
        let start = Instant::now();
        // Connecting is lazy-tolerant (see `agentbridge_store::redis`); failing would also do.
        let store = match agentbridge_store::connect(&config).await {
            Ok(store) => store,
            Err(e) => {
                assert!(matches!(e, StoreError::Unavailable(_) | StoreError::Timeout(_)), "{e}");
                return;
            }
        };
        assert!(start.elapsed() <= timeout + SLACK, "connect took {:?}", start.elapsed());
        assert_every_call_fails(store.as_ref(), timeout + SLACK).await;
    }

    /// A server that accepts connections and never answers: only the timeout ends the calls.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_redis_is_bounded_by_the_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let timeout = Duration::from_millis(300);
        let config = StoreConfig {
            kind: StoreKind::Redis,
            redis: redis_config(&format!("redis://{addr}"), "abtest:silent:", timeout),
        };
        let start = Instant::now();
        let store = agentbridge_store::connect(&config).await.expect("connect is lazy-tolerant");
        assert!(start.elapsed() <= timeout + SLACK, "connect took {:?}", start.elapsed());
        assert_every_call_fails(store.as_ref(), timeout + SLACK).await;
        server.abort();
    }

    /// A TCP forwarder to the real Redis, standing in for a Redis that goes away and comes back.
    struct Proxy {
        accept: tokio::task::JoinHandle<()>,
    }

    impl Proxy {
        async fn start(addr: std::net::SocketAddr) -> Proxy {
            let listener = tokio::net::TcpListener::bind(addr).await.expect("bind proxy");
            let upstream = redis_url().trim_start_matches("redis://").trim_end_matches('/').to_string();
            let accept = tokio::spawn(async move {
                let mut conns = tokio::task::JoinSet::new();
                while let Ok((mut client, _)) = listener.accept().await {
                    let upstream = upstream.clone();
                    conns.spawn(async move {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                }
            });
            Proxy { accept }
        }

        /// Drops the listener and, with the JoinSet, every proxied connection: a Redis restart.
        async fn stop(self) {
            self.accept.abort();
            let _ = self.accept.await;
        }
    }

    async fn wait_until_ping_ok(store: &dyn Store, within: Duration) -> Duration {
        let start = Instant::now();
        while store.ping().await.is_err() {
            assert!(start.elapsed() < within, "the store did not recover within {within:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        start.elapsed()
    }

    /// Redis forgets its scripts when it restarts (here: `SCRIPT FLUSH`); the batched admission
    /// and commit load theirs again and answer, without a failed call.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scripts_flushed_from_redis_are_loaded_again() {
        let prefix = format!("abtest:{}", unique_prefix());
        let config =
            StoreConfig { kind: StoreKind::Redis, redis: redis_config(&redis_url(), &prefix, Duration::from_secs(2)) };
        let store = agentbridge_store::connect(&config).await.expect("store");
        let lease = Duration::from_secs(30);
        let g = Gate { hold_flags: &["paused:s"], rate_limit: None, claim_key: "s1", lease };
        let Admission::Claimed(Claim::Acquired { token: t1, .. }) = store.admit(&g).await.expect("admit") else {
            panic!("expected a claim")
        };
        let client = redis::Client::open(redis_url()).expect("redis url");
        let mut conn = client.get_multiplexed_async_connection().await.expect("connection");
        redis::cmd("SCRIPT").arg("FLUSH").query_async::<()>(&mut conn).await.expect("SCRIPT FLUSH");
        assert!(store.commit("s1", &t1, "run-1", Duration::from_secs(60)).await.expect("commit after flush"));
        redis::cmd("SCRIPT").arg("FLUSH").query_async::<()>(&mut conn).await.expect("SCRIPT FLUSH");
        let got = store.admit(&g).await.expect("admit after flush");
        assert_eq!(got, Admission::Claimed(Claim::Done { value: "run-1".into() }));
        delete_redis_keys(&prefix).await;
    }

    /// Down at start-up, up later, down again, up again: the same store object fails closed
    /// while Redis is away and answers again once it is back, without being rebuilt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recovers_when_redis_comes_back() {
        let addr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe port");
            probe.local_addr().expect("addr")
        };
        let prefix = format!("abtest:{}", unique_prefix());
        let timeout = Duration::from_millis(300);
        let config =
            StoreConfig { kind: StoreKind::Redis, redis: redis_config(&format!("redis://{addr}"), &prefix, timeout) };
        let store = agentbridge_store::connect(&config).await.expect("connect is lazy-tolerant");
        assert!(store.ping().await.is_err(), "nothing listens yet");
        assert!(store.claim("k", Duration::from_secs(30)).await.is_err(), "fails closed while down");

        let proxy = Proxy::start(addr).await;
        let took = wait_until_ping_ok(store.as_ref(), Duration::from_secs(10)).await;
        eprintln!("recovered {took:?} after Redis came up");
        let t = token(store.claim("k", Duration::from_secs(30)).await.expect("claim once up"));

        proxy.stop().await;
        assert!(store.ping().await.is_err(), "the connection to a stopped Redis fails");
        assert!(store.claim("k", Duration::from_secs(30)).await.is_err(), "fails closed while down");

        let proxy = Proxy::start(addr).await;
        let took = wait_until_ping_ok(store.as_ref(), Duration::from_secs(10)).await;
        eprintln!("recovered {took:?} after Redis came back");
        assert_eq!(
            store.claim("k", Duration::from_secs(30)).await.expect("claim"),
            Claim::InProgress,
            "state survived"
        );
        assert!(store.release("k", &t).await.expect("release"));
        proxy.stop().await;
    }

    /// A malformed URL is a configuration error at connect, and the error does not echo the URL
    /// (it may carry a password).
    #[tokio::test]
    async fn bad_url_fails_connect_without_leaking_it() {
        let config = StoreConfig {
            kind: StoreKind::Redis,
            redis: redis_config("not-a-url://:hunter2@", "abtest:bad:", Duration::from_millis(300)),
        };
        match agentbridge_store::connect(&config).await {
            Ok(_) => panic!("a malformed URL must not connect"),
            Err(e) => assert!(!e.to_string().contains("hunter2"), "{e}"),
        }
    }
}
