//! The life of one hold: wait for the stop, gather context, pick the rule, decide (locally or
//! through the decider, within the deadline), apply, report the outcome and the exit status.
//!
//! Every path ends in a release: a decision, the deadline's on-timeout action, the fail mode
//! when the decider is unreachable, or the task's own disappearance. Refusals the kernel made
//! itself (a traced exec, an io_uring connect) are reported for the audit trail.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use agent_common::{flags, HoldEvent, HoldKind};
use airlock_proto::v1::{
    action_request::Action, ActionRequest, LocalDecision, Outcome, OutcomeKind, ProcessContext,
    Verdict,
};

use crate::{
    action::{self, Described, Subject},
    bpf::{monotonic_ns, Kernel, Release, Released},
    config::{AgentSection, ConnectDeny, FailMode, Mode, OnTimeout, RuleConfig},
    decider::Decider,
    identity::Hasher,
    notice,
    policy::{Decision, Policy},
    procinfo::{self, TaskState},
};

/// How long telling a held task may take before its hold goes on without it.
const NOTICE_LIMIT: Duration = Duration::from_secs(1);
/// How often a waiting hold checks that its task still exists.
const LIVENESS_TICK: Duration = Duration::from_millis(250);
/// How long reading a held task's context may take. It reads what the task controls (its
/// files, its command line; a FIFO or a stalled FUSE server can block forever): past this, the
/// hold is denied.
const EXAMINE_LIMIT: Duration = Duration::from_secs(10);

/// What the agent knows of a held action.
struct Examined {
    ctx: ProcessContext,
    described: Described,
    /// The rule that governs it, if any.
    rule: Option<RuleConfig>,
    /// When that rule only observes: the first rule after it that enforces, which then
    /// governs (an observe rule records; it never lets through what another rule holds).
    enforcing: Option<RuleConfig>,
    /// Whether some rule names self-made files (then a checked file is never cleared).
    self_made_rules: bool,
}

/// Everything a hold needs, shared by all holds.
pub struct Engine {
    /// The kernel side.
    pub kernel: Arc<Kernel>,
    /// Current rules.
    pub policy: RwLock<Arc<Policy>>,
    /// The decider, if configured.
    pub decider: Option<Decider>,
    /// Agent settings.
    pub settings: RwLock<AgentSection>,
    /// Host identity, part of every request id.
    pub host_id: String,
    /// Boot id, so request ids of different boots never collide.
    pub boot_id: String,
    /// Root of procfs (normally /proc).
    pub proc_root: PathBuf,
    /// Holds being handled, by (thread, hold time): the ring and the recovery scan may both
    /// produce the same hold.
    active: Mutex<HashSet<(u32, u64)>>,
    /// Requests waiting for a decision: on the host, and per account.
    pending: Arc<Mutex<Pending>>,
    /// Requests asked ahead and not yet decided, counted apart.
    asked_ahead: Arc<Mutex<Pending>>,
    /// SHA-256 of programs, for recognising copies of held binaries.
    pub hasher: Hasher,
    /// The DNS names in connect rules and the addresses they stand for.
    pub names: Arc<crate::dns::Names>,
    /// Writes held tasks' notices, on a thread of its own.
    notifier: notice::Notifier,
    /// Counters.
    pub metrics: Arc<crate::metrics::AgentMetrics>,
}

/// Requests waiting for a decision, counted against `agent.max_pending` and
/// `agent.max_pending_per_account`.
#[derive(Default)]
struct Pending {
    total: u32,
    by_account: HashMap<String, u32>,
}

/// One request counted in [`Pending`] while it waits; uncounted when dropped.
pub struct PendingSlot {
    pending: Arc<Mutex<Pending>>,
    account: String,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        p.total = p.total.saturating_sub(1);
        if let Some(n) = p.by_account.get_mut(&self.account) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                p.by_account.remove(&self.account);
            }
        }
    }
}

