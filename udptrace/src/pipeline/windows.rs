//! Path windows: in a counting run (the agent's `--paths windows`) the per-datagram path
//! hooks are attached only for a while — when asked (`POST /api/v1/windows`), for a few
//! seconds after news (a flow's first drop with a reason, a new NAT mapping), and on a
//! duty cycle if configured. Outside a window they are detached, not attached and skipping.
//!
//! [`Windows`] is the shared handle (the HTTP handlers and the sink ask, the pipeline acts);
//! [`Windows::next`] is the state machine the pipeline's tick drives. A window closes in two
//! steps: first no datagram is newly sampled while those in flight finish (`DRAIN`), then
//! the hooks are detached.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;
use tokio::time::Instant;
use udptrace_common::SampleConfig;

/// How long the last datagrams sampled in a window have to finish their paths.
pub const DRAIN: Duration = Duration::from_millis(300);
/// The longest window one request opens.
pub const MAX_WINDOW: Duration = Duration::from_secs(600);

/// Why a window opened (the metrics' `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    Request,
    Drop,
    Nat,
    Cycle,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Drop => "drop",
            Self::Nat => "nat",
            Self::Cycle => "cycle",
        }
    }
}

/// When windows open by themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// A window this long after news; zero: none.
    pub auto: Duration,
    /// At most one automatic window per this long.
    pub cooldown: Duration,
    /// A window of `cycle_for` every this long; `None`: no duty cycle.
    pub cycle_every: Option<Duration>,
    pub cycle_for: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            auto: Duration::from_secs(5),
            cooldown: Duration::from_secs(60),
            cycle_every: None,
            cycle_for: Duration::from_secs(5),
        }
    }
}

/// What the pipeline does on this tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    /// Attach the path hooks and sample with this.
    Open(SampleConfig),
    /// Stop sampling new datagrams (the window ended).
    Drain,
    /// Sample again: a new request came while draining.
    Resume(SampleConfig),
    /// Detach the path hooks.
    Close,
}

#[derive(Debug)]
struct State {
    policy: Policy,
    /// What a window samples.
    sampling: SampleConfig,
    /// The latest end any request asked for.
    until: Option<Instant>,
    /// Why the next window opens (the first request since the last one closed), and when
    /// it was asked for: the window's length counts from when its hooks are attached.
    pending: Option<Reason>,
    asked_at: Option<Instant>,
    open_since: Option<Instant>,
    draining_since: Option<Instant>,
    last_auto: Option<Instant>,
    next_cycle: Option<Instant>,
    opened: BTreeMap<Reason, u64>,
    open_total: Duration,
    /// Why the last window could not open.
    error: Option<String>,
}

/// The shared handle on the path windows, and what wakes the pipeline when one is asked
/// for (between windows it looks at them only once a second).
#[derive(Debug, Clone)]
pub struct Windows {
    state: Arc<Mutex<State>>,
    wake: Arc<tokio::sync::Notify>,
}

