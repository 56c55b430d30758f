//! History (decided and pending requests) and the audit trail: search, filter, export the
//! current filter as JSON Lines or CSV, and the audit chain's verification status.

use std::borrow::Cow;

use airlock_proto::v1::HeldRequest;
use axum::{
    extract::{Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
};
use maud::{html, Markup};
use serde::{Deserialize, Serialize};

use super::{page, requests::admin, session::Session, Web, WebError};
use crate::{
    audit,
    display::csv_text,
    store::{requests::History, trail::Page},
};

/// Rows on one page.
const PAGE: u32 = 100;

/// Most rows an export holds.
const MAX_EXPORT: usize = 100_000;

/// The history filter, from the query string.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct HistoryFilter {
    /// Host name or host id.
    #[serde(default)]
    pub host: String,
    /// Account.
    #[serde(default)]
    pub account: String,
    /// Agent rule.
    #[serde(default)]
    pub rule: String,
    /// pending, approved, denied, expired or cancelled.
    #[serde(default)]
    pub decision: String,
    /// An approver who voted.
    #[serde(default)]
    pub approver: String,
    /// From this day or minute (UTC).
    #[serde(default)]
    pub from: String,
    /// Until this day or minute (UTC), inclusive of that day.
    #[serde(default)]
    pub to: String,
    /// Where the page starts (the `next` of the page before).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub page: String,
}

/// `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM` (UTC) as Unix ms; `end` moves a bare day to its end.
fn parse_time(field: &str, text: &str, end: bool) -> Result<Option<i64>, WebError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let minute = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]");
    let day = time::macros::format_description!("[year]-[month]-[day]");
    let ms = |t: time::OffsetDateTime| (t.unix_timestamp_nanos() / 1_000_000) as i64;
    if let Ok(t) = time::PrimitiveDateTime::parse(text, &minute) {
        Ok(Some(ms(t.assume_utc())))
    } else if let Ok(d) = time::Date::parse(text, &day) {
        // The day's end added in milliseconds, not as a `time` date: the day after 9999-12-31
        // is past `time`'s range, and its `+` panicked (found by fuzzing).
        let start = ms(d.midnight().assume_utc());
        Ok(Some(if end { start + 86_400_000 } else { start }))
    } else {
        Err(WebError(
            StatusCode::BAD_REQUEST,
            format!("{field} {text:?}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC)"),
        ))
    }
}

fn state_code(name: &str) -> Result<i32, WebError> {
    use airlock_proto::v1::RequestState as S;
    Ok(match name {
        "" => 0,
        "pending" => S::Pending as i32,
        "approved" => S::Approved as i32,
        "denied" => S::Denied as i32,
        "expired" => S::Expired as i32,
        "cancelled" => S::Cancelled as i32,
        "observed" => S::Observed as i32,
        other => {
            return Err(WebError(
                StatusCode::BAD_REQUEST,
                format!(
                "decision {other:?}: use pending, approved, denied, expired, cancelled or observed"
            ),
            ))
        }
    })
}

impl HistoryFilter {
    /// The filter as the store takes it.
    fn query(&self) -> Result<History, WebError> {
        Ok(History {
            host: self.host.trim().to_owned(),
            account: self.account.trim().to_owned(),
            rule: self.rule.trim().to_owned(),
            state: state_code(self.decision.trim())?,
            approver: self.approver.trim().to_owned(),
            from_ms: parse_time("from", &self.from, false)?,
            to_ms: parse_time("to", &self.to, true)?,
        })
    }
}

/// One page of requests matching `f`, newest first, and the next page's token.
pub async fn search(web: &Web, f: &HistoryFilter) -> Result<(Vec<HeldRequest>, String), WebError> {
    Ok(web.plane.store.history(&f.query()?, &f.page, PAGE).await?)
}

/// Every request matching `f`, newest first, at most [`MAX_EXPORT`].
async fn search_all(web: &Web, f: &HistoryFilter) -> Result<Vec<HeldRequest>, WebError> {
    let q = f.query()?;
    let mut all = Vec::new();
    let mut page = String::new();
    loop {
        let (rows, next) = web.plane.store.history(&q, &page, 1000).await?;
        all.extend(rows);
        if next.is_empty() || all.len() >= MAX_EXPORT {
            all.truncate(MAX_EXPORT);
            return Ok(all);
        }
        page = next;
    }
}

