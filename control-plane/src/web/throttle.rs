//! Slows password guessing without locking anyone out: failures are counted per client address
//! and per account name. An address that keeps failing must wait longer and longer before it may
//! try again (whatever name it tries); a name that keeps failing makes each of its logins wait
//! a few seconds at most, so nobody can keep `admin` out by failing on purpose.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

/// Failures allowed before any delay.
const FREE: u32 = 3;
/// The first delay; it doubles with each further failure.
const FIRST_DELAY_MS: i64 = 1_000;
/// Longest wait an address is given between attempts.
const ADDRESS_MAX_DELAY_MS: i64 = 5 * 60_000;
/// Longest a login for a name that keeps failing is held before its password is checked.
const NAME_MAX_DELAY_MS: i64 = 3_000;
/// Failures older than this are forgotten.
const FORGET_MS: i64 = 30 * 60_000;
/// Most entries kept per map; past it the oldest half goes (memory stays bounded whatever
/// the number of names or addresses tried).
const MAX_ENTRIES: usize = 50_000;

/// Where a login comes from, as the throttle counts it: an IPv4 address, or an IPv6 /64 (one
/// host usually holds a whole /64, so its single addresses would be free to rotate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Client(IpAddr);

impl Client {
    /// The client at `ip`.
    pub fn of(ip: Option<IpAddr>) -> Self {
        match ip {
            Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    Self(IpAddr::V6(std::net::Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
            Some(v4) => Self(v4),
            // Unknown (not served over a socket): all such share one entry, failing closed.
            None => Self(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        }
    }
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Clone, Copy)]
struct Entry {
    failures: u32,
    last_ms: i64,
}

impl Entry {
    /// When the next attempt is due, given the longest delay.
    fn due(&self, max_ms: i64) -> i64 {
        if self.failures < FREE {
            return self.last_ms;
        }
        let doublings = (self.failures - FREE).min(20);
        self.last_ms + (FIRST_DELAY_MS << doublings).min(max_ms)
    }
}

#[derive(Default)]
struct Maps {
    clients: HashMap<Client, Entry>,
    names: HashMap<String, Entry>,
}

/// Failed logins by client and by name.
#[derive(Default)]
pub struct Throttle {
    maps: Mutex<Maps>,
}

/// What may happen with a login attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Check it, after waiting this long (the name's delay).
    After(Duration),
    /// Refuse it: this client must wait this long before trying again.
    RetryIn(Duration),
}

fn prune<K: std::hash::Hash + Eq + Clone>(map: &mut HashMap<K, Entry>, now: i64) {
    map.retain(|_, e| now - e.last_ms < FORGET_MS);
    if map.len() >= MAX_ENTRIES {
        let mut ages: Vec<i64> = map.values().map(|e| e.last_ms).collect();
        ages.sort_unstable();
        let cut = ages[ages.len() / 2];
        map.retain(|_, e| e.last_ms > cut);
    }
}

impl Throttle {
    fn maps(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `client` may try to log in as `name` now (at `now_ms`), and after what wait.
    pub fn admit(&self, client: Client, name: &str, now_ms: i64) -> Admit {
        let maps = self.maps();
        if let Some(e) = maps.clients.get(&client) {
            let due = e.due(ADDRESS_MAX_DELAY_MS);
            if due > now_ms {
                return Admit::RetryIn(Duration::from_millis((due - now_ms) as u64));
            }
        }
        let wait = maps.names.get(name).map_or(0, |e| {
            (e.due(NAME_MAX_DELAY_MS) - now_ms).clamp(0, NAME_MAX_DELAY_MS)
        });
        Admit::After(Duration::from_millis(wait as u64))
    }

    /// Counts a failure by `client` as `name`; returns the client's failures so far.
    pub fn failed(&self, client: Client, name: &str, now_ms: i64) -> u32 {
        let mut maps = self.maps();
        prune(&mut maps.clients, now_ms);
        prune(&mut maps.names, now_ms);
        let bump = |e: &mut Entry| {
            e.failures = e.failures.saturating_add(1);
            e.last_ms = now_ms;
            e.failures
        };
        let fresh = Entry {
            failures: 0,
            last_ms: now_ms,
        };
        bump(maps.names.entry(name.to_owned()).or_insert(fresh));
        bump(maps.clients.entry(client).or_insert(fresh))
    }

    /// Forgets `name`'s failures after a good login. The client's stay: one good account
    /// must not buy an address fresh guesses at the others.
    pub fn succeeded(&self, name: &str) {
        self.maps().names.remove(name);
    }
}

/// Whether the `n`th failure from one client is written to the audit trail: the 1st, 2nd,
/// 4th, 8th... so a guessing run costs a few records, each with its count, not one per guess.
pub fn audited(n: u32) -> bool {
    n.is_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ip: &str) -> Client {
        Client::of(Some(ip.parse().unwrap()))
    }

    #[test]
    fn an_address_waits_longer_and_longer_whatever_name_it_tries() {
        let t = Throttle::default();
        let (x, now) = (at("192.0.2.7"), 1_000_000);
        for i in 0..FREE {
            assert_eq!(
                t.admit(x, &format!("n{i}"), now),
                Admit::After(Duration::ZERO)
            );
            t.failed(x, &format!("n{i}"), now);
        }
        assert_eq!(
            t.admit(x, "other", now),
            Admit::RetryIn(Duration::from_millis(FIRST_DELAY_MS as u64))
        );
        assert!(matches!(
            t.admit(x, "other", now + FIRST_DELAY_MS),
            Admit::After(_)
        ));
        t.failed(x, "other", now + FIRST_DELAY_MS);
        assert_eq!(
            t.admit(x, "other", now + FIRST_DELAY_MS),
            Admit::RetryIn(Duration::from_millis(2 * FIRST_DELAY_MS as u64))
        );
        // Someone else is not held up by x, and waits a little at most for a guessed name.
        assert!(
            matches!(t.admit(at("192.0.2.8"), "other", now), Admit::After(d) if d <= Duration::from_millis(NAME_MAX_DELAY_MS as u64))
        );
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(at("2001:db8::1"), at("2001:db8::ffff:2"));
        assert_ne!(at("2001:db8::1"), at("2001:db8:0:1::1"));
        assert_eq!(at("::ffff:192.0.2.1"), at("192.0.2.1"));
    }

    #[test]
    fn audit_samples_powers_of_two() {
        let got: Vec<u32> = (1..=20).filter(|n| audited(*n)).collect();
        assert_eq!(got, [1, 2, 4, 8, 16]);
    }
}
