//! Zendesk. Three shapes are accepted, recognised by their own markers:
//!
//! 1. **Event webhooks** (`"type": "zen:event-type:<entity>.<event>"`, with `id`,
//!    `account_id`, `subject` `zen:<entity>:<id>`, `time`, `detail`, `event`,
//!    `zendesk_event_version`). The event id is the body's `id`; the type is the part after
//!    `zen:event-type:` (`ticket.created`, `ticket.comment_added`,
//!    `messaging_ticket.message_added`, `user.active_changed` ...). Ticket events become ticket
//!    fields; other entities carry only their identity (map more with `mapping.fields`).
//! 2. **Events Connector (Amazon EventBridge) ticket events** (`detail.ticket_event`); the
//!    event id is the EventBridge `id`, the type `ticket.<snake_case of ticket_event.type>`.
//! 3. **Trigger webhooks** built from agentbridge's body template
//!    (`deploy/zendesk/trigger-webhook-body.liquid`, marker
//!    `"format": "agentbridge.zendesk.trigger.v1"`). Liquid renders unset values as empty
//!    strings, so `""` counts as missing in this shape.
//!
//! Zendesk sends priorities, statuses and types in either case (`HIGH`, `High`): they are
//! lower-cased. `null` values (common: unset priority, no organization, no tags) are left out.

use serde_json::Value;

use super::{
    bool_at, checked_event_type, entity, lower_at, object, put, string_list_at, text_at, time_at, Fields, SourceEvent,
};
use crate::doc::{Doc, NULL};
use crate::error::Rejection;
use crate::mapping::{self, get};

const EVENT_TYPE_PREFIX: &str = "zen:event-type:";
/// The marker of agentbridge's documented trigger body template.
pub const TRIGGER_FORMAT: &str = "agentbridge.zendesk.trigger.v1";

pub fn extract(doc: &Doc) -> Result<SourceEvent, Rejection> {
    if !doc.is_object() {
        return Err(Rejection::shape(format!("a Zendesk event is a JSON object, found {}", doc.type_name())));
    }
    if let Some(t) = doc.get("type").and_then(Doc::as_str) {
        if let Some(event_type) = t.strip_prefix(EVENT_TYPE_PREFIX) {
            return event_webhook(doc, event_type);
        }
    }
    if get(doc, "detail.ticket_event").is_some_and(Doc::is_object) {
        return events_connector(doc);
    }
    if doc.get("format").and_then(Doc::as_str) == Some(TRIGGER_FORMAT) {
        return trigger_body(doc);
    }
    Err(Rejection::shape(format!(
        "not a Zendesk event webhook (`type: zen:event-type:*`), an Events Connector ticket event \
         (`detail.ticket_event`) or the agentbridge trigger body (`format: {TRIGGER_FORMAT}`)"
    )))
}

