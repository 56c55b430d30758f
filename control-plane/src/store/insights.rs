//! What the insights page draws: requests and decisions per period, time to decision per rule,
//! the rules and accounts that ask most, expiries and who approves most, over a window of time.
//! Counted in SQL (the same statements on SQLite and PostgreSQL); only the percentiles of time
//! to decision are taken in Rust, from the sorted durations.

use super::{sql::args, Store, StoreError};

/// Most rules, accounts and approvers a ranking holds.
pub const TOP: i64 = 10;

/// Most decisions per rule the percentiles are taken from (the newest).
const MAX_DURATIONS: i64 = 100_000;

/// Requests and decisions in one period of the window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Period {
    /// Start of the period, Unix ms.
    pub start_ms: i64,
    /// Requests received in it.
    pub received: i64,
    /// Requests approved in it.
    pub approved: i64,
    /// Requests denied in it.
    pub denied: i64,
    /// Requests that expired in it.
    pub expired: i64,
    /// Requests cancelled in it.
    pub cancelled: i64,
}

/// Time from arrival to an approval or denial, for one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleLatency {
    /// The agent rule ("" for none).
    pub rule: String,
    /// Decisions counted.
    pub decided: i64,
    /// Median, ms.
    pub median_ms: i64,
    /// 90th percentile, ms.
    pub p90_ms: i64,
}

/// How often one approver voted, by verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApproverVotes {
    /// The approver identity (as in the history filter).
    pub approver: String,
    /// Votes to allow.
    pub allowed: i64,
    /// Votes to deny.
    pub denied: i64,
}

/// Everything the insights page shows for one window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Insights {
    /// The periods, oldest first, covering the window.
    pub periods: Vec<Period>,
    /// Time to decision per rule, most decisions first.
    pub latency: Vec<RuleLatency>,
    /// Rules by requests received, most first (at most [`TOP`]).
    pub rules: Vec<(String, i64)>,
    /// Accounts by requests received, most first (at most [`TOP`]).
    pub accounts: Vec<(String, i64)>,
    /// Rules by requests expired, most first (at most [`TOP`]).
    pub expired_rules: Vec<(String, i64)>,
    /// Approvers by votes, most first (at most [`TOP`]).
    pub approvers: Vec<ApproverVotes>,
}

/// The `q`th percentile (0..=100, nearest rank) of `sorted`; 0 when empty.
pub fn percentile(sorted: &[i64], q: u32) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (u64::from(q) * sorted.len() as u64).div_ceil(100).max(1) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

