//! W3C trace context (`traceparent`) carried in the envelope, so one business event can be
//! followed across services and brokers without a tracing backend in between.

use std::fmt;

/// A parsed `traceparent` header value: `00-<trace-id:32 hex>-<parent-id:16 hex>-<flags:2 hex>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub sampled: bool,
}

impl TraceParent {
    /// A new trace, started where an event enters the system.
    pub fn new_root() -> Self {
        Self { trace_id: nonzero_random(), parent_id: nonzero_random(), sampled: true }
    }

    /// The same trace with a new span id: what a stage puts on the messages it produces.
    pub fn child(&self) -> Self {
        Self { trace_id: self.trace_id, parent_id: nonzero_random(), sampled: self.sampled }
    }

    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// Parses a `traceparent`; `None` for anything malformed (the spec says to start a new trace
    /// rather than fail the request).
    pub fn parse(s: &str) -> Option<Self> {
        let parts: Vec<&str> = s.trim().split('-').collect();
        if parts.len() != 4 || parts[0] != "00" {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        hex::decode_to_slice(parts[1], &mut trace_id).ok()?;
        hex::decode_to_slice(parts[2], &mut parent_id).ok()?;
        let mut flags = [0u8; 1];
        hex::decode_to_slice(parts[3], &mut flags).ok()?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(Self { trace_id, parent_id, sampled: flags[0] & 1 == 1 })
    }
}

/// Random ids from the thread's CSPRNG (`rand::rng`, seeded from the OS): every produced event
/// takes one or two, and asking the kernel each time (`getrandom`, as `Uuid::new_v4` does) was a
/// system call per id. All-zero ids are invalid in W3C trace context.
fn nonzero_random<const N: usize>() -> [u8; N] {
    loop {
        let id: [u8; N] = rand::random();
        if id != [0; N] {
            return id;
        }
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        crate::push_hex(&mut s, &self.trace_id);
        s.push('-');
        crate::push_hex(&mut s, &self.parent_id);
        s.push_str(if self.sampled { "-01" } else { "-00" });
        f.write_str(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_children_keep_the_trace() {
        let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = TraceParent::parse(s).expect("valid");
        assert_eq!(tp.to_string(), s);
        let child = tp.child();
        assert_eq!(child.trace_id, tp.trace_id);
        assert_ne!(child.parent_id, tp.parent_id);
        assert!(TraceParent::parse("00-000-00-01").is_none());
        assert!(TraceParent::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(TraceParent::parse(unsampled).expect("valid").to_string(), unsampled);
    }

    #[test]
    fn new_roots_are_valid_and_distinct() {
        let roots: std::collections::HashSet<String> = (0..1000).map(|_| TraceParent::new_root().to_string()).collect();
        assert_eq!(roots.len(), 1000);
        for r in roots.iter().take(20) {
            assert_eq!(TraceParent::parse(r).map(|t| t.to_string()).as_deref(), Some(r.as_str()));
        }
    }
}