fn event_webhook(doc: &Doc, vendor_type: &str) -> Result<SourceEvent, Rejection> {
    let event_id = doc
        .get("id")
        .and_then(Doc::non_empty_text)
        .ok_or_else(|| Rejection::missing_id("Zendesk event webhook without `id`"))?;
    let event_type = checked_event_type(vendor_type.to_string(), "Zendesk event type")?;
    let detail = doc.get("detail").filter(|d| d.is_object());
    // `subject` is `zen:<entity>:<id>`; the entity of ticket and messaging_ticket events is the ticket.
    let (subject_entity, subject_id) = match doc.get("subject").and_then(Doc::as_str) {
        Some(s) => {
            let mut parts = s.splitn(3, ':');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("zen"), Some(e), Some(id)) if !e.is_empty() && !id.is_empty() => {
                    (Some(e.to_string()), Some(id.to_string()))
                }
                _ => (None, None),
            }
        }
        None => (None, None),
    };
    let type_entity = event_type.split('.').next().unwrap_or_default();
    let is_ticket = matches!(type_entity, "ticket" | "messaging_ticket");
    let entity_type = match (&subject_entity, is_ticket) {
        (_, true) => "ticket".to_string(),
        (Some(e), false) => e.clone(),
        (None, false) => type_entity.to_string(),
    };
    let entity_id = detail.and_then(|d| d.get("id")).and_then(Doc::non_empty_text).or(subject_id).ok_or_else(|| {
        Rejection::shape(format!("Zendesk {event_type} event names no entity (no `detail.id`, no `subject`)"))
    })?;
    let time = match doc.get("time") {
        None | Some(Doc::Null) => None,
        Some(v) => Some(
            mapping::parse_time_doc(v).ok_or_else(|| Rejection::invalid(format!("`time` is not a timestamp: {v}")))?,
        ),
    };

    let mut fields = Fields::new();
    if type_entity == "ticket" {
        let detail =
            detail.ok_or_else(|| Rejection::shape(format!("Zendesk {event_type} event without a `detail` object")))?;
        ticket_fields(detail, &mut fields)?;
        put(&mut fields, "ticket_id", Some(Value::String(entity_id.clone())));
        let comment = get(doc, "event.comment").filter(|c| c.is_object());
        let message = match comment {
            Some(c) if c.get("body").is_some_and(|b| !b.is_null()) => object(vec![
                ("id", text_at(c, "id")),
                ("body", c.get("body").and_then(Doc::text).map(Value::String)),
                ("is_public", bool_at(c, "is_public")),
                (
                    "author",
                    object(vec![
                        ("id", text_at(c, "author.id")),
                        ("name", text_at(c, "author.name")),
                        ("is_staff", bool_at(c, "author.is_staff")),
                    ]),
                ),
            ]),
            // A new ticket's opening message is its description (Zendesk makes the first
            // comment the description).
            _ if event_type == "ticket.created" => {
                object(vec![("body", detail.get("description").and_then(Doc::text).map(Value::String))])
            }
            _ => None,
        };
        put(&mut fields, "latest_message", message);
    } else if type_entity == "messaging_ticket" {
        put(&mut fields, "ticket_id", Some(Value::String(entity_id.clone())));
        let message = match get(doc, "event.message") {
            Some(m) if m.get("body").is_some_and(|b| !b.is_null()) => object(vec![
                ("id", text_at(m, "id")),
                ("body", m.get("body").and_then(Doc::text).map(Value::String)),
                (
                    "author",
                    object(vec![("id", text_at(doc, "event.actor.id")), ("name", text_at(doc, "event.actor.name"))]),
                ),
            ]),
            _ => None,
        };
        put(&mut fields, "latest_message", message);
    }

    let mut source_ids = Fields::new();
    put(&mut source_ids, "account_id", text_at(doc, "account_id"));
    Ok(SourceEvent {
        event_id,
        event_type,
        entity_type,
        entity_id,
        time,
        fields: fields.into_map(),
        source_ids: source_ids.into_map(),
    })
}

/// The ticket fields of an event-webhook `detail` or an Events Connector `ticket`.
fn ticket_fields(t: &Doc, fields: &mut Fields) -> Result<(), Rejection> {
    put(fields, "subject", t.get("subject").and_then(Doc::text).map(Value::String));
    put(fields, "description", text_at(t, "description"));
    put(fields, "priority", lower_at(t, "priority"));
    put(fields, "status", lower_at(t, "status"));
    put(fields, "ticket_type", lower_at(t, "type"));
    put(fields, "channel", lower_at(t, "via.channel"));
    put(fields, "tags", string_list_at(t, "tags")?);
    put(fields, "requester", entity(text_at(t, "requester_id"), vec![]));
    put(fields, "organization", entity(text_at(t, "organization_id"), vec![]));
    put(fields, "assignee_id", text_at(t, "assignee_id"));
    put(fields, "group_id", text_at(t, "group_id"));
    put(fields, "brand_id", text_at(t, "brand_id"));
    put(fields, "external_id", text_at(t, "external_id"));
    put(fields, "created_at", time_at(t, "created_at")?);
    put(fields, "updated_at", time_at(t, "updated_at")?);
    Ok(())
}