impl Store {
    /// Insights for the `periods` periods of `period_ms` each starting at `since_ms`.
    pub async fn insights(
        &self,
        since_ms: i64,
        period_ms: i64,
        periods: usize,
    ) -> Result<Insights, StoreError> {
        let period_ms = period_ms.max(1);
        let until_ms = since_ms + period_ms * periods as i64;
        self.read(move |tx| {
            Box::pin(async move {
                let mut out = Insights {
                    periods: (0..periods)
                        .map(|i| Period {
                            start_ms: since_ms + period_ms * i as i64,
                            ..Period::default()
                        })
                        .collect(),
                    ..Insights::default()
                };
                let slot = |n: i64| usize::try_from(n).ok().filter(|&i| i < periods);
                for r in tx
                    .rows(
                        "SELECT (received_ms - $1) / $2, COUNT(*) FROM requests
                         WHERE received_ms >= $1 AND received_ms < $3 GROUP BY 1",
                        args![since_ms, period_ms, until_ms],
                    )
                    .await?
                {
                    if let Some(i) = slot(r.int(0)?) {
                        out.periods[i].received = r.int(1)?;
                    }
                }
                for r in tx
                    .rows(
                        "SELECT (decided_ms - $1) / $2, state, COUNT(*) FROM requests
                         WHERE state <> 1 AND decided_ms >= $1 AND decided_ms < $3 GROUP BY 1, 2",
                        args![since_ms, period_ms, until_ms],
                    )
                    .await?
                {
                    let Some(i) = slot(r.int(0)?) else { continue };
                    let p = &mut out.periods[i];
                    let n = r.int(2)?;
                    match r.int(1)? {
                        2 => p.approved = n,
                        3 => p.denied = n,
                        4 => p.expired = n,
                        5 => p.cancelled = n,
                        _ => {}
                    }
                }
                out.rules = top(tx
                    .rows(
                        "SELECT rule, COUNT(*) FROM requests
                         WHERE received_ms >= $1 AND received_ms < $2
                         GROUP BY rule ORDER BY 2 DESC, 1 LIMIT $3",
                        args![since_ms, until_ms, TOP],
                    )
                    .await?)?;
                out.accounts = top(tx
                    .rows(
                        "SELECT account, COUNT(*) FROM requests
                         WHERE received_ms >= $1 AND received_ms < $2
                         GROUP BY account ORDER BY 2 DESC, 1 LIMIT $3",
                        args![since_ms, until_ms, TOP],
                    )
                    .await?)?;
                out.expired_rules = top(tx
                    .rows(
                        "SELECT rule, COUNT(*) FROM requests
                         WHERE state = 4 AND decided_ms >= $1 AND decided_ms < $2
                         GROUP BY rule ORDER BY 2 DESC, 1 LIMIT $3",
                        args![since_ms, until_ms, TOP],
                    )
                    .await?)?;
                for r in tx
                    .rows(
                        "SELECT approver,
                                SUM(CASE WHEN verdict = 1 THEN 1 ELSE 0 END),
                                SUM(CASE WHEN verdict = 2 THEN 1 ELSE 0 END)
                         FROM votes WHERE at_ms >= $1 AND at_ms < $2
                         GROUP BY approver ORDER BY COUNT(*) DESC, 1 LIMIT $3",
                        args![since_ms, until_ms, TOP],
                    )
                    .await?
                {
                    out.approvers.push(ApproverVotes {
                        approver: r.text(0)?,
                        allowed: r.int(1)?,
                        denied: r.int(2)?,
                    });
                }
                // Approvals and denials only: an expiry or a cancellation is no one's decision.
                let rows = tx
                    .rows(
                        "SELECT rule, decided_ms - received_ms FROM requests
                         WHERE state IN (2, 3) AND decided_ms >= $1 AND decided_ms < $2
                           AND decided_ms >= received_ms
                         ORDER BY decided_ms DESC LIMIT $3",
                        args![since_ms, until_ms, MAX_DURATIONS],
                    )
                    .await?;
                let mut by_rule: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
                for r in rows {
                    by_rule.entry(r.text(0)?).or_default().push(r.int(1)?);
                }
                for (rule, mut ms) in by_rule {
                    ms.sort_unstable();
                    out.latency.push(RuleLatency {
                        rule,
                        decided: ms.len() as i64,
                        median_ms: percentile(&ms, 50),
                        p90_ms: percentile(&ms, 90),
                    });
                }
                out.latency
                    .sort_by(|a, b| b.decided.cmp(&a.decided).then(a.rule.cmp(&b.rule)));
                Ok(out)
            })
        })
        .await
    }
}

fn top(rows: Vec<super::sql::Row>) -> Result<Vec<(String, i64)>, StoreError> {
    rows.iter().map(|r| Ok((r.text(0)?, r.int(1)?))).collect()
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 50), 0);
        assert_eq!(percentile(&[7], 90), 7);
        assert_eq!(percentile(&[1, 2, 3, 4], 50), 2);
        let ten: Vec<i64> = (1..=10).collect();
        assert_eq!(percentile(&ten, 50), 5);
        assert_eq!(percentile(&ten, 90), 9);
        assert_eq!(percentile(&ten, 100), 10);
    }
}
