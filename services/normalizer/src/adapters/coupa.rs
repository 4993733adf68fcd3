//! Coupa invoices (Core API, `Accept: application/json`): one invoice header object per raw
//! message, with Coupa's hyphenated keys (`invoice-number`, `updated-at`, `invoice-lines`),
//! integers as numbers, decimals as strings (`"35.14"`) and `null` for nil. The poller
//! publishes each invoice of a page as its own raw message.
//!
//! Identity: every invoice is an `invoice.received` event with id `<id>:<updated-at>` (the
//! `updated-at` text as Coupa sent it), so one state of an invoice is one event, re-polling it
//! is a duplicate, and a later change is a new event.
//!
//! `amount` is Coupa's `total-with-taxes` when the invoice carries it; otherwise it is computed
//! exactly (decimal arithmetic) the way Coupa defines that total: the sum of the line totals
//! plus shipping, handling and misc charges plus the tax (the header `tax-amount`, or the
//! lines' tax amounts under line-level taxation). `purchase_order_id` is the purchase order of
//! the first line that references one; every line also carries its own.

use serde_json::{Map, Value};

use super::{put, text_at, time_at, Fields, SourceEvent};
use crate::doc::Doc;
use crate::error::Rejection;
use crate::mapping::{self, get, Decimal};

/// Every path [`extract`] reads (see [`Adapter::select`](super::Adapter::select)); a path
/// read without being listed here would read as missing. The `selection_reads_what_extract_reads`
/// test guards the list.
pub const READS: &[&str] = &[
    "id",
    "updated-at",
    "invoice-number",
    "invoice-date",
    "status",
    "supplier.id",
    "supplier.name",
    "supplier.primary-address.country.code",
    "currency.code",
    "payment-term.code",
    "account-type.name",
    "tax-amount",
    "total-with-taxes",
    "shipping-amount",
    "handling-amount",
    "misc-amount",
    "line-level-taxation",
    "invoice-lines.line-num",
    "invoice-lines.description",
    "invoice-lines.quantity",
    "invoice-lines.price",
    "invoice-lines.total",
    "invoice-lines.tax-amount",
    "invoice-lines.uom.code",
    "invoice-lines.order-header-num",
    "invoice-lines.order-line-num",
    "invoice-lines.account.code",
    "invoice-lines.commodity.name",
    "invoice-lines.item.commodity.name",
    // Only looked for to explain a rejection (snake_case: the Supplier Portal API).
    "invoice_number",
    "invoice_lines",
];

