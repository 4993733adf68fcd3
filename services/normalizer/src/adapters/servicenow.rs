//! ServiceNow records as a Business Rule posts them (`deploy/servicenow/`): the record's
//! fields in the Table API layout, flat or wrapped as `{"result": {...}}`. Values are strings
//! (`""` meaning unset) or references `{"link", "value"}` (and `display_value` when the rule
//! sends display values). Internal date-times (`2016-01-22 14:28:24`) are UTC.
//!
//! Identity: the event id is the body's `event_id` when the sender gives one, otherwise
//! `<sys_id>:<sys_mod_count>` (every update of a record bumps its mod count, so each update is
//! one event and a re-post of the same update is a duplicate). The event type is the body's
//! `event_type` when given, else `<table>.created` for mod count 0 and `<table>.updated`
//! after; the table is `sys_class_name` (or the body's `table`), default `incident`.
//!
//! Normalization: `priority` 1 → urgent, 2 → high, 3 → normal, 4/5 → low; `state` 1 new,
//! 2 in_progress, 3 on_hold, 6 resolved, 7 closed, 8 canceled (other values pass as they are);
//! `number` is the `ticket_id` (what people quote), `sys_id` the entity id (what write-back
//! needs).

use serde_json::Value;

use super::{checked_event_type, entity, object, put, time_at, Fields, SourceEvent};
use crate::doc::Doc;
use crate::error::Rejection;
use crate::mapping::parse_time_str;

pub fn extract(doc: &Doc) -> Result<SourceEvent, Rejection> {
    let record = match doc {
        Doc::Object(_) if doc.get("sys_id").is_none() => match doc.get("result") {
            Some(r @ Doc::Object(_)) => r,
            Some(Doc::Array(_)) => {
                return Err(Rejection::shape("a Table API list (`result` is an array): post one record per event"))
            }
            _ => return Err(Rejection::shape("not a ServiceNow record: no `sys_id` (flat or under `result`)")),
        },
        Doc::Object(_) => doc,
        _ => return Err(Rejection::shape("a ServiceNow event is a JSON object")),
    };
    let sys_id =
        value(record, "sys_id").ok_or_else(|| Rejection::shape("not a ServiceNow record: `sys_id` is empty"))?;
    let table = value(record, "sys_class_name").or_else(|| value(doc, "table")).unwrap_or_else(|| "incident".into());
    let mod_count = value(record, "sys_mod_count");
    let event_id = match value(doc, "event_id") {
        Some(id) => id,
        None => match &mod_count {
            Some(n) => format!("{sys_id}:{n}"),
            None => {
                return Err(Rejection::missing_id("no `event_id` and no `sys_mod_count` to derive it from `sys_id`"))
            }
        },
    };
    let event_type = match value(doc, "event_type") {
        Some(t) => t,
        None => match mod_count.as_deref() {
            Some("0") => format!("{table}.created"),
            Some(_) => format!("{table}.updated"),
            None => {
                return Err(Rejection::shape(
                    "no `event_type` and no `sys_mod_count` to tell a new record from an update",
                ))
            }
        },
    };
    let event_type = checked_event_type(event_type, "ServiceNow event type")?;
    let updated = time_at(record, "sys_updated_on")?;
    let created = time_at(record, "sys_created_on")?;
    let time = updated.as_ref().or(created.as_ref()).and_then(Value::as_str).and_then(parse_time_str);

    let mut f = Fields::new();
    put(&mut f, "ticket_id", Some(Value::String(value(record, "number").unwrap_or_else(|| sys_id.clone()))));
    // An empty short description is still the record's subject.
    put(&mut f, "subject", record.get("short_description").and_then(Doc::text).map(Value::String));
    put(&mut f, "description", text(record, "description"));
    put(&mut f, "priority", value(record, "priority").map(|p| Value::String(priority(&p).into())));
    put(&mut f, "status", value(record, "state").map(|s| Value::String(state(&s))));
    put(&mut f, "ticket_type", value(record, "category").map(|c| Value::String(c.to_lowercase())));
    put(&mut f, "channel", value(record, "contact_type").map(|c| Value::String(c.to_lowercase())));
    put(&mut f, "requester", entity(text(record, "caller_id"), vec![("name", display(record, "caller_id"))]));
    put(&mut f, "organization", entity(text(record, "company"), vec![("name", display(record, "company"))]));
    put(&mut f, "assignee_id", text(record, "assigned_to"));
    put(&mut f, "group_id", text(record, "assignment_group"));
    put(&mut f, "impact", level(record, "impact")?);
    put(&mut f, "urgency", level(record, "urgency")?);
    put(&mut f, "created_at", created);
    put(&mut f, "updated_at", updated);
    // The Business Rule template sends the newest customer-visible journal entry as `comments`.
    put(&mut f, "latest_message", text(record, "comments").and_then(|body| object(vec![("body", Some(body))])));

    let mut ids = Fields::new();
    put(&mut ids, "number", text(record, "number"));
    put(&mut ids, "table", Some(Value::String(table.clone())));
    put(&mut ids, "instance", value(doc, "instance").map(Value::String).or_else(|| instance_from_links(record)));
    Ok(SourceEvent {
        event_id,
        event_type,
        entity_type: table,
        entity_id: sys_id,
        time,
        fields: f.into_map(),
        source_ids: ids.into_map(),
    })
}