/// A link to the page after this one, keeping the filter.
fn older<T: Serialize>(path: &str, f: &T, next: &str) -> Markup {
    if next.is_empty() {
        return html! {};
    }
    let q = serde_urlencoded::to_string(f).unwrap_or_default();
    let sep = if q.is_empty() { "" } else { "&" };
    html! { p { a.older href=(format!("{path}?{q}{sep}page={next}")) { "Older" } } }
}

fn filter_form(action: &str, fields: &[(&str, &str, &str)], export: &str) -> Markup {
    html! {
        form.filters method="get" action=(action) {
            @for (name, label, value) in fields {
                label { (label) input name=(name) value=(value); }
            }
            button type="submit" { "Search" }
            a href=(format!("{export}&format=jsonl")) { "Export JSON Lines" }
            a href=(format!("{export}&format=csv")) { "Export CSV" }
        }
    }
}

fn query_string<T: Serialize>(f: &T) -> String {
    serde_urlencoded::to_string(f).unwrap_or_default()
}

/// GET /history.
pub(super) async fn history(
    State(web): State<Web>,
    s: Session,
    Query(f): Query<HistoryFilter>,
) -> Result<Markup, WebError> {
    let (rows, next) = search(&web, &f).await?;
    let page_token = f.page.clone();
    let f = HistoryFilter {
        page: String::new(),
        ..f
    };
    let export = format!("/history/export?{}", query_string(&f));
    Ok(page::layout(
        &s,
        "History",
        admin(&web, &s),
        html! {
            h1 { "History" }
            (filter_form("/history", &[
                ("host", "Host", &f.host), ("account", "Account", &f.account),
                ("rule", "Rule", &f.rule), ("decision", "Decision", &f.decision),
                ("approver", "Approver", &f.approver),
                ("from", "From (UTC)", &f.from), ("to", "To (UTC)", &f.to),
            ], &export))
            p.hint { (rows.len()) " request(s)" @if !page_token.is_empty() { " (older page)" } }
            table.list #history {
                thead { tr { th { "Received" } th { "Host" } th { "Account" } th { "What" } th { "Rule" } th { "Decision" } th { "By" } th { "Reason" } } }
                tbody { @for h in &rows { tr {
                    td data-label="Received" { (page::time(h.received_unix_ms)) }
                    td data-label="Host" { (h.hostname) }
                    td data-label="Account" { (page::account(h)) }
                    td data-label="What" { a href={ "/requests/" (page::id(h)) } { code { (page::what(h)) } } }
                    td data-label="Rule" { (page::rule(h)) }
                    td data-label="Decision" { (page::state(h)) }
                    td data-label="By" { (h.decided_by) }
                    td data-label="Reason" { (h.reason) }
                } } }
            }
            (older("/history", &f, &next))
        },
    ))
}

#[derive(Deserialize)]
pub(super) struct Format {
    #[serde(default)]
    format: String,
}

/// Fuzzing: a history filter as the store would get it.
#[cfg(feature = "fuzzing")]
pub(super) fn fuzz_history_filter(f: &HistoryFilter) -> bool {
    f.query().is_ok()
}

/// Fuzzing: an audit filter as the store would get it.
#[cfg(feature = "fuzzing")]
pub(super) fn fuzz_audit_filter(f: &AuditFilter) -> bool {
    audit_filter(f).is_ok()
}

/// Fuzzing: an export format.
#[cfg(feature = "fuzzing")]
pub(super) fn fuzz_format(f: &Format) -> bool {
    check_format(&f.format).is_ok()
}

fn download(name: &str, format: &str, body: String) -> Response {
    let mime = if format == "csv" {
        "text/csv; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    let ext = if format == "csv" { "csv" } else { "jsonl" };
    (
        [
            (header::CONTENT_TYPE, mime.to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}.{ext}\""),
            ),
        ],
        body,
    )
        .into_response()
}

fn check_format(format: &str) -> Result<(), WebError> {
    match format {
        "jsonl" | "csv" => Ok(()),
        other => Err(WebError(
            StatusCode::BAD_REQUEST,
            format!("format {other:?}: use jsonl or csv"),
        )),
    }
}