/// Counts a request of `account` in `pending` unless a cap is reached.
fn take_slot(
    pending: &Arc<Mutex<Pending>>,
    account: &str,
    host_cap: u32,
    account_cap: u32,
) -> Option<PendingSlot> {
    let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
    let mine = p.by_account.get(account).copied().unwrap_or(0);
    if p.total >= host_cap || mine >= account_cap {
        return None;
    }
    p.total += 1;
    *p.by_account.entry(account.to_owned()).or_default() += 1;
    Some(PendingSlot {
        pending: pending.clone(),
        account: account.to_owned(),
    })
}

/// What was decided, why, and by whom.
#[derive(Debug, Clone)]
struct Verdicted {
    allow: bool,
    cause: &'static str,
    by: String,
    reason: String,
}

fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Unix time (ms) of a monotonic timestamp.
pub fn mono_to_unix_ms(mono_ns: u64) -> i64 {
    let now_mono = monotonic_ns() as i64;
    unix_ms_now() - (now_mono - mono_ns as i64) / 1_000_000
}

/// Whether a hold is of a network call (a connect or an addressed send).
fn is_net(ev: &HoldEvent) -> bool {
    matches!(
        HoldKind::from_raw(ev.kind),
        Some(HoldKind::Connect | HoldKind::Send)
    )
}

