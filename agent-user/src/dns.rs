//! DNS names in `connect` rules (`connect = ["orders-db.prod.internal"]`): what addresses they
//! stand for, kept current.
//!
//! Each name is resolved through the host's resolver (`/etc/resolv.conf`, `/etc/hosts`) when
//! the rules first name it and again when its TTL runs out (clamped to a floor and a ceiling).
//! An address a name stops returning stays watched until its own TTL runs out: a client may
//! still hold it from an earlier lookup. When a lookup fails, nothing expires: the last
//! addresses stay watched for as long as the resolver is down, so an outage never opens the
//! door; it is logged and counted (`airlock_agent_dns_failures`). Whenever the set of addresses
//! changes, the agent re-applies its rules, which updates the kernel's tables atomically (old ∪
//! new first, then new).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agent_rules::policy::Resolved;
use hickory_resolver::TokioResolver;
use tokio::sync::Notify;

use crate::metrics::{AgentMetrics, DnsName};

/// How long one lookup may take.
const LOOKUP_LIMIT: Duration = Duration::from_secs(5);
/// How often the loop looks for names due.
const TICK: Duration = Duration::from_millis(500);

/// One address of a name.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// When it stops being watched.
    until: Instant,
    /// The name no longer returns it: it has one TTL left, not renewed.
    leaving: bool,
}

/// What one name stands for.
#[derive(Debug, Default)]
struct NameState {
    /// Each address.
    addrs: BTreeMap<IpAddr, Held>,
    /// When to look the name up again.
    next: Option<Instant>,
    /// The last lookup failed: nothing expires until one succeeds.
    failing: bool,
}

/// The names the rules list and their addresses; shared by the resolver loop and the code
/// that compiles the rules.
pub struct Names {
    state: Mutex<BTreeMap<String, NameState>>,
    /// Told when the addresses change (the agent then re-applies its rules).
    pub changed: Notify,
    floor: Duration,
    ceiling: Duration,
}