fn events_connector(doc: &Doc) -> Result<SourceEvent, Rejection> {
    let event_id = doc
        .get("id")
        .and_then(Doc::non_empty_text)
        .ok_or_else(|| Rejection::missing_id("Events Connector event without `id`"))?;
    let te = get(doc, "detail.ticket_event").unwrap_or(&NULL);
    let raw_type = te
        .get("type")
        .and_then(Doc::as_str)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| Rejection::shape("Events Connector ticket event without `detail.ticket_event.type`"))?;
    // "Agent Assignment Changed" → ticket.agent_assignment_changed; "Ticket Created" → ticket.created.
    let snake: String = raw_type
        .trim()
        .to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join("_");
    let snake = snake.strip_prefix("ticket_").unwrap_or(&snake);
    let event_type = checked_event_type(format!("ticket.{snake}"), "Events Connector event type")?;
    let ticket = te
        .get("ticket")
        .filter(|t| t.is_object())
        .ok_or_else(|| Rejection::shape("Events Connector event without `ticket`"))?;
    let entity_id = ticket
        .get("id")
        .and_then(Doc::non_empty_text)
        .ok_or_else(|| Rejection::shape("Events Connector event without `ticket.id`"))?;
    let time_value = get(doc, "detail.ticket_event.meta.occurred_at").or_else(|| doc.get("time"));
    let time = match time_value {
        None | Some(Doc::Null) => None,
        Some(v) => Some(
            mapping::parse_time_doc(v)
                .ok_or_else(|| Rejection::invalid(format!("event time is not a timestamp: {v}")))?,
        ),
    };
    let mut fields = Fields::new();
    ticket_fields(ticket, &mut fields)?;
    put(&mut fields, "ticket_id", Some(Value::String(entity_id.clone())));
    if let Some(c) = te.get("comment").filter(|c| c.get("body").is_some_and(|b| !b.is_null())) {
        let message = object(vec![
            ("id", text_at(c, "id")),
            ("body", c.get("body").and_then(Doc::text).map(Value::String)),
            ("is_public", bool_at(c, "is_public")),
            (
                "author",
                object(vec![
                    ("id", text_at(c, "author.id")),
                    ("name", text_at(c, "author.name")),
                    ("is_staff", bool_at(c, "author.is_staff")),
                ]),
            ),
        ]);
        put(&mut fields, "latest_message", message);
    }
    let mut source_ids = Fields::new();
    // `source` is "aws.partner/zendesk.com/<account id>/<event bus>".
    let account = doc.get("source").and_then(Doc::as_str).and_then(|s| s.split('/').nth(2)).filter(|a| !a.is_empty());
    put(&mut source_ids, "account_id", account.map(|a| Value::String(a.to_string())));
    Ok(SourceEvent {
        event_id,
        event_type,
        entity_type: "ticket".into(),
        entity_id,
        time,
        fields: fields.into_map(),
        source_ids: source_ids.into_map(),
    })
}

