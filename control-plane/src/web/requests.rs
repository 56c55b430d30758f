//! The pending queue (live through server-sent events), the request page with everything the
//! agent sent, and the decision form.

use std::{convert::Infallible, time::Duration};

use airlock_proto::v1::{
    action_request::Action, HeldRequest, ListRequestsRequest, RequestState, Verdict,
};
use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Redirect, Response,
    },
    Form,
};
use maud::{html, Markup};
use serde::Deserialize;
use tokio_stream::Stream;

use super::{page, session::Session, Web, WebError};
use crate::decide::DecideError;

/// Pending requests, newest first (at most one page of [`crate::config::Limits::max_list`]).
async fn pending(web: &Web) -> Result<Vec<HeldRequest>, WebError> {
    let q = ListRequestsRequest {
        state: RequestState::Pending as i32,
        limit: web.plane.limits.max_list,
        ..Default::default()
    };
    Ok(web.plane.store.list(&q, web.plane.limits.max_list).await?.0)
}

fn queue_rows(requests: &[HeldRequest]) -> Markup {
    html! {
        tbody #queue data-count=(requests.len()) {
            @for h in requests {
                tr {
                    td data-label="Host" { (h.hostname) }
                    td data-label="Account" { (page::account(h)) }
                    td data-label="What" { a href={ "/requests/" (page::id(h)) } { code { (page::what(h)) } } }
                    td data-label="Risk" { (page::risk_badge(h)) }
                    td data-label="Votes" { (h.votes.len()) " / " (h.quorum.max(1)) }
                    td data-label="Time left" { (page::countdown(h)) }
                }
            }
            @if requests.is_empty() {
                tr.empty { td colspan="6" { "Nothing is waiting for a decision." } }
            }
        }
    }
}

/// GET /: the pending queue.
pub(super) async fn queue(State(web): State<Web>, s: Session) -> Result<Markup, WebError> {
    let requests = pending(&web).await?;
    let title = if requests.is_empty() {
        "Queue".to_owned()
    } else {
        format!("({}) Queue", requests.len())
    };
    Ok(page::layout(
        &s,
        &title,
        admin(&web, &s),
        html! {
            h1 { "Waiting for a decision" }
            p.hint { "New requests appear here as agents hold them." }
            table.list data-live="queue" {
                thead { tr { th { "Host" } th { "Account" } th { "What" } th { "Risk" } th { "Votes" } th { "Time left" } } }
                (queue_rows(&requests))
            }
        },
    ))
}

/// GET /fragments/queue: the queue's rows, for the live update.
pub(super) async fn queue_fragment(
    State(web): State<Web>,
    _s: Session,
) -> Result<Markup, WebError> {
    Ok(queue_rows(&pending(&web).await?))
}