impl Engine {
    /// A new engine.
    pub fn new(
        kernel: Arc<Kernel>,
        policy: Policy,
        decider: Option<Decider>,
        settings: AgentSection,
        host_id: String,
    ) -> Self {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|b| b.trim().chars().take(8).collect())
            .unwrap_or_else(|_| "boot".into());
        let names = Arc::new(crate::dns::Names::new(
            Duration::from_secs(settings.dns_min_ttl_secs.max(1)),
            Duration::from_secs(settings.dns_max_ttl_secs),
        ));
        Self {
            kernel,
            policy: RwLock::new(Arc::new(policy)),
            decider,
            settings: RwLock::new(settings),
            host_id,
            boot_id,
            proc_root: PathBuf::from("/proc"),
            active: Mutex::new(HashSet::new()),
            pending: Arc::default(),
            asked_ahead: Arc::default(),
            hasher: Hasher::default(),
            names,
            notifier: notice::Notifier::default(),
            metrics: Arc::default(),
        }
    }

    /// The agent's settings in force.
    pub fn settings(&self) -> AgentSection {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The request id of a hold: stable across agent restarts, unique per hold.
    pub fn request_id(&self, ev: &HoldEvent) -> String {
        format!(
            "{}-{}-{}-{}",
            self.host_id, self.boot_id, ev.tid, ev.hold_ns
        )
    }

    /// Handles one event from start to release (or, for a refusal the kernel made, to its
    /// report).
    pub async fn handle(self: Arc<Self>, ev: HoldEvent) {
        if ev.flags & flags::REFUSED != 0 {
            self.report_refusal(&ev).await;
            return;
        }
        let key = (ev.tid, ev.hold_ns);
        if !self
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key)
        {
            return;
        }
        if self.kernel.is_held(&ev) {
            self.clone().hold(ev).await;
        }
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }

    /// The deadline of a hold under `rule` (or the default), monotonic ns; `None` for a rule
    /// that waits until someone decides.
    fn deadline(
        &self,
        ev: &HoldEvent,
        rule: Option<&RuleConfig>,
        settings: &AgentSection,
    ) -> Option<u64> {
        if rule.is_some_and(|r| r.on_timeout == OnTimeout::Wait) {
            return None;
        }
        let secs = rule
            .and_then(|r| r.timeout_secs)
            .unwrap_or(settings.hold_timeout_secs);
        Some(ev.hold_ns + Duration::from_secs(secs).as_nanos() as u64)
    }

    /// Counts a new request of `account` against the caps; `None` when one is reached.
    pub fn take_pending(&self, account: &str, settings: &AgentSection) -> Option<PendingSlot> {
        take_slot(
            &self.pending,
            account,
            settings.max_pending,
            settings.max_pending_per_account,
        )
    }

    /// Counts a new request asked ahead (through the local socket) against caps of their own,
    /// so that asking ahead can never use up the room real holds need.
    pub fn take_asked_ahead(&self, account: &str, settings: &AgentSection) -> Option<PendingSlot> {
        take_slot(
            &self.asked_ahead,
            account,
            settings.max_pending,
            settings.max_asked_ahead_per_account,
        )
    }

    /// Tells the held task `line` on its stderr, before its release; never waits long.
    async fn tell(&self, ev: &HoldEvent, id: &str, uid: u32, line: String) {
        // Only the task still held: its pid cannot have been reused by another process.
        if !self.kernel.is_held(ev) {
            return;
        }
        let pid = ev.tgid;
        match self.notifier.tell(pid, uid, line, NOTICE_LIMIT).await {
            Ok(()) => {}
            Err(e) => tracing::debug!(request = %id, pid, error = %e, "task not told"),
        }
    }

    async fn hold(self: Arc<Self>, ev: HoldEvent) {
        let settings = self.settings();
        let id = self.request_id(&ev);
        let dir = procinfo::thread_dir(&self.proc_root, ev.tgid, ev.tid);
        // The kernel stops the task at once and stops it again if anyone else wakes it: wait
        // as long as it takes, never decide on a task that is still running.
        let limit = Duration::from_nanos(
            self.deadline(&ev, None, &settings)
                .unwrap_or(u64::MAX)
                .saturating_sub(monotonic_ns()),
        );
        match procinfo::wait_stopped(&dir, limit).await {
            TaskState::Gone => {
                self.finish(&id, OutcomeKind::Vanished, None, "task-gone");
                return;
            }
            TaskState::Other(state) => {
                tracing::error!(request = %id, pid = ev.tgid, %state, "held task never stopped; killing it");
                self.apply(
                    &ev,
                    &id,
                    Verdicted {
                        allow: false,
                        cause: "never-stopped",
                        by: String::new(),
                        reason: String::new(),
                    },
                    ConnectDeny::Kill,
                )
                .await;
                return;
            }
            TaskState::Stopped => {}
        }
        let Some(Examined {
            ctx,
            described,
            rule,
            enforcing,
            self_made_rules,
        }) = self.examine(ev, &settings).await
        else {
            tracing::error!(request = %id, pid = ev.tgid, "reading the held task's context took too long; denying");
            self.apply(
                &ev,
                &id,
                Verdicted {
                    allow: false,
                    cause: "unreadable",
                    by: String::new(),
                    reason: String::new(),
                },
                ConnectDeny::Kill,
            )
            .await;
            return;
        };
        let Some(mut rule_cfg) = rule else {
            // Held by the prefilter, but no rule matches in full (other arguments, or a file
            // the account made that copies no held binary).
            tracing::debug!(pid = ev.tgid, argv = ?ctx.argv, "no rule matches; resuming");
            if !self_made_rules {
                for (key, stamp) in &described.clears {
                    self.kernel.clear_file(*key, *stamp);
                }
            }
            self.apply(
                &ev,
                &id,
                Verdicted {
                    allow: true,
                    cause: "no-rule",
                    by: String::new(),
                    reason: String::new(),
                },
                ConnectDeny::Refuse,
            )
            .await;
            return;
        };
        if rule_cfg.mode.unwrap_or(settings.mode) == Mode::Observe {
            let observed = self.request(&ev, &id, &ctx, described.clone(), &rule_cfg, None);
            match enforcing {
                None => {
                    self.observe(&ev, &id, observed, &rule_cfg).await;
                    return;
                }
                Some(e) => {
                    // Recorded under an id of its own; the rule that enforces decides.
                    let mut observed = observed;
                    observed.request_id = format!("{id}-observed");
                    self.record_observed(&ev, observed, &rule_cfg);
                    rule_cfg = e;
                }
            }
        }
        let deadline_mono = self.deadline(&ev, Some(&rule_cfg), &settings);
        let mut request = self.request(&ev, &id, &ctx, described, &rule_cfg, deadline_mono);
        let notices = rule_cfg.notices.unwrap_or(settings.notices);
        tracing::info!(
            request = %id, pid = ev.tgid, user = %ctx.user, rule = %rule_cfg.name,
            action = %describe(&request), decision = ?rule_cfg.decision, "held"
        );
        let verdict = match rule_cfg.decision {
            Decision::Allow => Verdicted {
                allow: true,
                cause: "local-rule",
                by: rule_cfg.name.clone(),
                reason: String::new(),
            },
            Decision::Deny => Verdicted {
                allow: false,
                cause: "local-rule",
                by: format!("rule {}", rule_cfg.name),
                reason: String::new(),
            },
            Decision::Ask => {
                let account = if ctx.watched_as.is_empty() {
                    &ctx.user
                } else {
                    &ctx.watched_as
                };
                let Some(_slot) = self.take_pending(account, &settings) else {
                    let reason = format!(
                        "too many pending requests: this host or account {account:?} already \
                         has as many waiting as agent.max_pending / max_pending_per_account allow"
                    );
                    tracing::warn!(request = %id, pid = ev.tgid, account = %account, "denied at once: too many pending requests");
                    request.decided = Some(LocalDecision {
                        verdict: Verdict::Deny as i32,
                        cause: "too-many-pending".into(),
                        reason: reason.clone(),
                        would_be: String::new(),
                    });
                    if let Some(d) = &self.decider {
                        d.record(request);
                    }
                    let v = Verdicted {
                        allow: false,
                        cause: "too-many-pending",
                        by: String::new(),
                        reason: String::new(),
                    };
                    if notices {
                        self.tell(
                            &ev,
                            &id,
                            ctx.uid,
                            notice::decided_line(false, v.cause, "", ""),
                        )
                        .await;
                    }
                    self.apply(&ev, &id, v, rule_cfg.on_deny).await;
                    return;
                };
                if notices {
                    // Seconds left, rounded up: a 2m rule read in 300 ms still says 2m.
                    let wait = deadline_mono
                        .map(|d| d.saturating_sub(monotonic_ns()).div_ceil(1_000_000_000));
                    let line =
                        notice::held_line(&describe_short(&request), &id, wait, &self.web_url());
                    self.tell(&ev, &id, ctx.uid, line).await;
                }
                match self
                    .ask(&ev, request, deadline_mono, rule_cfg.on_timeout, &settings)
                    .await
                {
                    Some(v) => v,
                    None => {
                        self.finish(&id, OutcomeKind::Vanished, None, "task-gone");
                        return;
                    }
                }
            }
        };
        if notices && !(verdict.allow && verdict.cause == "local-rule") {
            let line =
                notice::decided_line(verdict.allow, verdict.cause, &verdict.by, &verdict.reason);
            self.tell(&ev, &id, ctx.uid, line).await;
        }
        self.apply(&ev, &id, verdict, rule_cfg.on_deny).await;
    }

    /// Observe mode: the action runs at once; the record says what the rule would have done.
    async fn observe(
        self: &Arc<Self>,
        ev: &HoldEvent,
        id: &str,
        request: ActionRequest,
        rule: &RuleConfig,
    ) {
        self.record_observed(ev, request, rule);
        self.apply(
            ev,
            id,
            Verdicted {
                allow: true,
                cause: "observe",
                by: String::new(),
                reason: String::new(),
            },
            ConnectDeny::Refuse,
        )
        .await;
    }

    /// Records what observe-mode `rule` would have done with `request`.
    fn record_observed(&self, ev: &HoldEvent, mut request: ActionRequest, rule: &RuleConfig) {
        let id = request.request_id.clone();
        let would_be = match rule.decision {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Ask => "ask",
        };
        tracing::info!(request = %id, pid = ev.tgid, rule = %rule.name, would_be, action = %describe(&request), "observed");
        request.decided = Some(LocalDecision {
            verdict: Verdict::Allow as i32,
            cause: "observe".into(),
            reason: format!(
                "observe mode: rule {:?} would have said {would_be}",
                rule.name
            ),
            would_be: would_be.into(),
        });
        if let Some(d) = &self.decider {
            d.record(request);
        }
    }

    /// The web UI's base URL the decider sent, for links in notices.
    pub fn web_url(&self) -> String {
        self.decider
            .as_ref()
            .and_then(|d| d.rules().borrow().as_ref().map(|r| r.web_url.clone()))
            .unwrap_or_default()
    }

    fn request(
        &self,
        ev: &HoldEvent,
        id: &str,
        ctx: &ProcessContext,
        described: Described,
        rule: &RuleConfig,
        deadline_mono: Option<u64>,
    ) -> ActionRequest {
        ActionRequest {
            request_id: id.to_owned(),
            rule: rule.name.clone(),
            risk: rule.risk.clone(),
            description: rule.description.clone(),
            process: Some(ctx.clone()),
            action: Some(described.action),
            held_at_unix_ms: mono_to_unix_ms(ev.hold_ns),
            deadline_unix_ms: deadline_mono.map_or(0, mono_to_unix_ms),
            on_timeout: verdict_of(rule.on_timeout == OnTimeout::Allow) as i32,
            wait: deadline_mono.is_none(),
            ..Default::default()
        }
    }

    /// Reads the task's context, describes the action and finds its rule, off the async
    /// workers and within [`EXAMINE_LIMIT`]. `None` when that took too long.
    async fn examine(self: &Arc<Self>, ev: HoldEvent, settings: &AgentSection) -> Option<Examined> {
        let engine = self.clone();
        let env_allow = settings.env_allow.clone();
        let job = tokio::task::spawn_blocking(move || engine.examine_now(&ev, &env_allow));
        match tokio::time::timeout(EXAMINE_LIMIT, job).await {
            Ok(Ok(examined)) => Some(examined),
            _ => None,
        }
    }

    fn examine_now(&self, ev: &HoldEvent, env_allow: &[String]) -> Examined {
        let ctx = procinfo::gather(&self.proc_root, ev.tgid, ev.tid, ev.origin_uid, env_allow);
        let policy = self.policy();
        let described = action::describe(ev, &ctx, &self.proc_root, &policy, &self.hasher);
        // Rules that name accounts apply to the account and to the watched account it descends
        // from (a task that became root through sudo is still ci's).
        let accounts = [ctx.user.as_str(), ctx.watched_as.as_str()];
        let matching: Vec<RuleConfig> = match &described.subject {
            Subject::Exec(s) => policy
                .matches_exec(s, &accounts)
                .map(|r| r.config.clone())
                .collect(),
            Subject::Connect {
                addr,
                port,
                sock_type,
            } => policy
                .matches_connect(*addr, *port, *sock_type, &accounts)
                .map(|r| r.config.clone())
                .collect(),
        };
        let mode = self.settings().mode;
        let observes = |r: &RuleConfig| r.mode.unwrap_or(mode) == Mode::Observe;
        let rule = matching.first().cloned();
        let enforcing = if rule.as_ref().is_some_and(observes) {
            matching.into_iter().find(|r| !observes(r))
        } else {
            None
        };
        Examined {
            ctx,
            described,
            rule,
            enforcing,
            self_made_rules: policy.has_self_made_rule(),
        }
    }

    /// Reports a refusal the kernel made on its own: the task was never held, so only the
    /// record is left to make.
    async fn report_refusal(self: &Arc<Self>, ev: &HoldEvent) {
        let (cause, reason) = if ev.flags & flags::TRACED != 0 {
            (
                "traced",
                "the task was being traced (ptrace): a tracer could change what it does after the decision, so the action was refused",
            )
        } else if ev.flags & flags::SCTP_CONNECTX != 0 {
            (
                "sctp-connectx",
                "an SCTP connect to several addresses cannot be held: refused with EACCES",
            )
        } else {
            (
                "io-uring",
                "the call came through io_uring, which cannot be held: refused with EACCES",
            )
        };
        let settings = self.settings();
        let Some(Examined {
            ctx,
            described,
            rule,
            ..
        }) = self.examine(*ev, &settings).await
        else {
            tracing::warn!(
                pid = ev.tgid,
                cause,
                "refused without a hold; its context could not be read"
            );
            return;
        };
        let id = self.request_id(ev);
        let request = ActionRequest {
            request_id: id.clone(),
            rule: rule.map(|r| r.name).unwrap_or_default(),
            process: Some(ctx),
            action: Some(described.action),
            held_at_unix_ms: mono_to_unix_ms(ev.hold_ns),
            deadline_unix_ms: mono_to_unix_ms(ev.hold_ns),
            on_timeout: Verdict::Deny as i32,
            decided: Some(LocalDecision {
                verdict: Verdict::Deny as i32,
                cause: cause.into(),
                reason: reason.into(),
                would_be: String::new(),
            }),
            ..Default::default()
        };
        tracing::warn!(request = %id, pid = ev.tgid, cause, action = %describe(&request), "refused without a hold");
        self.metrics.applied(false, cause, 0.0);
        if let Some(d) = &self.decider {
            d.record(request);
        }
    }

    /// Asks the decider; `None` if the task disappeared while waiting.
    async fn ask(
        &self,
        ev: &HoldEvent,
        request: ActionRequest,
        deadline_mono: Option<u64>,
        on_timeout: OnTimeout,
        settings: &AgentSection,
    ) -> Option<Verdicted> {
        let fail = Verdicted {
            allow: settings.fail_mode == FailMode::Allow,
            cause: "decider-unreachable",
            by: String::new(),
            reason: String::new(),
        };
        let Some(decider) = &self.decider else {
            return Some(fail);
        };
        let remaining = deadline_mono.map_or(Duration::MAX, |d| {
            Duration::from_nanos(d.saturating_sub(monotonic_ns()))
        });
        let grace = remaining.min(Duration::from_secs(settings.unreachable_grace_secs));
        if !decider.wait_connected(grace).await {
            return Some(fail);
        }
        let id = request.request_id.clone();
        let mut answer = decider.ask(request);
        // No deadline for a rule that waits: only a decision or the task's exit ends the hold.
        let expiry = async {
            match deadline_mono {
                Some(d) => {
                    tokio::time::sleep(Duration::from_nanos(d.saturating_sub(monotonic_ns()))).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expiry);
        let mut tick = tokio::time::interval(LIVENESS_TICK);
        loop {
            tokio::select! {
                d = &mut answer => {
                    let Ok(d) = d else { return Some(fail) };
                    let allow = d.verdict == Verdict::Allow as i32;
                    return Some(Verdicted { allow, cause: "decision", by: d.decided_by, reason: d.reason });
                }
                _ = &mut expiry => {
                    decider.forget(&id);
                    return Some(Verdicted { allow: on_timeout == OnTimeout::Allow, cause: "timeout", by: String::new(), reason: String::new() });
                }
                _ = tick.tick() => {
                    if !self.kernel.is_held(ev) {
                        decider.forget(&id);
                        return None;
                    }
                }
            }
        }
    }

    async fn apply(self: &Arc<Self>, ev: &HoldEvent, id: &str, v: Verdicted, on_deny: ConnectDeny) {
        let (how, kind) = release_for(v.allow, is_net(ev), on_deny);
        let released = match self.kernel.release(ev, how) {
            Ok(r) => r,
            Err(e) => {
                // Never leave the task stopped: a denial kills it; an approval that could not
                // be applied is not turned into a kill, and the hold stays for the next try.
                tracing::error!(request = %id, error = %e, allow = v.allow, "releasing the hold failed");
                if !v.allow {
                    let _ = self.kernel.release(ev, Release::Kill);
                }
                return;
            }
        };
        let held_for = monotonic_ns().saturating_sub(ev.hold_ns) as f64 / 1e9;
        self.metrics.applied(v.allow, v.cause, held_for);
        let kind = if released == Released::Vanished {
            OutcomeKind::Vanished
        } else {
            kind
        };
        tracing::info!(request = %id, pid = ev.tgid, allow = v.allow, cause = v.cause, by = %v.by, reason = %v.reason, outcome = ?kind, "released");
        self.finish(id, kind, Some(v.allow), v.cause);
        if kind == OutcomeKind::Resumed && ev.kind == HoldKind::Exec as u32 {
            let engine = self.clone();
            let (tgid, id) = (ev.tgid, id.to_owned());
            tokio::spawn(async move { engine.report_exit(tgid, id).await });
        }
    }

    fn finish(&self, id: &str, kind: OutcomeKind, allow: Option<bool>, cause: &str) {
        if let Some(d) = &self.decider {
            d.report(Outcome {
                request_id: id.to_owned(),
                applied: allow.map_or(Verdict::Unspecified, verdict_of) as i32,
                kind: kind as i32,
                cause: cause.to_owned(),
                exit_code: None,
                signal: None,
                at_unix_ms: unix_ms_now(),
            });
        }
    }

    /// Waits for an allowed exec to finish and reports its exit status.
    async fn report_exit(&self, tgid: u32, id: String) {
        wait_exit(tgid).await;
        // The kernel writes the status in the exit tracepoint, before the pidfd wakes us.
        let status = self.kernel.take_exit(tgid);
        if status.is_none() {
            self.kernel.forget_exit(tgid);
        }
        let (exit_code, signal) = match status {
            Some(s) if s & 0x7f == 0 => (Some((s >> 8) & 0xff), None),
            Some(s) => (None, Some(s & 0x7f)),
            None => (None, None),
        };
        tracing::info!(request = %id, pid = tgid, ?exit_code, ?signal, "exited");
        if let Some(d) = &self.decider {
            d.report(Outcome {
                request_id: id,
                applied: Verdict::Allow as i32,
                kind: OutcomeKind::Exited as i32,
                cause: "exit".into(),
                exit_code,
                signal,
                at_unix_ms: unix_ms_now(),
            });
        }
    }

    /// Denies every hold: for an uninstall, after which nothing would keep them.
    pub fn deny_all(&self, cause: &'static str) {
        for ev in self.kernel.held() {
            let (how, kind) = release_for(false, is_net(&ev), ConnectDeny::Refuse);
            let id = self.request_id(&ev);
            if let Err(e) = self.kernel.release(&ev, how) {
                tracing::error!(request = %id, error = %e, "release failed; killing");
                let _ = self.kernel.release(&ev, Release::Kill);
            }
            tracing::info!(request = %id, pid = ev.tgid, cause, "denied");
            self.finish(&id, kind, Some(false), cause);
        }
    }
}

/// How a verdict is applied, and what the outcome is called: a denied connect or send is
/// refused or killed as its rule says; a denied exec or mapping is killed.
fn release_for(allow: bool, net: bool, on_deny: ConnectDeny) -> (Release, OutcomeKind) {
    match (allow, net, on_deny) {
        (true, _, _) => (Release::Resume, OutcomeKind::Resumed),
        (false, true, ConnectDeny::Refuse) => (Release::Refuse, OutcomeKind::Refused),
        (false, _, _) => (Release::Kill, OutcomeKind::Killed),
    }
}

fn verdict_of(allow: bool) -> Verdict {
    if allow {
        Verdict::Allow
    } else {
        Verdict::Deny
    }
}

/// One line describing the action, for logs.
fn describe(req: &ActionRequest) -> String {
    match &req.action {
        Some(Action::Exec(e)) if !e.program.is_empty() => {
            format!("{} ({} {})", e.argv.join(" "), e.via, e.program)
        }
        Some(Action::Exec(e)) => e.argv.join(" "),
        Some(Action::Connect(c)) => format!("{} {}:{}", c.via, c.address, c.port),
        None => String::new(),
    }
}

/// The action in a few words, for the held task's notice: the command line, or the
/// destination.
fn describe_short(req: &ActionRequest) -> String {
    match &req.action {
        Some(Action::Exec(e)) if !e.argv.is_empty() => e.argv.join(" "),
        Some(Action::Exec(e)) => e.path.clone(),
        Some(Action::Connect(c)) if !c.name.is_empty() => {
            format!("connect to {} ({}):{}", c.name, c.address, c.port)
        }
        Some(Action::Connect(c)) => format!("connect to {}:{}", c.address, c.port),
        None => String::new(),
    }
}

/// Waits until process `pid` has exited, using a pidfd (readable on exit).
async fn wait_exit(pid: u32) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return; // Already gone.
    }
    // SAFETY: the fd was just returned to us and is owned by nobody else.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    // SAFETY: the OwnedFd is moved into the AsyncFd and stays open for its whole life.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
    };
    match registered {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(_) => {
            while procinfo::task_state(std::path::Path::new("/proc"), pid) != TaskState::Gone {
                tokio::time::sleep(LIVENESS_TICK).await;
            }
        }
    }
}