pub fn extract(doc: &Doc) -> Result<SourceEvent, Rejection> {
    match doc {
        Doc::Object(_) => {}
        Doc::Array(_) => return Err(Rejection::shape("a page of invoices: publish one invoice per message")),
        _ => return Err(Rejection::shape("a Coupa invoice is a JSON object")),
    }
    if !["invoice-number", "invoice-lines", "supplier", "updated-at"].iter().any(|k| doc.get(k).is_some()) {
        let hint = if doc.get("invoice_number").is_some() || doc.get("invoice_lines").is_some() {
            " (snake_case keys: this looks like the Coupa Supplier Portal API; map it with a `mapped` source)"
        } else {
            ""
        };
        return Err(Rejection::shape(format!(
            "not a Coupa Core API invoice: no `invoice-number`, `invoice-lines`, `supplier` or `updated-at`{hint}"
        )));
    }
    let id =
        doc.get("id").and_then(Doc::non_empty_text).ok_or_else(|| Rejection::missing_id("invoice without `id`"))?;
    let updated_raw = doc
        .get("updated-at")
        .and_then(Doc::non_empty_text)
        .ok_or_else(|| Rejection::missing_id("invoice without `updated-at` (the event id is `<id>:<updated-at>`)"))?;
    let time = mapping::parse_time_str(&updated_raw)
        .ok_or_else(|| Rejection::invalid(format!("`updated-at` is not a timestamp: {updated_raw:?}")))?;

    let lines = match doc.get("invoice-lines") {
        None | Some(Doc::Null) => Vec::new(),
        Some(Doc::Array(lines)) => lines.iter().collect(),
        Some(other) => return Err(Rejection::invalid(format!("`invoice-lines` must be a list, found {other}"))),
    };
    let mut items = Vec::with_capacity(lines.len());
    let mut purchase_order = None;
    for (i, line) in lines.iter().enumerate() {
        let item = line_item(i, line)?;
        if purchase_order.is_none() {
            purchase_order = item.get("purchase_order_id").cloned();
        }
        items.push(Value::Object(item));
    }

    // The fallible reads in the order their errors take precedence; then the fields in key
    // order, which is the map's, so building it sorts nothing.
    let invoice_date = time_at(doc, "invoice-date")?;
    let tax_amount = decimal(doc, "tax-amount")?.and_then(Decimal::to_json);
    let amount = amount(doc, &lines)?.and_then(Decimal::to_json);
    let invoice_number = text_at(doc, "invoice-number");
    let vendor_id = text_at(doc, "supplier.id");
    let mut f = Fields::new();
    put(&mut f, "amount", amount);
    // Not in the invoice-review schema, but useful for routes and for mapping `policy_region`.
    put(&mut f, "chart_of_accounts", text_at(doc, "account-type.name"));
    put(&mut f, "currency", text_at(doc, "currency.code"));
    put(&mut f, "invoice_date", invoice_date);
    put(&mut f, "invoice_id", Some(Value::String(id.clone())));
    put(&mut f, "invoice_number", invoice_number.clone());
    put(&mut f, "line_items", Some(Value::Array(items)));
    put(&mut f, "payment_terms", text_at(doc, "payment-term.code"));
    put(&mut f, "purchase_order_id", purchase_order);
    put(&mut f, "status", text_at(doc, "status"));
    put(&mut f, "supplier_country", text_at(doc, "supplier.primary-address.country.code"));
    put(&mut f, "tax_amount", tax_amount);
    put(&mut f, "vendor_id", vendor_id.clone());
    put(&mut f, "vendor_name", text_at(doc, "supplier.name"));

    let mut ids = Fields::new();
    put(&mut ids, "invoice_number", invoice_number);
    put(&mut ids, "supplier_id", vendor_id);
    Ok(SourceEvent {
        event_id: format!("{id}:{updated_raw}"),
        event_type: "invoice.received".into(),
        entity_type: "invoice".into(),
        entity_id: id,
        time: Some(time),
        fields: f.into_map(),
        source_ids: ids.into_map(),
    })
}

fn decimal(doc: &Doc, path: &str) -> Result<Option<Decimal>, Rejection> {
    match get(doc, path) {
        None | Some(Doc::Null) => Ok(None),
        Some(Doc::String(s)) if s.trim().is_empty() => Ok(None),
        Some(v) => Decimal::from_doc(v)
            .map(Some)
            .ok_or_else(|| Rejection::invalid(format!("`{path}` is not a decimal amount: {v}"))),
    }
}

fn number(doc: &Doc, path: &str) -> Result<Option<Value>, Rejection> {
    Ok(decimal(doc, path)?.and_then(Decimal::to_json))
}

fn integer(doc: &Doc, path: &str) -> Result<Option<Value>, Rejection> {
    match decimal(doc, path)? {
        None => Ok(None),
        Some(d) => match d.to_json() {
            Some(v @ Value::Number(_)) if v.is_i64() => Ok(Some(v)),
            _ => Err(Rejection::invalid(format!("`{path}` must be a whole number"))),
        },
    }
}

fn line_item(i: usize, line: &Doc) -> Result<Map<String, Value>, Rejection> {
    if !line.is_object() {
        return Err(Rejection::invalid(format!("`invoice-lines[{i}]` must be an object, found {line}")));
    }
    let at = |r: Result<Option<Value>, Rejection>| {
        r.map_err(|e| Rejection::invalid(format!("invoice-lines[{i}]: {}", e.detail)))
    };
    // As in `extract`: errors in reading order, fields in key order.
    let line_num = at(integer(line, "line-num"))?;
    let quantity = at(number(line, "quantity"))?;
    let price = at(number(line, "price"))?;
    let total = at(number(line, "total"))?;
    let purchase_order_line = at(integer(line, "order-line-num"))?;
    let mut m = Fields::new();
    put(&mut m, "account_code", text_at(line, "account.code"));
    put(&mut m, "commodity", text_at(line, "commodity.name").or_else(|| text_at(line, "item.commodity.name")));
    put(&mut m, "description", text_at(line, "description"));
    put(&mut m, "line_num", line_num);
    put(&mut m, "price", price);
    put(&mut m, "purchase_order_id", text_at(line, "order-header-num"));
    put(&mut m, "purchase_order_line", purchase_order_line);
    put(&mut m, "quantity", quantity);
    put(&mut m, "total", total);
    put(&mut m, "uom", text_at(line, "uom.code"));
    Ok(m.into_map())
}