/// GET /events: a server-sent event per change to a request (`request` with the id and state),
/// so pages update without reload, from every replica and none missed (a stream that reads
/// slowly catches up from the table). The stream ends when the session does (logout, a
/// password change, or its expiry).
pub(super) async fn events(
    State(web): State<Web>,
    s: Session,
    jar: axum_extra::extract::cookie::CookieJar,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let sid = jar
        .get(super::session::COOKIE)
        .map(|c| c.value().to_owned())
        .unwrap_or_default();
    let store = web.plane.store.clone();
    let changes = store.subscribe();
    let closing = web.plane.closing.subscribe();
    let ends = tokio::time::Instant::now()
        + Duration::from_millis(u64::try_from(s.expires_ms - crate::types::now_ms()).unwrap_or(0));
    // Polled by the response itself: a browser that reads slowly stops the polling, and its
    // subscription later reads what it missed from the table.
    let state = (changes, closing, store, sid);
    let stream = futures::stream::unfold(
        state,
        move |(mut changes, mut closing, store, sid)| async move {
            loop {
                let c = tokio::select! {
                    c = changes.next() => c?,
                    _ = tokio::time::sleep_until(ends) => return None,
                    _ = crate::api::approvals::stopped(&mut closing) => return None,
                };
                if matches!(
                    c.action.as_str(),
                    "logout" | "account.password" | "account.removed"
                ) && !matches!(super::session::lookup(&store, &sid).await, Ok(Some(_)))
                {
                    return None;
                }
                let Some(data) = c.web_event() else { continue };
                let event = Event::default().event("request").data(data);
                return Some((Ok(event), (changes, closing, store, sid)));
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// Whether `s` sees admin pages.
pub(super) fn admin(web: &Web, s: &Session) -> bool {
    let group = &web.settings.admin_group;
    s.groups.contains(group)
        || crate::policy::current(&web.plane.policy).may_vote(&s.name, std::slice::from_ref(group))
}

/// Who may still vote: the policy's members of the request's groups who have not voted and did
/// not make it.
fn still_may_vote(web: &Web, held: &HeldRequest) -> Markup {
    if held.state() != RequestState::Pending {
        return html! {};
    }
    if held.approver_groups.is_empty() {
        return html! { p { "Any approver may vote." } };
    }
    let policy = crate::policy::current(&web.plane.policy);
    let mut people: Vec<&str> = held
        .approver_groups
        .iter()
        .filter_map(|g| policy.groups.get(g))
        .flatten()
        .map(String::as_str)
        .filter(|m| !crate::decide::has_voted(held, m))
        .filter(|m| !crate::decide::is_requester(held, m))
        .collect();
    people.sort_unstable();
    people.dedup();
    html! {
        p {
            "Members of " strong { (held.approver_groups.join(", ")) } " may vote"
            @if !people.is_empty() { ": " (people.join(", ")) }
            "."
        }
    }
}

fn details(held: &HeldRequest) -> Markup {
    let req = held.request.clone().unwrap_or_default();
    let p = req.process.clone().unwrap_or_default();
    html! {
        dl.facts {
            dt { "Host" } dd { (held.hostname) " " small { "(" (held.host_id) ")" }
                @for (k, v) in &held.host_labels { " " span.label { (k) "=" (v) } } }
            dt { "Account" } dd { (p.user) " (uid " (p.uid) ", group " (p.group) ")" }
            @if !p.login_user.is_empty() { dt { "Launched by" } dd { (p.login_user) } }
            @if !p.unit.is_empty() { dt { "Unit" } dd { code { (p.unit) } } }
            @match &req.action {
                Some(Action::Exec(e)) => {
                    dt { "Program" } dd { code { (e.path) } }
                    dt { "Arguments" } dd { ol.argv { @for a in &e.argv { li { code { (a) } } } } }
                }
                Some(Action::Connect(c)) => {
                    dt { "Destination" } dd { code { @if !c.name.is_empty() { (c.name) " (" (c.address) ")" } @else { (c.address) } ":" (c.port) } " " (page::protocol(c.protocol)) }
                    dt { "Program" } dd { code { (p.exe) } }
                    dt { "Command line" } dd { code { (p.argv.join(" ")) } }
                }
                None => {}
            }
            dt { "Working directory" } dd { code { (p.cwd) } }
            @if !p.ancestors.is_empty() {
                dt { "Parent chain" }
                dd { ol.chain { @for a in &p.ancestors {
                    li { (a.pid) " " (a.user) " " code { (if a.argv.is_empty() { a.exe.clone() } else { a.argv.join(" ") }) } }
                } } }
            }
            @if !p.env.is_empty() {
                dt { "Environment" }
                dd { ul.env { @for e in &p.env { li { code { (e.name) @if let Some(v) = &e.value { "=" (v) } } } } } }
            }
            @if req.asked_ahead {
                dt { "Asked ahead" } dd.ahead { "No task is held: the AI agent asks before it acts. Approving grants this program, run under this name with these arguments, by this account on this host, in this directory, with these allowed environment values and no environment names the asking process lacked, for "
                    (req.ahead_minutes.clamp(1, crate::store::requests::MAX_AHEAD_MINUTES)) " min (or the window you choose)." }
                dt { "Its reason" } dd.justification { q { (req.justification) } " (the AI agent's own words, not checked)" }
            }
            dt { "Agent rule" } dd { (req.rule) @if !req.description.is_empty() { " — " (req.description) } }
            dt { "Risk" } dd { (page::risk_badge(held)) }
            dt { "Routed by" } dd { @if held.route.is_empty() { "default (any one approver)" } @else { (held.route) } }
            dt { "Quorum" } dd { (held.quorum.max(1)) " approval(s)" @if held.deny_needs_quorum { ", and as many denials" } }
            dt { "Held at" } dd { (page::time(req.held_at_unix_ms)) }
            @if req.wait {
                dt { "Deadline" } dd.waits { "none: the task stays held until someone decides or it exits" }
            } @else {
                dt { "Deadline" } dd { (page::time(req.deadline_unix_ms)) " " (page::countdown(held))
                    " (then " (if req.on_timeout == Verdict::Allow as i32 { "allowed" } else { "denied" }) ")" }
            }
            @if let Some(local) = req.decided.as_ref().filter(|_| held.state() == RequestState::Observed) {
                dt { "Observed" } dd.observed { "ran unstopped (observe mode); enforcing, this rule would have "
                    (match local.would_be.as_str() { "ask" => "held it for approval", "deny" => "denied it", _ => "allowed it" }) }
            }
        }
    }
}

fn votes(held: &HeldRequest) -> Markup {
    html! {
        h2 { "Votes" }
        @if held.votes.is_empty() { p { "No votes yet." } } @else {
            table.list {
                thead { tr { th { "Approver" } th { "Vote" } th { "Reason" } th { "Grant" } th { "At" } } }
                tbody { @for v in &held.votes {
                    tr {
                        td data-label="Approver" { (v.approver) }
                        td data-label="Vote" { (if v.verdict == Verdict::Allow as i32 { "approve" } else { "deny" }) }
                        td data-label="Reason" { (v.reason) }
                        td data-label="Grant" { @if v.grant_minutes > 0 { (v.grant_minutes) " min" } }
                        td data-label="At" { (page::time(v.at_unix_ms)) }
                    }
                } }
            }
        }
        @if held.state() != RequestState::Pending {
            p.outcome { "Decided: " (page::state(held)) " by " (held.decided_by)
                @if !held.reason.is_empty() { " — " (held.reason) }
                " at " (page::time(held.decided_unix_ms)) }
        }
        @for o in &held.outcomes {
            p.hint { "Agent: " (o.cause) ", " (outcome_kind(o.kind))
                @if let Some(c) = o.exit_code { ", exit " (c) }
                @if let Some(s) = o.signal { ", signal " (s) }
                " at " (page::time(o.at_unix_ms)) }
        }
    }
}

fn outcome_kind(kind: i32) -> &'static str {
    match kind {
        1 => "resumed",
        2 => "killed",
        3 => "refused",
        _ => "applied",
    }
}

fn decision_form(web: &Web, s: &Session, held: &HeldRequest) -> Markup {
    if let Some(why) = web.decisions.refusal(held, &s.approver()) {
        return html! { p.notice #no-vote { "You cannot vote: " (why) "." } };
    }
    html! {
        form.decide.stack method="post" action={ "/requests/" (page::id(held)) "/decide" } {
            input type="hidden" name="csrf" value=(s.csrf);
            label for="reason" { "Reason" @if held.reason_required { " (required)" } @else { " (required to deny)" } }
            textarea #reason name="reason" rows="2" maxlength="2000" {}
            label for="grant" { "With approval, also approve the same action on this host, by the same account, in the same working directory ("
                code { (held.request.as_ref().and_then(|r| r.process.as_ref()).map_or("", |p| p.cwd.as_str())) }
                ") with the same environment values, for anyone but you, for" }
            select #grant name="grant_minutes" {
                option value="0" selected { "this once only" }
                option value="15" { "15 minutes" }
                option value="60" { "1 hour" }
                option value="240" { "4 hours" }
                option value="1440" { "24 hours" }
            }
            div.buttons {
                button.primary #approve type="submit" name="verdict" value="allow" { "Approve" }
                button.danger #deny type="submit" name="verdict" value="deny" { "Deny" }
            }
        }
    }
}

fn request_view(web: &Web, s: &Session, held: &HeldRequest, error: Option<&str>) -> Markup {
    page::layout(
        s,
        &page::what(held),
        admin(web, s),
        html! {
            div.request data-request=(page::id(held)) data-state=(crate::types::state_name(held.state())) {
                h1 { code { (page::what(held)) } " " (page::state(held)) }
                @if let Some(e) = error { p.error role="alert" #decide-error { (e) } }
                (details(held))
                (votes(held))
                (still_may_vote(web, held))
                @if held.state() == RequestState::Pending { (decision_form(web, s, held)) }
                p.changed hidden { "This request changed. " a href={ "/requests/" (page::id(held)) } { "Reload" } }
            }
        },
    )
}

/// GET /requests/{id}.
pub(super) async fn request_page(
    State(web): State<Web>,
    s: Session,
    Path(id): Path<String>,
) -> Result<Markup, WebError> {
    let held = web.plane.store.get(&id).await?;
    Ok(request_view(&web, &s, &held, None))
}

#[derive(Deserialize)]
pub(super) struct DecideForm {
    csrf: Option<String>,
    verdict: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    grant_minutes: u32,
}

/// POST /requests/{id}/decide: the form's vote, through the same checks as every other path.
pub(super) async fn decide(
    State(web): State<Web>,
    s: Session,
    Path(id): Path<String>,
    Form(f): Form<DecideForm>,
) -> Result<Response, WebError> {
    if !f.csrf.as_deref().is_some_and(|t| s.csrf_ok(t)) {
        tracing::warn!(name = %s.name, request = %id, "decision refused: missing or wrong CSRF token");
        return Err(WebError(
            StatusCode::FORBIDDEN,
            "missing or wrong CSRF token: reload the page and try again".into(),
        ));
    }
    let verdict = match f.verdict.as_str() {
        "allow" => Verdict::Allow,
        "deny" => Verdict::Deny,
        other => {
            return Err(WebError(
                StatusCode::BAD_REQUEST,
                format!("verdict {other:?}: use allow or deny"),
            ))
        }
    };
    let grant = if verdict == Verdict::Allow {
        f.grant_minutes
    } else {
        0
    };
    let result = web
        .decisions
        .decide(&s.approver(), &id, verdict, &f.reason, grant)
        .await;
    match result {
        Ok(_) => Ok(Redirect::to(&format!("/requests/{id}")).into_response()),
        Err(e) => {
            let status = match &e {
                DecideError::Invalid(_) => StatusCode::BAD_REQUEST,
                DecideError::Forbidden(_) => StatusCode::FORBIDDEN,
                DecideError::Store(crate::store::StoreError::NotFound(_)) => StatusCode::NOT_FOUND,
                DecideError::Store(
                    crate::store::StoreError::NotPending { .. }
                    | crate::store::StoreError::AlreadyVoted { .. }
                    | crate::store::StoreError::PastDeadline { .. },
                ) => StatusCode::CONFLICT,
                DecideError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            tracing::info!(name = %s.name, request = %id, error = %e, "vote refused");
            let held = web.plane.store.get(&id).await?;
            Ok((status, request_view(&web, &s, &held, Some(&e.to_string()))).into_response())
        }
    }
}