impl Names {
    /// Names whose TTLs are clamped to `floor`..=`ceiling`.
    pub fn new(floor: Duration, ceiling: Duration) -> Self {
        Self {
            state: Mutex::default(),
            changed: Notify::new(),
            floor,
            ceiling: ceiling.max(floor),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NameState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The names the rules list now: new ones are looked up at once, dropped ones forgotten.
    pub fn set_names(&self, names: BTreeSet<String>) {
        let mut state = self.lock();
        state.retain(|n, _| names.contains(n));
        for n in names {
            state.entry(n).or_default();
        }
    }

    /// The addresses each name stands for now.
    pub fn resolved(&self) -> Resolved {
        self.lock()
            .iter()
            .map(|(n, s)| (n.clone(), s.addrs.keys().copied().collect()))
            .collect()
    }

    /// Records a lookup of `name` at `now`: `Ok` with its addresses and when the answer stops
    /// being valid, or `Err` when it failed. Returns whether the set of addresses changed.
    fn record(
        &self,
        name: &str,
        now: Instant,
        answer: Result<(Vec<IpAddr>, Instant), String>,
    ) -> bool {
        let mut state = self.lock();
        let Some(s) = state.get_mut(name) else {
            return false; // Dropped from the rules meanwhile.
        };
        let before: Vec<IpAddr> = s.addrs.keys().copied().collect();
        match answer {
            Ok((addrs, valid_until)) => {
                let ttl = valid_until
                    .saturating_duration_since(now)
                    .clamp(self.floor, self.ceiling);
                // What the name no longer returns stays one more TTL from now (a client may
                // have looked it up just before it changed), then goes.
                for (a, h) in s.addrs.iter_mut() {
                    if !h.leaving && !addrs.contains(a) {
                        *h = Held {
                            until: now + ttl,
                            leaving: true,
                        };
                    }
                }
                for a in addrs {
                    s.addrs.insert(
                        a,
                        Held {
                            until: now + ttl,
                            leaving: false,
                        },
                    );
                }
                s.failing = false;
                s.next = Some(now + ttl);
                s.addrs.retain(|_, h| h.until > now);
            }
            Err(_) => {
                // Keep every address; look again soon.
                s.failing = true;
                s.next = Some(now + self.floor);
            }
        }
        s.addrs.keys().copied().ne(before)
    }

    /// Expires the addresses whose time has come, for names whose lookups succeed. Returns
    /// whether anything went.
    fn expire(&self, now: Instant) -> bool {
        let mut changed = false;
        for s in self.lock().values_mut().filter(|s| !s.failing) {
            let n = s.addrs.len();
            s.addrs.retain(|_, h| h.until > now);
            changed |= s.addrs.len() != n;
        }
        changed
    }

    /// Names due for a lookup at `now`.
    fn due(&self, now: Instant) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, s)| s.next.is_none_or(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Looks the names up as they fall due, forever.
    pub async fn run(self: Arc<Self>, metrics: Arc<AgentMetrics>) {
        let mut resolver: Option<TokioResolver> = None;
        let mut tick = tokio::time::interval(TICK);
        loop {
            tick.tick().await;
            let now = Instant::now();
            // Lookups first: a name due now whose lookup fails keeps its addresses (expiring
            // them first would open the door for the length of the outage).
            let mut changed = false;
            for name in self.due(now) {
                if resolver.is_none() {
                    // Built again after a failure, so a fixed /etc/resolv.conf is picked up.
                    resolver = match TokioResolver::builder_tokio().map(|b| b.build()) {
                        Ok(Ok(r)) => Some(r),
                        Ok(Err(e)) | Err(e) => {
                            tracing::error!(error = %e, "cannot read the host's resolver configuration");
                            None
                        }
                    };
                }
                let answer = match &resolver {
                    Some(r) => {
                        match tokio::time::timeout(LOOKUP_LIMIT, r.lookup_ip(name.as_str())).await {
                            Ok(Ok(l)) => {
                                let addrs: Vec<IpAddr> = l.iter().collect();
                                if addrs.is_empty() {
                                    Err("no addresses".to_owned())
                                } else {
                                    Ok((addrs, l.valid_until()))
                                }
                            }
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err("timed out".to_owned()),
                        }
                    }
                    None => Err("no resolver configuration".to_owned()),
                };
                let label = DnsName { name: name.clone() };
                if let Err(e) = &answer {
                    tracing::warn!(%name, error = %e, "resolving a name in a connect rule failed; its last addresses stay watched");
                    metrics.dns_failures.get_or_create(&label).inc();
                    resolver = None;
                }
                changed |= self.record(&name, Instant::now(), answer);
            }
            changed |= self.expire(Instant::now());
            if changed {
                for (name, addrs) in self.resolved() {
                    tracing::info!(%name, addresses = ?addrs, "a connect rule's name now stands for these addresses");
                    metrics
                        .dns_addresses
                        .get_or_create(&DnsName { name })
                        .set(addrs.len() as i64);
                }
                self.changed.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn follows_the_answer_keeps_old_addresses_until_their_ttl_and_all_during_an_outage() {
        let names = Names::new(Duration::from_secs(1), Duration::from_secs(60));
        names.set_names(["db.test".to_owned()].into());
        let t0 = Instant::now();
        assert!(
            names.due(t0).contains(&"db.test".to_owned()),
            "new: due at once"
        );
        let ttl = Duration::from_secs(3);
        assert!(names.record("db.test", t0, Ok((vec![ip("10.0.0.1")], t0 + ttl))));
        assert_eq!(names.resolved()["db.test"], [ip("10.0.0.1")]);
        assert!(names.due(t0 + Duration::from_secs(2)).is_empty());
        // The name moves: both are watched for one more TTL, then only the new one.
        let t1 = t0 + ttl;
        assert!(names.record("db.test", t1, Ok((vec![ip("10.0.0.2")], t1 + ttl))));
        assert_eq!(
            names.resolved()["db.test"],
            [ip("10.0.0.1"), ip("10.0.0.2")]
        );
        assert!(!names.expire(t1 + Duration::from_secs(2)));
        // Looked up again meanwhile: the leaving address is not renewed.
        names.record(
            "db.test",
            t1 + Duration::from_secs(2),
            Ok((vec![ip("10.0.0.2")], t1 + Duration::from_secs(5))),
        );
        assert!(names.expire(t1 + ttl + Duration::from_millis(100)));
        assert_eq!(names.resolved()["db.test"], [ip("10.0.0.2")]);
        // The resolver goes away: nothing expires, however long.
        let t2 = t1 + ttl;
        assert!(!names.record("db.test", t2, Err("timed out".into())));
        assert!(!names.expire(t2 + Duration::from_secs(3600)));
        assert_eq!(names.resolved()["db.test"], [ip("10.0.0.2")]);
        assert!(names
            .due(t2 + Duration::from_secs(1))
            .contains(&"db.test".to_owned()));
        // TTLs are clamped: a 0 s answer is kept for the floor.
        let t3 = t2 + Duration::from_secs(10);
        names.record("db.test", t3, Ok((vec![ip("10.0.0.3")], t3)));
        assert!(names.due(t3 + Duration::from_millis(500)).is_empty());
        // Dropped from the rules: forgotten.
        names.set_names(BTreeSet::new());
        assert!(names.resolved().is_empty());
    }
}