/// A field's value: the string itself, or a reference's `value`; `None` when empty.
fn value(record: &Doc, key: &str) -> Option<String> {
    match record.get(key)? {
        r @ Doc::Object(_) => r.get("value").and_then(Doc::non_empty_text),
        v => v.non_empty_text(),
    }
}

fn text(record: &Doc, key: &str) -> Option<Value> {
    value(record, key).map(Value::String)
}

fn display(record: &Doc, key: &str) -> Option<Value> {
    record.get(key).and_then(|r| r.get("display_value")).and_then(Doc::non_empty_text).map(Value::String)
}

/// Impact and urgency are 1 (high) to 3 (low).
fn level(record: &Doc, key: &str) -> Result<Option<Value>, Rejection> {
    match value(record, key) {
        None => Ok(None),
        Some(s) => match s.trim().parse::<u8>() {
            Ok(n @ 1..=3) => Ok(Some(Value::from(n))),
            _ => Err(Rejection::invalid(format!("`{key}` must be 1, 2 or 3, found {s:?}"))),
        },
    }
}

fn priority(p: &str) -> &str {
    match p.trim() {
        "1" => "urgent",
        "2" => "high",
        "3" => "normal",
        "4" | "5" => "low",
        other => other,
    }
}

fn state(s: &str) -> String {
    match s.trim() {
        "1" => "new".into(),
        "2" => "in_progress".into(),
        "3" => "on_hold".into(),
        "6" => "resolved".into(),
        "7" => "closed".into(),
        "8" => "canceled".into(),
        other => other.to_lowercase(),
    }
}

/// The instance host, from the first reference link (`https://<host>/api/now/table/...`), so
/// write-back knows where the record lives even when the rule does not say.
fn instance_from_links(record: &Doc) -> Option<Value> {
    let fields = record.as_object()?;
    fields.iter().map(|(_, v)| v).find_map(|v| {
        let link = v.get("link")?.as_str()?;
        let rest = link.strip_prefix("https://").or_else(|| link.strip_prefix("http://"))?;
        let host = rest.split('/').next().filter(|h| !h.is_empty())?;
        Some(Value::String(host.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Reason;
    use serde_json::json;

    fn extract(v: Value) -> Result<SourceEvent, Rejection> {
        let bytes = serde_json::to_vec(&v).expect("bytes");
        super::extract(&Doc::parse(&bytes).expect("doc"))
    }

    #[test]
    fn identity_rules() {
        let e = extract(json!({"sys_id": "abc", "sys_mod_count": "3", "number": "INC1", "short_description": "x"}))
            .expect("ok");
        assert_eq!(
            (e.event_id.as_str(), e.event_type.as_str(), e.entity_type.as_str()),
            ("abc:3", "incident.updated", "incident")
        );
        let e = extract(json!({"result": {"sys_id": "abc", "sys_mod_count": "0"}})).expect("wrapped");
        assert_eq!(e.event_type, "incident.created");
        let e =
            extract(json!({"sys_id": "abc", "event_id": "evt-9", "event_type": "incident.resolved"})).expect("given");
        assert_eq!((e.event_id.as_str(), e.event_type.as_str()), ("evt-9", "incident.resolved"));
        assert_eq!(extract(json!({"sys_id": "abc"})).expect_err("no id").reason, Reason::MissingEventId);
        assert_eq!(extract(json!({"result": [{"sys_id": "a"}]})).expect_err("list").reason, Reason::UnknownEventShape);
        assert_eq!(extract(json!({"number": "INC1"})).expect_err("no sys_id").reason, Reason::UnknownEventShape);
        assert_eq!(
            extract(json!({"sys_id": "a", "sys_mod_count": "1", "impact": "9"})).expect_err("impact").reason,
            Reason::InvalidField
        );
    }
}