fn trigger_body(doc: &Doc) -> Result<SourceEvent, Rejection> {
    let event_id = text_at(doc, "event_id").and_then(|v| v.as_str().map(str::to_string)).ok_or_else(|| {
        Rejection::missing_id("trigger body without `event_id` (the template sets it from ticket id and update time)")
    })?;
    let raw_type = text_at(doc, "event_type")
        .and_then(|v| v.as_str().map(str::to_string))
        .ok_or_else(|| Rejection::shape("trigger body without `event_type`"))?;
    let event_type = checked_event_type(raw_type, "trigger `event_type`")?;
    let t = doc
        .get("ticket")
        .filter(|t| t.is_object())
        .ok_or_else(|| Rejection::shape("trigger body without a `ticket` object"))?;
    let entity_id = text_at(t, "id")
        .and_then(|v| v.as_str().map(str::to_string))
        .ok_or_else(|| Rejection::shape("trigger body without `ticket.id`"))?;
    let time = match get(t, "updated_at").and_then(Doc::non_empty_text) {
        None => None,
        Some(s) => Some(
            mapping::parse_time_str(&s)
                .ok_or_else(|| Rejection::invalid(format!("`ticket.updated_at` is not a timestamp: {s:?}")))?,
        ),
    };
    let mut fields = Fields::new();
    put(&mut fields, "ticket_id", Some(Value::String(entity_id.clone())));
    put(&mut fields, "subject", t.get("subject").and_then(Doc::text).map(Value::String));
    put(&mut fields, "description", text_at(t, "description"));
    put(&mut fields, "priority", lower_at(t, "priority"));
    put(&mut fields, "status", lower_at(t, "status"));
    put(&mut fields, "ticket_type", lower_at(t, "type"));
    put(&mut fields, "channel", lower_at(t, "channel"));
    // Liquid renders `{{ticket.tags}}` as one space-separated string.
    let tags = get(t, "tags")
        .and_then(Doc::non_empty_text)
        .map(|s| Value::Array(s.split_whitespace().map(|w| Value::String(w.to_string())).collect()));
    put(&mut fields, "tags", tags);
    put(
        &mut fields,
        "requester",
        entity(
            text_at(t, "requester.id"),
            vec![("name", text_at(t, "requester.name")), ("email", text_at(t, "requester.email"))],
        ),
    );
    put(
        &mut fields,
        "organization",
        entity(text_at(t, "organization.id"), vec![("name", text_at(t, "organization.name"))]),
    );
    put(&mut fields, "assignee_id", text_at(t, "assignee_id"));
    put(&mut fields, "group_id", text_at(t, "group_id"));
    put(&mut fields, "created_at", time_at(t, "created_at")?);
    put(&mut fields, "updated_at", time_at(t, "updated_at")?);
    let message = match text_at(t, "latest_comment.body") {
        Some(body) => object(vec![
            ("body", Some(body)),
            ("is_public", bool_at(t, "latest_comment.is_public")),
            ("author", object(vec![("name", text_at(t, "latest_comment.author_name"))])),
        ]),
        None => None,
    };
    put(&mut fields, "latest_message", message);
    let mut source_ids = Fields::new();
    put(&mut source_ids, "account", text_at(doc, "account"));
    Ok(SourceEvent {
        event_id,
        event_type,
        entity_type: "ticket".into(),
        entity_id,
        time,
        fields: fields.into_map(),
        source_ids: source_ids.into_map(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Reason;
    use serde_json::json;

    fn ex(v: Value) -> Result<SourceEvent, Rejection> {
        let bytes = serde_json::to_vec(&v).expect("bytes");
        extract(&Doc::parse(&bytes).expect("doc"))
    }

    #[test]
    fn event_webhook_identity() {
        let doc = json!({
            "type": "zen:event-type:ticket.status_changed", "id": "e1", "account_id": 7,
            "subject": "zen:ticket:42", "time": "2025-01-01T00:00:00Z",
            "detail": {"id": "42", "subject": "s", "priority": null, "tags": null, "status": "OPEN"},
            "event": {"current": "OPEN", "previous": "NEW"}
        });
        let e = ex(doc).expect("ok");
        assert_eq!(
            (e.event_id.as_str(), e.event_type.as_str(), e.entity_type.as_str(), e.entity_id.as_str()),
            ("e1", "ticket.status_changed", "ticket", "42")
        );
        assert_eq!(e.fields.get("status"), Some(&json!("open")));
        assert!(!e.fields.contains_key("priority"), "null is left out, not invented");
        assert!(!e.fields.contains_key("tags"));
        assert_eq!(e.source_ids.get("account_id"), Some(&json!("7")));
    }

    #[test]
    fn shapes_are_rejected_precisely() {
        let r = |v: Value| ex(v).expect_err("rejected");
        assert_eq!(r(json!([])).reason, Reason::UnknownEventShape);
        assert_eq!(r(json!({"schema": "iglu:x", "data": {}})).reason, Reason::UnknownEventShape);
        assert_eq!(
            r(json!({"type": "zen:event-type:ticket.created", "detail": {"id": "1"}})).reason,
            Reason::MissingEventId
        );
        assert_eq!(
            r(json!({"type": "zen:event-type:ticket.created", "id": "", "detail": {"id": "1"}})).reason,
            Reason::MissingEventId
        );
        assert_eq!(r(json!({"type": "zen:event-type:Ticket Created", "id": "x"})).reason, Reason::UnknownEventShape);
        assert_eq!(
            r(json!({"type": "zen:event-type:ticket.created", "id": "x", "subject": "zen:ticket:1"})).reason,
            Reason::UnknownEventShape
        );
        let bad_time =
            r(json!({"type": "zen:event-type:ticket.created", "id": "x", "time": "soon", "detail": {"id": "1"}}));
        assert_eq!(bad_time.reason, Reason::InvalidField);
        let bad_tags =
            r(json!({"type": "zen:event-type:ticket.created", "id": "x", "detail": {"id": "1", "tags": "a b"}}));
        assert_eq!(bad_tags.reason, Reason::InvalidField);
        assert!(bad_tags.detail.contains("`tags`"), "{}", bad_tags.detail);
    }
}