/// The invoice total (see the module doc); `None` when the invoice has neither
/// `total-with-taxes` nor lines with totals.
fn amount(doc: &Doc, lines: &[&Doc]) -> Result<Option<Decimal>, Rejection> {
    if let Some(total) = decimal(doc, "total-with-taxes")? {
        return Ok(Some(total));
    }
    if lines.is_empty() {
        return Ok(None);
    }
    let overflow = || Rejection::invalid("invoice amounts overflow");
    let line_level = matches!(doc.get("line-level-taxation"), Some(Doc::Bool(true)))
        || doc.get("line-level-taxation").and_then(Doc::as_str) == Some("true");
    let mut sum = Decimal::ZERO;
    for (i, line) in lines.iter().enumerate() {
        let total =
            decimal(line, "total")?.ok_or_else(|| Rejection::invalid(format!("invoice-lines[{i}] has no `total`")))?;
        sum = sum.checked_add(total).ok_or_else(overflow)?;
        if line_level {
            if let Some(tax) = decimal(line, "tax-amount")? {
                sum = sum.checked_add(tax).ok_or_else(overflow)?;
            }
        }
    }
    let charges = ["shipping-amount", "handling-amount", "misc-amount", "tax-amount"];
    for c in &charges[..if line_level { 3 } else { 4 }] {
        if let Some(v) = decimal(doc, c)? {
            sum = sum.checked_add(v).ok_or_else(overflow)?;
        }
    }
    Ok(Some(sum))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Reason;
    use serde_json::json;

    fn invoice() -> Value {
        json!({
            "id": 9, "invoice-number": "INV-9", "updated-at": "2024-03-01T10:00:00+01:00",
            "supplier": {"id": 17, "name": "Insight"}, "currency": {"code": "EUR"},
            "tax-amount": "19.00", "shipping-amount": "5.5", "line-level-taxation": false,
            "invoice-lines": [
                {"line-num": 1, "total": "100.00", "price": "50.00", "quantity": "2.0", "order-header-num": null},
                {"line-num": 2, "total": "0.10", "order-header-num": 77, "order-line-num": 3}
            ]
        })
    }

    fn extract(v: &Value) -> Result<SourceEvent, Rejection> {
        let bytes = serde_json::to_vec(v).expect("bytes");
        super::extract(&Doc::parse(&bytes).expect("doc"))
    }

    #[test]
    fn identity_and_amount() {
        let e = extract(&invoice()).expect("ok");
        assert_eq!(e.event_id, "9:2024-03-01T10:00:00+01:00");
        assert_eq!(e.event_type, "invoice.received");
        assert_eq!(e.fields["amount"], json!(124.6));
        assert_eq!(e.fields["purchase_order_id"], json!("77"));
        assert_eq!(e.fields["line_items"][0]["quantity"], json!(2));
        assert_eq!(e.fields["vendor_id"], json!("17"));
        let mut with_total = invoice();
        with_total["total-with-taxes"] = json!("130.00");
        assert_eq!(extract(&with_total).expect("ok").fields["amount"], json!(130));
    }

    #[test]
    fn rejections() {
        let mut no_updated = invoice();
        no_updated.as_object_mut().expect("obj").remove("updated-at");
        assert_eq!(extract(&no_updated).expect_err("id").reason, Reason::MissingEventId);
        let mut bad = invoice();
        bad["invoice-lines"][1]["total"] = json!("ten");
        let err = extract(&bad).expect_err("bad amount");
        assert_eq!(err.reason, Reason::InvalidField);
        assert!(err.detail.contains("invoice-lines[1]"), "{}", err.detail);
        assert_eq!(extract(&json!([invoice()])).expect_err("page").reason, Reason::UnknownEventShape);
        let csp = json!({"id": "680fa552", "invoice_number": "x", "updated_at": "2025-08-14T12:30:55Z"});
        let err = extract(&csp).expect_err("csp");
        assert!(err.detail.contains("Supplier Portal"), "{}", err.detail);
    }
}
