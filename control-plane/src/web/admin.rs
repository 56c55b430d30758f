//! Agents, the policy in force, and (for admins) the notification delivery log.

use axum::{extract::State, http::StatusCode};
use maud::{html, Markup};

use super::{page, requests::admin, session::Session, Web, WebError};

/// GET /agents: every agent that ever connected, live ones first.
pub(super) async fn agents(State(web): State<Web>, s: Session) -> Result<Markup, WebError> {
    let mut rows = web.plane.store.agents().await?;
    rows.sort_by_key(|a| (!a.connected, -a.last_seen_ms));
    let connected = rows.iter().filter(|a| a.connected).count();
    Ok(page::layout(
        &s,
        "Agents",
        admin(&web, &s),
        html! {
            h1 { "Agents" }
            p.hint { (connected) " connected, " (rows.len()) " known" }
            table.list #agents {
                thead { tr { th { "Host" } th { "Status" } th { "Last seen" } th { "First seen" } th { "Version" } th { "Labels" } } }
                tbody { @for a in &rows { tr {
                    td data-label="Host" { (a.hello.hostname) " " small { (a.hello.host_id) } }
                    td data-label="Status" { @if a.connected { span.badge.approved { "connected" } } @else { span.badge.expired { "offline" } } }
                    td data-label="Last seen" { (page::time(a.last_seen_ms)) }
                    td data-label="First seen" { (page::time(a.first_seen_ms)) }
                    td data-label="Version" { (a.hello.version) }
                    td data-label="Labels" { @for (k, v) in &a.hello.labels { span.label { (k) "=" (v) } " " } }
                } } }
            }
        },
    ))
}

/// GET /policy: rules and groups in force, when they were loaded, and the last refused file.
pub(super) async fn policy(State(web): State<Web>, s: Session) -> Result<Markup, WebError> {
    let status = web
        .plane
        .policy_status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let policy = crate::policy::current(&web.plane.policy);
    Ok(page::layout(
        &s,
        "Policy",
        admin(&web, &s),
        html! {
            h1 { "Approval policy" }
            @if status.path.is_empty() {
                p { "No policy file: any one approver decides any request." }
            } @else {
                p { "From " code { (status.path) } ", loaded " (page::time(status.loaded_unix_ms)) "." }
            }
            @if !status.last_error.is_empty() {
                p.error role="alert" #policy-error { "Last reload refused at " (page::time(status.last_error_unix_ms)) ": " (status.last_error) " — the policy above stays in force." }
            }
            h2 { "Groups" }
            dl.facts { @for (g, members) in &policy.groups { dt { (g) } dd { (members.join(", ")) } } }
            h2 { "Rules" }
            table.list #rules {
                thead { tr { th { "Agent rule" } th { "Hosts" } th { "Accounts" } th { "Approver groups" } th { "Quorum" } th { "Reason" } } }
                tbody { @for r in &policy.rules { tr {
                    td data-label="Agent rule" { (r.name) }
                    td data-label="Hosts" { @for (k, v) in &r.hosts { span.label { (k) "=" (v) } " " } }
                    td data-label="Accounts" { (r.enforce.accounts.join(", ")) }
                    td data-label="Approver groups" { (r.groups.join(", ")) }
                    td data-label="Quorum" { (r.quorum) @if r.deny_needs_quorum { " (denials too)" } }
                    td data-label="Reason" { @if r.require_reason { "always" } @else { "to deny" } }
                } } }
            }
            @if !status.source.is_empty() {
                details { summary { "Policy file" } pre { (status.source) } }
            }
        },
    ))
}

/// GET /admin/deliveries: the notification delivery log (admins only).
pub(super) async fn deliveries(State(web): State<Web>, s: Session) -> Result<Markup, WebError> {
    if !admin(&web, &s) {
        return Err(WebError(
            StatusCode::FORBIDDEN,
            format!(
                "the delivery log is for members of the {:?} group",
                web.settings.admin_group
            ),
        ));
    }
    let rows = web.plane.store.deliveries(500).await?;
    Ok(page::layout(
        &s,
        "Deliveries",
        true,
        html! {
            h1 { "Notification deliveries" }
            table.list #deliveries {
                thead { tr { th { "At" } th { "Channel" } th { "Event" } th { "Request" } th { "Attempt" } th { "Result" } } }
                tbody { @for d in &rows { tr {
                    td data-label="At" { (page::time(d.at_ms)) }
                    td data-label="Channel" { (d.channel) }
                    td data-label="Event" { (d.event) }
                    td data-label="Request" { a href={ "/requests/" (d.request_id) } { (d.request_id) } }
                    td data-label="Attempt" { (d.attempt) }
                    td data-label="Result" {
                        @if d.ok { span.badge.approved { "ok" } } @else { span.badge.denied { "failed" } }
                        " " @if let Some(c) = d.status { (c) " " } (d.error)
                    }
                } } }
            }
        },
    ))
}