/// One history row in CSV.
#[derive(Serialize)]
struct HistoryRow<'a> {
    id: Cow<'a, str>,
    received: String,
    host: Cow<'a, str>,
    account: String,
    what: String,
    rule: Cow<'a, str>,
    risk: Cow<'a, str>,
    decision: &'static str,
    decided_by: Cow<'a, str>,
    reason: Cow<'a, str>,
    decided: String,
    votes: String,
}

/// GET /history/export?format=jsonl|csv and the history filter.
pub(super) async fn history_export(
    State(web): State<Web>,
    _s: Session,
    Query(fmt): Query<Format>,
    Query(f): Query<HistoryFilter>,
) -> Result<Response, WebError> {
    check_format(&fmt.format)?;
    let rows = search_all(&web, &f).await?;
    let body = if fmt.format == "csv" {
        let mut w = csv::Writer::from_writer(Vec::new());
        for h in &rows {
            let votes: Vec<String> = h
                .votes
                .iter()
                .map(|v| {
                    format!(
                        "{}:{}",
                        v.approver,
                        if v.verdict == 1 { "approve" } else { "deny" }
                    )
                })
                .collect();
            // Every text cell that agents or approvers wrote goes through csv_text: a request
            // whose argv[0] is `=HYPERLINK(...)` must open as text in a spreadsheet.
            let text = |s: String| csv_text(&s).into_owned();
            w.serialize(HistoryRow {
                id: csv_text(page::id(h)),
                received: page::time(h.received_unix_ms),
                host: csv_text(&h.hostname),
                account: text(page::account(h)),
                what: text(page::what(h)),
                rule: csv_text(page::rule(h)),
                risk: csv_text(page::risk(h)),
                decision: crate::types::state_name(h.state()),
                decided_by: csv_text(&h.decided_by),
                reason: csv_text(&h.reason),
                decided: page::time(h.decided_unix_ms),
                votes: text(votes.join(" ")),
            })
            .map_err(|e| WebError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        }
        let bytes = w
            .into_inner()
            .map_err(|e| WebError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        String::from_utf8_lossy(&bytes).into_owned()
    } else {
        rows.iter()
            .filter_map(|h| serde_json::to_string(h).ok())
            .map(|l| l + "\n")
            .collect()
    };
    Ok(download("airlock-history", &fmt.format, body))
}

/// The audit filter, from the query string.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct AuditFilter {
    /// Who acted.
    #[serde(default)]
    pub actor: String,
    /// Action, or a prefix ending in `*` (`request.*`).
    #[serde(default)]
    pub action: String,
    /// Request id.
    #[serde(default)]
    pub request: String,
    /// From (UTC).
    #[serde(default)]
    pub from: String,
    /// Until (UTC).
    #[serde(default)]
    pub to: String,
    /// Where the page starts: records before this sequence number.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub page: String,
}

fn audit_filter(f: &AuditFilter) -> Result<audit::Filter, WebError> {
    let some = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
    Ok(audit::Filter {
        request_id: some(&f.request),
        actor: some(&f.actor),
        action: some(&f.action),
        since_ms: parse_time("from", &f.from, false)?,
        until_ms: parse_time("to", &f.to, true)?,
        limit: None,
    })
}

/// One page of records matching `f`, newest first, and the next page's token.
async fn audit_records(
    web: &Web,
    f: &AuditFilter,
) -> Result<(Vec<audit::Record>, String), WebError> {
    let before = match f.page.as_str() {
        "" => i64::MAX,
        p => p.parse().map_err(|_| {
            WebError(
                StatusCode::BAD_REQUEST,
                format!("page {p:?}: use the link under the table"),
            )
        })?,
    };
    let mut filter = audit_filter(f)?;
    filter.limit = Some(PAGE + 1);
    let mut records = web
        .plane
        .store
        .audit_page(&filter, Page::Before(before))
        .await?;
    let more = records.len() > PAGE as usize;
    records.truncate(PAGE as usize);
    let next = match records.last() {
        Some(r) if more => r.seq.to_string(),
        _ => String::new(),
    };
    Ok((records, next))
}

/// GET /audit.
pub(super) async fn audit(
    State(web): State<Web>,
    s: Session,
    Query(f): Query<AuditFilter>,
) -> Result<Markup, WebError> {
    let (records, next) = audit_records(&web, &f).await?;
    let verified = web.plane.verifier.check().await;
    let f = AuditFilter {
        page: String::new(),
        ..f
    };
    let export = format!("/audit/export?{}", query_string(&f));
    Ok(page::layout(
        &s,
        "Audit",
        admin(&web, &s),
        html! {
            h1 { "Audit trail" }
            @match &verified {
                Ok(n) => p.ok #audit-status { "Hash chain verified: " (n) " records, unchanged." }
                Err(e) => p.error #audit-status role="alert" { "Hash chain does NOT verify: " (e) }
            }
            (filter_form("/audit", &[
                ("actor", "Actor", &f.actor), ("action", "Action", &f.action),
                ("request", "Request", &f.request),
                ("from", "From (UTC)", &f.from), ("to", "To (UTC)", &f.to),
            ], &export))
            table.list #audit {
                thead { tr { th { "#" } th { "At" } th { "Actor" } th { "Action" } th { "Request" } th { "Details" } } }
                tbody { @for r in &records { tr {
                    td data-label="#" { (r.seq) }
                    td data-label="At" { (page::time(r.at_ms)) }
                    td data-label="Actor" { (r.actor) }
                    td data-label="Action" { (r.action) }
                    td data-label="Request" { @if !r.request_id.is_empty() { a href={ "/requests/" (r.request_id) } { (r.request_id) } } }
                    td data-label="Details" { code { (r.payload) } }
                } } }
            }
            (older("/audit", &f, &next))
        },
    ))
}

