//! The insights page: charts of the last days drawn by the server as SVG (no script, no CDN),
//! each linking to the history filtered the same way. The numbers come from
//! [`crate::store::insights`].

use axum::extract::{Query, State};
use maud::{html, Markup};
use serde::Deserialize;

use super::{page, requests::admin, session::Session, Web, WebError};
use crate::{
    store::insights::{Insights, Period},
    types::now_ms,
};

/// Default window, days.
const DEFAULT_DAYS: u32 = 14;
/// Longest window, days.
const MAX_DAYS: u32 = 90;
const DAY_MS: i64 = 86_400_000;

/// Chart width and the parts of a horizontal bar chart, in SVG units.
const WIDTH: i64 = 640;
const LABEL: i64 = 200;
const BAR: i64 = 320;
const ROW: i64 = 26;

/// Colours of the results, shared by every chart and its legend.
const RECEIVED: &str = "#6b7280";
const APPROVED: &str = "#15803d";
const DENIED: &str = "#b91c1c";
const EXPIRED: &str = "#b45309";
const CANCELLED: &str = "#7c3aed";
const P90: &str = "#93c5fd";
const MEDIAN: &str = "#1d4ed8";

/// The window, from the query string.
#[derive(Debug, Deserialize)]
pub struct Window {
    /// Days up to and including today (UTC), 1 to 90.
    #[serde(default)]
    pub days: Option<u32>,
}

/// `ms` as `YYYY-MM-DD` (UTC), as the history filter takes it.
fn day(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .map(|t| t.date().to_string())
        .unwrap_or_default()
}

/// `/history?...` with `pairs` (empty values left out), URL-encoded.
fn history(pairs: &[(&str, &str)]) -> String {
    let q = serde_urlencoded::to_string(
        pairs
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .collect::<Vec<_>>(),
    )
    .unwrap_or_default();
    format!("/history?{q}")
}

/// A duration for people: `850 ms`, `12.5 s`, `3.2 min`, `1.5 h`.
fn duration(ms: i64) -> String {
    match ms {
        ..=999 => format!("{ms} ms"),
        1_000..=59_999 => format!("{:.1} s", ms as f64 / 1e3),
        60_000..=3_599_999 => format!("{:.1} min", ms as f64 / 60e3),
        _ => format!("{:.1} h", ms as f64 / 3_600e3),
    }
}

