//! Sources described entirely by configuration (`kind: mapped`): the mapping's identity
//! rules give the event id, type, entity and time; its `fields` and `source_fields` are
//! applied afterwards by the pipeline, exactly as for the built-in adapters.

use serde_json::Map;

use super::{checked_event_type, SourceEvent};
use crate::doc::Doc;
use crate::error::{Reason, Rejection};
use crate::mapping::{self, CompiledMapping, CompiledRule, MappingError};

fn mapping_failed(e: MappingError) -> Rejection {
    Rejection::new(Reason::MappingFailed, e.to_string())
}

/// The text of an identity rule's value; `None` when missing.
fn ident(rule: Option<&CompiledRule>, doc: &Doc) -> Result<Option<String>, Rejection> {
    let Some(rule) = rule else { return Ok(None) };
    match rule.eval(doc).map_err(mapping_failed)? {
        None => Ok(None),
        Some(v) => match mapping::non_empty_text(&v) {
            Some(s) => Ok(Some(s)),
            None if v.is_string() => Ok(None),
            None => Err(Rejection::new(
                Reason::MappingFailed,
                format!("an identity value must be text or a number, found {v}"),
            )),
        },
    }
}

pub fn extract(m: &CompiledMapping, doc: &Doc) -> Result<SourceEvent, Rejection> {
    if !doc.is_object() {
        return Err(Rejection::shape("a mapped source's event is a JSON object"));
    }
    let event_id =
        ident(m.event_id.as_ref(), doc)?.ok_or_else(|| Rejection::missing_id("the `event_id` rule found no value"))?;
    let event_type = ident(m.event_type.as_ref(), doc)?
        .ok_or_else(|| Rejection::new(Reason::MappingFailed, "the `event_type` rule found no value"))?;
    let event_type = checked_event_type(event_type, "mapped event type")
        .map_err(|r| Rejection::new(Reason::MappingFailed, r.detail))?;
    let entity_type = ident(m.entity_type.as_ref(), doc)?
        .ok_or_else(|| Rejection::new(Reason::MappingFailed, "the `entity_type` rule found no value"))?;
    let entity_id = ident(m.entity_id.as_ref(), doc)?
        .ok_or_else(|| Rejection::new(Reason::MappingFailed, "the `entity_id` rule found no value"))?;
    let time = match &m.time {
        None => None,
        Some(rule) => match rule.eval(doc).map_err(mapping_failed)? {
            None => None,
            Some(v) => Some(
                mapping::parse_time(&v)
                    .ok_or_else(|| Rejection::invalid(format!("the `time` rule gave {v}, not a timestamp")))?,
            ),
        },
    };
    Ok(SourceEvent { event_id, event_type, entity_type, entity_id, time, fields: Map::new(), source_ids: Map::new() })
}
