//! The page layout and the formatting every page shares.

use airlock_proto::v1::{HeldRequest, RequestState};
use maud::{html, Markup, DOCTYPE};

use super::session::Session;

/// A page for a logged-in person: navigation, who they are, logout.
pub fn layout(s: &Session, title: &str, admin: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head { (head(title)) }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    nav aria-label="Main" {
                        a.brand href="/" { "Airlock" }
                        a href="/" { "Queue" }
                        a href="/history" { "History" }
                        a href="/insights" { "Insights" }
                        a href="/audit" { "Audit" }
                        a href="/agents" { "Agents" }
                        a href="/policy" { "Policy" }
                        @if admin { a href="/admin/deliveries" { "Deliveries" } }
                    }
                    form.who method="post" action="/logout" {
                        span { (s.name) }
                        input type="hidden" name="csrf" value=(s.csrf);
                        button.link type="submit" { "Log out" }
                    }
                }
                main #main { (body) }
            }
        }
    }
}

/// A page without navigation (login, errors).
pub fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head { (head(title)) }
            body { (body) }
        }
    }
}

fn head(title: &str) -> Markup {
    html! {
        meta charset="utf-8";
        meta name="viewport" content="width=device-width, initial-scale=1";
        title { (title) " · Airlock" }
        link rel="stylesheet" href="/static/app.css";
        script src="/static/app.js" defer {}
    }
}

/// `ms` (Unix) as `2026-11-22 14:03:07 UTC`; empty for 0.
pub fn time(ms: i64) -> String {
    if ms <= 0 {
        return String::new();
    }
    let fmt =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_default()
}

/// What the request would do, in one line: the executable the kernel ran and its arguments
/// ([`crate::display::action_line`]), or `connect host:port/proto`.
pub fn what(held: &HeldRequest) -> String {
    crate::display::action_line(held.request.as_ref().and_then(|r| r.action.as_ref()))
}

/// `tcp` or `udp`.
pub fn protocol(p: i32) -> &'static str {
    if p == airlock_proto::v1::Protocol::Udp as i32 {
        "udp"
    } else {
        "tcp"
    }
}

/// The account that asked.
pub fn account(held: &HeldRequest) -> String {
    held.request
        .as_ref()
        .and_then(|r| r.process.as_ref())
        .map(|p| p.user.clone())
        .unwrap_or_default()
}

/// The request id.
pub fn id(held: &HeldRequest) -> &str {
    held.request.as_ref().map_or("", |r| r.request_id.as_str())
}

/// The agent rule that held it.
pub fn rule(held: &HeldRequest) -> &str {
    held.request.as_ref().map_or("", |r| r.rule.as_str())
}

/// The rule's risk label.
pub fn risk(held: &HeldRequest) -> &str {
    held.request.as_ref().map_or("", |r| r.risk.as_str())
}

/// The deadline, Unix ms (`i64::MAX` for a request that waits until someone decides).
pub fn deadline(held: &HeldRequest) -> i64 {
    held.request.as_ref().map_or(0, crate::types::deadline_ms)
}

/// Whether the request waits until someone decides (`on_timeout = "wait"`): no deadline.
pub fn waits(held: &HeldRequest) -> bool {
    held.request.as_ref().is_some_and(|r| r.wait)
}

/// The state as a badge.
pub fn state(held: &HeldRequest) -> Markup {
    let name = crate::types::state_name(held.state());
    html! { span class={ "badge " (name) } { (name) } }
}

/// Time left until `deadline`, updated by the page's script every second.
pub fn countdown(held: &HeldRequest) -> Markup {
    if held.state() != RequestState::Pending {
        return html! { span { "—" } };
    }
    // No countdown for a request that waits until someone decides.
    if waits(held) {
        return html! { span.waits { "waits until decided" } };
    }
    let left = (deadline(held) - crate::types::now_ms()).max(0) / 1000;
    html! {
        time.countdown data-deadline=(deadline(held)) { (left / 60) "m " (left % 60) "s" }
    }
}

/// A risk badge.
pub fn risk_badge(held: &HeldRequest) -> Markup {
    let r = risk(held);
    html! { @if !r.is_empty() { span class={ "risk " (r) } { (r) } } }
}