/// One row of a horizontal bar chart: stacked segments `(value, colour)`, a label, the text
/// after the bar, and where the row links.
struct Row {
    label: String,
    segments: Vec<(i64, &'static str)>,
    text: String,
    href: String,
}

/// Lays `segments` end to end from `start`, each `scale(value)` long: `(offset, length,
/// colour)` for each, and where the last ends.
fn lay(
    start: i64,
    segments: &[(i64, &'static str)],
    scale: impl Fn(i64) -> i64,
) -> (Vec<(i64, i64, &'static str)>, i64) {
    let mut at = start;
    let mut out = Vec::with_capacity(segments.len());
    for (value, colour) in segments {
        let len = scale(*value);
        out.push((at, len, *colour));
        at += len;
    }
    (out, at)
}

/// A horizontal bar chart; bars scale to the largest row.
fn hbars(id: &str, title: &str, rows: &[Row]) -> Markup {
    let max = rows
        .iter()
        .map(|r| r.segments.iter().map(|s| s.0).sum::<i64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let height = ROW * rows.len() as i64 + 8;
    html! {
        @if rows.is_empty() {
            p.hint { "Nothing in this window." }
        } @else {
            svg.chart id=(id) role="img" aria-label=(title) viewBox={ "0 0 " (WIDTH) " " (height) }
                width=(WIDTH) height=(height) xmlns="http://www.w3.org/2000/svg" {
                @for (i, r) in rows.iter().enumerate() {
                    @let y = ROW * i as i64 + 4;
                    @let (bars, end) = lay(LABEL, &r.segments, |v| BAR * v / max);
                    a.row href=(r.href) data-label=(r.label) {
                        title { (r.label) ": " (r.text) }
                        text.label x=(LABEL - 8) y=(y + 16) text-anchor="end" font-size="13" fill="currentColor" { (r.label) }
                        @for (x, w, colour) in bars {
                            rect x=(x) y=(y + 3) width=(w) height=(ROW - 8) fill=(colour) {}
                        }
                        text.value x=(end + 6) y=(y + 16) font-size="13" fill="currentColor" { (r.text) }
                    }
                }
            }
        }
    }
}

/// Vertical bars per day, each a stack of `(value, colour)` segments, linking to the history
/// of that day with the `extra` filter.
fn columns(
    id: &str,
    title: &str,
    periods: &[Period],
    stack: fn(&Period) -> Vec<(i64, &'static str)>,
    extra: &[(&str, &str)],
) -> Markup {
    let height: i64 = 180;
    let base = height - 24;
    let max = periods
        .iter()
        .map(|p| stack(p).iter().map(|s| s.0).sum::<i64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let n = periods.len().max(1) as i64;
    let slot = (WIDTH - 40) / n;
    html! {
        svg.chart id=(id) role="img" aria-label=(title) viewBox={ "0 0 " (WIDTH) " " (height) }
            width=(WIDTH) height=(height) xmlns="http://www.w3.org/2000/svg" {
            line x1="36" y1=(base) x2=(WIDTH - 4) y2=(base) stroke="currentColor" stroke-width="1" {}
            text x="30" y="14" font-size="11" text-anchor="end" fill="currentColor" { (max) }
            @for (i, p) in periods.iter().enumerate() {
                @let x = 40 + slot * i as i64;
                @let d = day(p.start_ms);
                @let parts = stack(p);
                @let total: i64 = parts.iter().map(|s| s.0).sum();
                // Stacked upwards: lay them out downwards from the top of the stack.
                @let stack_height: i64 = parts.iter().map(|s| (base - 20) * s.0 / max).sum();
                @let (bars, _) = lay(base - stack_height, &parts, |v| (base - 20) * v / max);
                @let mut pairs = extra.to_vec();
                @let link = { pairs.extend([("from", d.as_str()), ("to", d.as_str())]); history(&pairs) };
                a.day href=(link) data-day=(d) data-total=(total) {
                    title { (d) ": " (total) }
                    rect x=(x) y="0" width=(slot) height=(base) fill="transparent" {}
                    @for (y, h, colour) in bars {
                        rect x=(x + 2) y=(y) width=((slot - 4).max(1)) height=(h) fill=(colour) {}
                    }
                    @if total > 0 {
                        text x=(x + slot / 2) y=(base - stack_height - 3) font-size="11" text-anchor="middle" fill="currentColor" { (total) }
                    }
                    @if n <= 16 || i % 7 == 0 {
                        text x=(x + slot / 2) y=(height - 8) font-size="10" text-anchor="middle" fill="currentColor" { (d.get(5..).unwrap_or(&d)) }
                    }
                }
            }
        }
    }
}

fn legend(items: &[(&str, &str)]) -> Markup {
    html! {
        p.legend { @for (name, colour) in items {
            svg width="12" height="12" aria-hidden="true" { rect width="12" height="12" fill=(colour) {} }
            " " (name) " "
        } }
    }
}

/// The page body for `data`, the window starting at `since_ms`.
fn body(data: &Insights, days: u32, since_ms: i64) -> Markup {
    let (from, to) = (
        day(since_ms),
        day(since_ms + DAY_MS * (i64::from(days) - 1)),
    );
    let window = [("from", from.as_str()), ("to", to.as_str())];
    let with = |extra: &[(&str, &str)]| {
        let mut pairs = extra.to_vec();
        pairs.extend_from_slice(&window);
        history(&pairs)
    };
    let received: i64 = data.periods.iter().map(|p| p.received).sum();
    let expired: i64 = data.periods.iter().map(|p| p.expired).sum();
    let count_rows =
        |list: &[(String, i64)], field: &'static str, colour: &'static str| -> Vec<Row> {
            list.iter()
                .map(|(name, n)| Row {
                    label: if name.is_empty() {
                        "(none)".into()
                    } else {
                        name.clone()
                    },
                    segments: vec![(*n, colour)],
                    text: n.to_string(),
                    href: with(&[(field, name)]),
                })
                .collect()
        };
    let latency: Vec<Row> = data
        .latency
        .iter()
        .map(|l| Row {
            label: if l.rule.is_empty() {
                "(none)".into()
            } else {
                l.rule.clone()
            },
            segments: vec![
                (l.median_ms, MEDIAN),
                ((l.p90_ms - l.median_ms).max(0), P90),
            ],
            text: format!(
                "median {} · p90 {} · {} decided",
                duration(l.median_ms),
                duration(l.p90_ms),
                l.decided
            ),
            href: with(&[("rule", &l.rule)]),
        })
        .collect();
    let approvers: Vec<Row> = data
        .approvers
        .iter()
        .map(|a| Row {
            label: a.approver.clone(),
            segments: vec![(a.allowed, APPROVED), (a.denied, DENIED)],
            text: format!("{} allowed · {} denied", a.allowed, a.denied),
            href: with(&[("approver", &a.approver)]),
        })
        .collect();
    html! {
        h1 { "Insights" }
        form.filters method="get" action="/insights" {
            label { "Days" input name="days" type="number" min="1" max=(MAX_DAYS) value=(days); }
            button type="submit" { "Show" }
        }
        p.hint #window { (from) " to " (to) " (UTC): " (received) " request(s), " (expired) " expired. "
            a href=(with(&[])) { "All of them in the history" } }
        section.insight #requests-over-time {
            h2 { a href=(with(&[])) { "Requests and decisions per day" } }
            (legend(&[("received", RECEIVED), ("approved", APPROVED), ("denied", DENIED), ("expired", EXPIRED), ("cancelled", CANCELLED)]))
            (columns("chart-received", "Requests received per day", &data.periods, |p| vec![(p.received, RECEIVED)], &[]))
            (columns("chart-decided", "Decisions per day, by result", &data.periods,
                |p| vec![(p.approved, APPROVED), (p.denied, DENIED), (p.expired, EXPIRED), (p.cancelled, CANCELLED)], &[]))
        }
        section.insight #time-to-decision {
            h2 { a href=(with(&[])) { "Time to decision per rule" } }
            (legend(&[("median", MEDIAN), ("90th percentile", P90)]))
            (hbars("chart-latency", "Time to decision per rule", &latency))
        }
        section.insight #top-rules {
            h2 { a href=(with(&[])) { "Rules that ask most" } }
            (hbars("chart-rules", "Requests per rule", &count_rows(&data.rules, "rule", RECEIVED)))
        }
        section.insight #top-accounts {
            h2 { a href=(with(&[])) { "Accounts that ask most" } }
            (hbars("chart-accounts", "Requests per account", &count_rows(&data.accounts, "account", RECEIVED)))
        }
        section.insight #expiries {
            h2 { a href=(with(&[("decision", "expired")])) { "Expiries" } }
            (columns("chart-expired", "Requests expired per day", &data.periods, |p| vec![(p.expired, EXPIRED)], &[("decision", "expired")]))
            (hbars("chart-expired-rules", "Expiries per rule",
                &count_rows(&data.expired_rules, "rule", EXPIRED).into_iter().map(|mut r| {
                    r.href = format!("{}&decision=expired", r.href);
                    r
                }).collect::<Vec<_>>()))
        }
        section.insight #approvers {
            h2 { a href=(with(&[])) { "Who approves most" } }
            (legend(&[("allowed", APPROVED), ("denied", DENIED)]))
            (hbars("chart-approvers", "Votes per approver", &approvers))
        }
    }
}

/// GET /insights.
pub(super) async fn insights(
    State(web): State<Web>,
    s: Session,
    Query(w): Query<Window>,
) -> Result<Markup, WebError> {
    let days = w.days.unwrap_or(DEFAULT_DAYS).clamp(1, MAX_DAYS);
    let today = now_ms().div_euclid(DAY_MS) * DAY_MS;
    let since_ms = today - DAY_MS * (i64::from(days) - 1);
    let data = web
        .plane
        .store
        .insights(since_ms, DAY_MS, days as usize)
        .await?;
    Ok(page::layout(
        &s,
        "Insights",
        admin(&web, &s),
        body(&data, days, since_ms),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(12_500), "12.5 s");
        assert_eq!(duration(192_000), "3.2 min");
        assert_eq!(duration(5_400_000), "1.5 h");
    }

    #[test]
    fn history_links_encode_and_drop_empty_values() {
        assert_eq!(
            history(&[("rule", "a b&c"), ("account", ""), ("from", "2026-11-29")]),
            "/history?rule=a+b%26c&from=2026-11-29"
        );
    }
}