/// GET /audit/export?format=jsonl|csv and the audit filter.
pub(super) async fn audit_export(
    State(web): State<Web>,
    _s: Session,
    Query(fmt): Query<Format>,
    Query(f): Query<AuditFilter>,
) -> Result<Response, WebError> {
    check_format(&fmt.format)?;
    // Exports keep the chain's order, so a reader can re-verify it.
    let mut filter = audit_filter(&f)?;
    filter.limit = Some(5000);
    let mut records = Vec::new();
    loop {
        let after = records.last().map_or(0, |r: &audit::Record| r.seq);
        let page = web
            .plane
            .store
            .audit_page(&filter, Page::After(after))
            .await?;
        let done = page.len() < 5000;
        records.extend(page);
        if done || records.len() >= MAX_EXPORT {
            records.truncate(MAX_EXPORT);
            break;
        }
    }
    let body = if fmt.format == "csv" {
        audit::to_csv(&records)
            .map_err(|e| WebError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    } else {
        audit::to_json_lines(&records)
    };
    Ok(download("airlock-audit", &fmt.format, body))
}

#[cfg(test)]
mod tests {
    use super::parse_time;

    #[test]
    fn times_parse_as_utc_and_errors_name_the_field() {
        assert_eq!(
            parse_time("from", "2026-11-22", false).ok().flatten(),
            Some(1_795_305_600_000)
        );
        assert_eq!(
            parse_time("to", "2026-11-22", true).ok().flatten(),
            Some(1_795_305_600_000 + 86_400_000)
        );
        assert_eq!(
            parse_time("from", "2026-11-22T01:30", false).ok().flatten(),
            Some(1_795_305_600_000 + 5_400_000)
        );
        let e = parse_time("to", "yesterday", false).err().unwrap();
        assert!(e.1.starts_with("to \"yesterday\""), "{}", e.1);
    }

    /// The web_form fuzz target's crash: `to=9999-12-31` panicked the history and audit pages.
    #[test]
    fn the_last_day_time_knows_is_a_filter_end_not_a_panic() {
        let f: super::HistoryFilter = serde_urlencoded::from_bytes(b"to=9999-12-31").unwrap();
        assert_eq!(
            f.query().ok().and_then(|q| q.to_ms),
            Some(253_402_300_800_000)
        );
        let f: super::AuditFilter = serde_urlencoded::from_bytes(b"to=9999-12-31").unwrap();
        assert_eq!(
            super::audit_filter(&f).ok().and_then(|a| a.until_ms),
            Some(253_402_300_800_000)
        );
    }
}