/// What `GET /api/v1/windows` and the metrics show.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    /// The path hooks are attached now.
    pub open: bool,
    /// Seconds until the current window ends (0 when closed).
    pub remaining_secs: f64,
    /// Windows opened, by reason.
    pub opened: BTreeMap<&'static str, u64>,
    /// Seconds the path hooks were attached, in all.
    pub open_secs_total: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Windows {
    pub fn new(policy: Policy, sampling: SampleConfig) -> Self {
        let now = Instant::now();
        let state = Arc::new(Mutex::new(State {
            policy,
            sampling,
            until: None,
            pending: None,
            asked_at: None,
            open_since: None,
            draining_since: None,
            last_auto: None,
            next_cycle: policy.cycle_every.map(|every| now + every),
            opened: BTreeMap::new(),
            open_total: Duration::ZERO,
            error: None,
        }));
        Self {
            state,
            wake: Arc::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("path windows")
    }

    /// Returns once a window was asked for (by a request or news) since the last time.
    pub async fn asked(&self) {
        self.wake.notified().await;
    }

    /// When the windows next need a look, if nothing is asked meanwhile: `None` while a
    /// window is wanted, open or closing (look often); else when the duty cycle opens the
    /// next one, if it does.
    pub fn quiet_until(&self, attached: bool) -> Option<Option<Instant>> {
        let s = self.state();
        let busy =
            attached || s.until.is_some() || s.pending.is_some() || s.draining_since.is_some();
        (!busy).then_some(s.next_cycle)
    }

    /// Asks for the path hooks for `length` from now (capped at [`MAX_WINDOW`]); returns
    /// when the window will end.
    pub fn request(&self, length: Duration, reason: Reason) -> Instant {
        let until = self
            .state()
            .ask(Instant::now(), length.min(MAX_WINDOW), reason);
        self.wake.notify_one();
        until
    }

    /// Something new was seen (`Drop`, `Nat`): a window of the policy's length, unless
    /// automatic windows are off or one opened less than the cooldown ago. True if asked.
    pub fn news(&self, reason: Reason) -> bool {
        let now = Instant::now();
        let mut s = self.state();
        if s.policy.auto.is_zero() || s.last_auto.is_some_and(|t| now < t + s.policy.cooldown) {
            return false;
        }
        s.last_auto = Some(now);
        let auto = s.policy.auto;
        s.ask(now, auto, reason);
        drop(s);
        self.wake.notify_one();
        true
    }

    /// What windows sample from now on.
    pub fn set_sampling(&self, sampling: SampleConfig) {
        self.state().sampling = sampling;
    }

    /// The next step, given whether the path hooks are attached.
    pub fn next(&self, attached: bool) -> Action {
        let now = Instant::now();
        let mut s = self.state();
        if let Some(at) = s.next_cycle.filter(|at| now >= *at) {
            let (every, length) = (s.policy.cycle_every.unwrap_or_default(), s.policy.cycle_for);
            s.next_cycle = Some(at + every.max(length + DRAIN));
            s.ask(now, length, Reason::Cycle);
        }
        let wanted = s.until.is_some_and(|u| now < u);
        match (attached, wanted, s.draining_since) {
            (false, true, _) => Action::Open(s.sampling),
            (true, true, Some(_)) => {
                s.draining_since = None;
                Action::Resume(s.sampling)
            }
            (true, false, None) => {
                s.draining_since = Some(now);
                Action::Drain
            }
            (true, false, Some(since)) if now >= since + DRAIN => Action::Close,
            _ => Action::None,
        }
    }

    /// The pipeline attached the path hooks (or could not: `Err`, the request is dropped).
    pub fn opened(&self, result: Result<(), String>) {
        let now = Instant::now();
        let mut s = self.state();
        let reason = s.pending.take().unwrap_or(Reason::Request);
        let asked_at = s.asked_at.take();
        match result {
            Ok(()) => {
                // Attaching took a while (verifying the programs): the window still gives
                // the length asked for.
                if let (Some(until), Some(asked)) = (s.until, asked_at) {
                    s.until = Some(until + (now - asked));
                }
                *s.opened.entry(reason).or_default() += 1;
                s.open_since = Some(now);
                s.draining_since = None;
                s.error = None;
            }
            Err(e) => {
                s.until = None;
                s.error = Some(e);
            }
        }
    }

    /// The pipeline detached the path hooks.
    pub fn closed(&self) {
        let now = Instant::now();
        let mut s = self.state();
        if let Some(since) = s.open_since.take() {
            s.open_total += now - since;
        }
        s.draining_since = None;
        s.until = None;
    }

    pub fn status(&self) -> Status {
        let now = Instant::now();
        let s = self.state();
        let open_now = s.open_since.map_or(Duration::ZERO, |since| now - since);
        Status {
            open: s.open_since.is_some(),
            remaining_secs: s
                .until
                .filter(|_| s.open_since.is_some())
                .map_or(0.0, |u| u.saturating_duration_since(now).as_secs_f64()),
            opened: s.opened.iter().map(|(r, n)| (r.name(), *n)).collect(),
            open_secs_total: (s.open_total + open_now).as_secs_f64(),
            error: s.error.clone(),
        }
    }
}

impl State {
    fn ask(&mut self, now: Instant, length: Duration, reason: Reason) -> Instant {
        let until = now + length;
        if self.until.is_none_or(|u| u < until) {
            self.until = Some(until);
        }
        if self.open_since.is_none() && self.pending.is_none() {
            self.pending = Some(reason);
            self.asked_at = Some(now);
        }
        self.until.unwrap_or(until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLING: SampleConfig = SampleConfig {
        first: 10,
        every: 100,
    };

    #[tokio::test(start_paused = true)]
    async fn a_request_opens_drains_then_closes() {
        let w = Windows::new(Policy::default(), SAMPLING);
        assert_eq!(w.next(false), Action::None);
        w.request(Duration::from_secs(2), Reason::Request);
        assert_eq!(w.next(false), Action::Open(SAMPLING));
        // Attaching takes a second: the window is still 2 s of attached hooks.
        tokio::time::advance(Duration::from_secs(1)).await;
        w.opened(Ok(()));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(w.next(true), Action::None);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(w.status().open);
        assert_eq!(w.next(true), Action::Drain);
        // A request while draining resumes sampling, no reattach.
        w.request(Duration::from_secs(1), Reason::Request);
        assert_eq!(w.next(true), Action::Resume(SAMPLING));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(w.next(true), Action::Drain);
        tokio::time::advance(DRAIN).await;
        assert_eq!(w.next(true), Action::Close);
        w.closed();
        let st = w.status();
        assert!(!st.open);
        assert_eq!(st.opened.get("request"), Some(&1));
        assert!(st.open_secs_total >= 3.0, "{st:?}");
        assert_eq!(w.next(false), Action::None);
    }

    #[tokio::test(start_paused = true)]
    async fn news_opens_at_most_one_window_per_cooldown() {
        let w = Windows::new(Policy::default(), SAMPLING);
        assert!(w.news(Reason::Drop));
        assert!(!w.news(Reason::Nat), "within the cooldown");
        assert_eq!(w.next(false), Action::Open(SAMPLING));
        w.opened(Ok(()));
        assert_eq!(w.status().opened.get("drop"), Some(&1));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(w.news(Reason::Nat));
        let off = Windows::new(
            Policy {
                auto: Duration::ZERO,
                ..Policy::default()
            },
            SAMPLING,
        );
        assert!(!off.news(Reason::Drop));
        assert_eq!(off.next(false), Action::None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_duty_cycle_opens_every_period_and_a_failure_is_shown() {
        let w = Windows::new(
            Policy {
                cycle_every: Some(Duration::from_secs(10)),
                cycle_for: Duration::from_secs(1),
                ..Policy::default()
            },
            SAMPLING,
        );
        assert_eq!(w.next(false), Action::None);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(w.next(false), Action::Open(SAMPLING));
        w.opened(Err("no send hook".into()));
        let st = w.status();
        assert_eq!(st.error.as_deref(), Some("no send hook"));
        assert!(!st.open);
        assert_eq!(
            w.next(false),
            Action::None,
            "a failed window is not retried at once"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(w.next(false), Action::Open(SAMPLING));
        w.opened(Ok(()));
        assert_eq!(w.status().opened.get("cycle"), Some(&1));
    }
}
