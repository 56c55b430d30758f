//! History (decided and pending requests) and the audit trail: search, filter, export the
//! current filter as JSON Lines or CSV, and the audit chain's verification status.

use airlock_proto::v1::{HeldRequest, ListRequestsRequest};
use axum::{
    extract::{Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
};
use maud::{html, Markup};
use serde::{Deserialize, Serialize};

use super::{page, requests::admin, session::Session, Web, WebError};
use crate::audit;

/// Most rows a page or an export holds.
const MAX_ROWS: usize = 5000;

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
}

/// `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM` (UTC) as Unix ms; `end` moves a bare day to its end.
fn parse_time(field: &str, text: &str, end: bool) -> Result<Option<i64>, WebError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let minute = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]");
    let day = time::macros::format_description!("[year]-[month]-[day]");
    let at = if let Ok(t) = time::PrimitiveDateTime::parse(text, &minute) {
        t.assume_utc()
    } else if let Ok(d) = time::Date::parse(text, &day) {
        let t = d.midnight().assume_utc();
        if end {
            t + time::Duration::days(1)
        } else {
            t
        }
    } else {
        return Err(WebError(
            StatusCode::BAD_REQUEST,
            format!("{field} {text:?}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC)"),
        ));
    };
    Ok(Some((at.unix_timestamp_nanos() / 1_000_000) as i64))
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
        other => {
            return Err(WebError(
                StatusCode::BAD_REQUEST,
                format!("decision {other:?}: use pending, approved, denied, expired or cancelled"),
            ))
        }
    })
}

/// Requests matching `f`, newest first (at most [`MAX_ROWS`]).
pub fn search(web: &Web, f: &HistoryFilter) -> Result<Vec<HeldRequest>, WebError> {
    let from = parse_time("from", &f.from, false)?;
    let to = parse_time("to", &f.to, true)?;
    let mut q = ListRequestsRequest {
        state: state_code(&f.decision)?,
        account: f.account.trim().to_owned(),
        limit: 500,
        ..Default::default()
    };
    let mut out = Vec::new();
    loop {
        let (page, next) = web.plane.store.list(&q)?;
        let mut older = false;
        for h in page {
            if from.is_some_and(|t| h.received_unix_ms < t) {
                older = true;
                break;
            }
            let host = f.host.trim();
            let keep = to.is_none_or(|t| h.received_unix_ms < t)
                && (host.is_empty() || h.hostname == host || h.host_id == host)
                && (f.rule.trim().is_empty() || page::rule(&h) == f.rule.trim())
                && (f.approver.trim().is_empty()
                    || h.votes.iter().any(|v| v.approver == f.approver.trim()));
            if keep {
                out.push(h);
                if out.len() >= MAX_ROWS {
                    return Ok(out);
                }
            }
        }
        if older || next.is_empty() {
            return Ok(out);
        }
        q.page_token = next;
    }
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
    let rows = search(&web, &f)?;
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
            p.hint { (rows.len()) " request(s)" }
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
        },
    ))
}

#[derive(Deserialize)]
pub(super) struct Format {
    #[serde(default)]
    format: String,
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
    id: &'a str,
    received: String,
    host: &'a str,
    account: String,
    what: String,
    rule: &'a str,
    risk: &'a str,
    decision: &'static str,
    decided_by: &'a str,
    reason: &'a str,
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
    let rows = search(&web, &f)?;
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
            w.serialize(HistoryRow {
                id: page::id(h),
                received: page::time(h.received_unix_ms),
                host: &h.hostname,
                account: page::account(h),
                what: page::what(h),
                rule: page::rule(h),
                risk: page::risk(h),
                decision: crate::store::state_name(h.state()),
                decided_by: &h.decided_by,
                reason: &h.reason,
                decided: page::time(h.decided_unix_ms),
                votes: votes.join(" "),
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
}

fn audit_records(web: &Web, f: &AuditFilter) -> Result<Vec<audit::Record>, WebError> {
    let some = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
    let filter = audit::Filter {
        request_id: some(&f.request),
        actor: some(&f.actor),
        action: some(&f.action),
        since_ms: parse_time("from", &f.from, false)?,
        until_ms: parse_time("to", &f.to, true)?,
        limit: None,
    };
    let mut records = web.plane.store.audit_query(&filter)?;
    // Newest first on screen and in exports; keep at most MAX_ROWS of the newest.
    records.reverse();
    records.truncate(MAX_ROWS);
    Ok(records)
}

/// GET /audit.
pub(super) async fn audit(
    State(web): State<Web>,
    s: Session,
    Query(f): Query<AuditFilter>,
) -> Result<Markup, WebError> {
    let records = audit_records(&web, &f)?;
    let verified = web.plane.store.verify_audit();
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
    let mut records = audit_records(&web, &f)?;
    // Exports keep the chain's order, so a reader can re-verify it.
    records.reverse();
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
}
