//! Logical topic names. On Kafka each is a topic; on RabbitMQ a routing key on the one
//! durable topic exchange; in memory a named channel. Every name carries the configured prefix
//! (default `agentbridge.`) so several deployments or test runs can share one broker.

/// Builds topic names under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}{}", self.prefix, suffix)
    }

    /// Vendor events, byte for byte, as a webhook or a poller received them.
    pub fn raw(&self, source: &str) -> String {
        self.name(&format!("raw.{source}"))
    }
    /// Validated agent input, one CloudEvent per business event.
    pub fn normalized(&self) -> String {
        self.name("normalized")
    }
    /// Run lifecycle events (claimed, triggered, completed, failed, timed_out).
    pub fn runs(&self) -> String {
        self.name("runs")
    }
    /// Run completions, from callbacks, polling and synchronous runs alike.
    pub fn completions(&self) -> String {
        self.name("completions")
    }
    /// Validated results of one business process, for downstream subscribers.
    pub fn results(&self, business_process: &str) -> String {
        self.name(&format!("results.{business_process}"))
    }
    /// Results a human must approve before anything is applied.
    pub fn review(&self) -> String {
        self.name("review")
    }
    /// Token usage per run, for metering.
    pub fn usage(&self) -> String {
        self.name("usage")
    }
    /// Budget and operational alerts.
    pub fn alerts(&self) -> String {
        self.name("alerts")
    }
    /// Dead letters of one stage (`normalize`, `trigger`, `validate`, `writeback`).
    pub fn dlq(&self, stage: &str) -> String {
        self.name(&format!("dlq.{stage}"))
    }
    /// Where a consumer group's delayed retries wait (Kafka) before coming back to it.
    pub fn retry(&self, group: &str) -> String {
        self.name(&format!("retry.{group}"))
    }

    /// Whether `topic` is one of the dead-letter topics ([`Topics::dlq`]).
    pub fn is_dead_letter(&self, topic: &str) -> bool {
        self.strip(topic).is_some_and(|t| t.starts_with("dlq."))
    }

    /// The logical name with the prefix removed, if it has it.
    pub fn strip<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic.strip_prefix(self.prefix.as_str())
    }
}

impl Default for Topics {
    fn default() -> Self {
        Self::new("agentbridge.")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix() {
        let t = Topics::default();
        assert_eq!(t.raw("zendesk"), "agentbridge.raw.zendesk");
        assert_eq!(t.dlq("normalize"), "agentbridge.dlq.normalize");
        assert_eq!(t.results("customer_support"), "agentbridge.results.customer_support");
        assert_eq!(Topics::new("t1.").normalized(), "t1.normalized");
        assert_eq!(t.strip("agentbridge.runs"), Some("runs"));
        assert!(t.is_dead_letter(&t.dlq("trigger")));
        assert!(!t.is_dead_letter(&t.runs()) && !t.is_dead_letter("other.dlq.trigger"));
    }
}
