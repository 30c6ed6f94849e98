//! Per-key rate limits: requests per minute and tokens per minute over sliding 60-second
//! windows, in memory (limits restart empty with the server).
//!
//! Contract:
//! - Each limited key keeps a log of its admitted requests, `(instant, tokens)`, for the last
//!   60 s. `admit` drops what is older, then admits a request if one more request fits under
//!   `rpm` and its estimated tokens fit under `tpm`; an admitted request joins the log, a refused
//!   one does not. A key with neither limit is admitted without being logged.
//! - `settle` replaces a request's estimate with its real token count, so the window holds
//!   real usage once requests finish.
//! - Reported `reset` values: for an admitted request, the time until the oldest logged
//!   request (or token) leaves the window, i.e. until capacity next grows; for a refused one,
//!   the time until enough has left the window for this request to fit. Durations print the
//!   way OpenAI's `x-ratelimit-reset-*` headers do: `20ms`, `1s`, `1.5s`, `6m0s`.
//! - Time is passed in (`now`), never read here, so tests are exact.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::KeyInfo;

/// The length of the sliding window.
pub const WINDOW: Duration = Duration::from_secs(60);

/// One limit's state as the `x-ratelimit-*` headers report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub limit: u64,
    pub remaining: u64,
    pub reset: Duration,
}

/// An admitted request's view of its key's limits; `None` for a limit the key does not have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Headroom {
    pub requests: Option<Window>,
    pub tokens: Option<Window>,
}

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    /// Requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
    /// The request alone needs more tokens than the key's tpm: waiting will not help.
    RequestTooLarge,
}

/// A refused request: what refused it, and when to retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limited {
    pub kind: LimitKind,
    pub key_name: String,
    /// The request's token estimate.
    pub requested_tokens: u64,
    pub requests: Option<Window>,
    pub tokens: Option<Window>,
    /// How long until the request would fit (a full window for `RequestTooLarge`).
    pub retry_after: Duration,
}

#[derive(Clone, Copy, Debug)]
struct Event {
    at: Instant,
    tokens: u64,
}

#[derive(Default)]
struct KeyLog {
    /// Admitted requests of the last `WINDOW`, oldest first.
    events: VecDeque<Event>,
    /// Sum of `events[..].tokens`.
    tokens: u64,
}

/// Remaining time until `at + WINDOW`, seen from `now`.
fn until_expiry(at: Instant, now: Instant) -> Duration {
    (at + WINDOW).saturating_duration_since(now)
}

impl KeyLog {
    fn prune(&mut self, now: Instant) {
        while let Some(e) = self.events.front() {
            if now.saturating_duration_since(e.at) < WINDOW {
                break;
            }
            self.tokens -= e.tokens;
            self.events.pop_front();
        }
    }

    /// Time until at least `need` tokens have left the window.
    fn wait_for_tokens(&self, need: u64, now: Instant) -> Duration {
        let mut freed = 0;
        for e in &self.events {
            freed += e.tokens;
            if freed >= need {
                return until_expiry(e.at, now);
            }
        }
        WINDOW
    }

    /// Time until the oldest logged request, or token, leaves the window.
    fn next_request_frees(&self, now: Instant) -> Duration {
        self.events
            .front()
            .map_or(Duration::ZERO, |e| until_expiry(e.at, now))
    }

    fn next_token_frees(&self, now: Instant) -> Duration {
        self.events
            .iter()
            .find(|e| e.tokens > 0)
            .map_or(Duration::ZERO, |e| until_expiry(e.at, now))
    }
}

/// Rate limits of all keys. `Send + Sync`; the server owns one.
#[derive(Default)]
pub struct RateLimiter {
    keys: Mutex<HashMap<i64, KeyLog>>,
}

impl RateLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// [`RateLimiter::admit`]'s decision over a log read from a shared store: `past` holds the
    /// key's admitted requests of the last window, oldest first, as (age, tokens).
    pub(crate) fn admit_from_log(
        key: &KeyInfo,
        past: &[(Duration, u64)],
        tokens: u64,
    ) -> Result<Headroom, Limited> {
        let now = Instant::now();
        let mut log = KeyLog::default();
        for &(age, t) in past {
            log.events.push_back(Event {
                at: now.checked_sub(age).unwrap_or(now),
                tokens: t,
            });
            log.tokens += t;
        }
        let limiter = RateLimiter {
            keys: Mutex::new(HashMap::from([(key.id, log)])),
        };
        limiter.admit(key, tokens, now)
    }

    /// Admit a request of about `tokens` tokens (prompt + most it may generate) at `now`.
    pub fn admit(&self, key: &KeyInfo, tokens: u64, now: Instant) -> Result<Headroom, Limited> {
        if key.rpm.is_none() && key.tpm.is_none() {
            return Ok(Headroom {
                requests: None,
                tokens: None,
            });
        }
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let log = keys.entry(key.id).or_default();
        log.prune(now);
        let count = log.events.len() as u64;

        // How long each limit makes this request wait (None: it fits now).
        let rpm_wait = key.rpm.map(u64::from).and_then(|rpm| {
            (count >= rpm).then(|| {
                // The (count - rpm + 1) oldest requests must leave; the last of them is at
                // index count - rpm.
                let i = usize::try_from(count - rpm).unwrap_or(0);
                log.events
                    .get(i)
                    .map_or(WINDOW, |e| until_expiry(e.at, now))
            })
        });
        let too_large = key.tpm.is_some_and(|tpm| tokens > tpm);
        let tpm_wait = key.tpm.and_then(|tpm| {
            let over = (log.tokens + tokens).saturating_sub(tpm);
            (over > 0 && !too_large).then(|| log.wait_for_tokens(over, now))
        });

        if too_large || rpm_wait.is_some() || tpm_wait.is_some() {
            let requests = key.rpm.map(|rpm| Window {
                limit: u64::from(rpm),
                remaining: u64::from(rpm).saturating_sub(count),
                reset: rpm_wait.unwrap_or_else(|| log.next_request_frees(now)),
            });
            let tokens_w = key.tpm.map(|tpm| Window {
                limit: tpm,
                remaining: tpm.saturating_sub(log.tokens),
                reset: tpm_wait.unwrap_or_else(|| log.next_token_frees(now)),
            });
            let (kind, retry_after) = if too_large {
                (LimitKind::RequestTooLarge, WINDOW)
            } else {
                let r = rpm_wait.unwrap_or(Duration::ZERO);
                let t = tpm_wait.unwrap_or(Duration::ZERO);
                if t > r {
                    (LimitKind::Tokens, t)
                } else {
                    (LimitKind::Requests, r)
                }
            };
            return Err(Limited {
                kind,
                key_name: key.name.clone(),
                requested_tokens: tokens,
                requests,
                tokens: tokens_w,
                retry_after,
            });
        }

        log.events.push_back(Event { at: now, tokens });
        log.tokens += tokens;
        let count = count + 1;
        Ok(Headroom {
            requests: key.rpm.map(|rpm| Window {
                limit: u64::from(rpm),
                remaining: u64::from(rpm) - count,
                reset: log.next_request_frees(now),
            }),
            tokens: key.tpm.map(|tpm| Window {
                limit: tpm,
                remaining: tpm - log.tokens,
                reset: log.next_token_frees(now),
            }),
        })
    }

    /// Replace the estimate of a request admitted at `at` with the tokens it really used. The
    /// request is found by its admission instant and estimate (failing that, the newest logged
    /// request with that estimate admitted no later than `at`); one that already left the
    /// window no longer counts, so there is nothing to correct.
    pub fn settle(&self, key_id: i64, estimated: u64, actual: u64, at: Instant) {
        if estimated == actual {
            return;
        }
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(log) = keys.get_mut(&key_id) else {
            return;
        };
        let found = log
            .events
            .iter()
            .rposition(|e| e.at == at && e.tokens == estimated)
            .or_else(|| {
                log.events
                    .iter()
                    .rposition(|e| e.at <= at && e.tokens == estimated)
            });
        if let Some(i) = found {
            let e = &mut log.events[i];
            log.tokens = log.tokens - e.tokens + actual;
            e.tokens = actual;
        }
    }
}

/// A duration as OpenAI's reset headers print it (Go's `time.Duration` format), rounded up
/// to the millisecond so a client never retries early: `0s`, `20ms`, `1s`, `1.5s`, `6m0s`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000);
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m, s_ms) = (ms / 3_600_000, ms / 60_000 % 60, ms % 60_000);
    let secs = if s_ms % 1000 == 0 {
        format!("{}s", s_ms / 1000)
    } else {
        let frac = format!("{:03}", s_ms % 1000);
        format!("{}.{}s", s_ms / 1000, frac.trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

fn window_headers(requests: Option<Window>, tokens: Option<Window>) -> Vec<(&'static str, String)> {
    let mut h = Vec::with_capacity(6);
    if let Some(w) = requests {
        h.push(("x-ratelimit-limit-requests", w.limit.to_string()));
        h.push(("x-ratelimit-remaining-requests", w.remaining.to_string()));
        h.push(("x-ratelimit-reset-requests", format_reset(w.reset)));
    }
    if let Some(w) = tokens {
        h.push(("x-ratelimit-limit-tokens", w.limit.to_string()));
        h.push(("x-ratelimit-remaining-tokens", w.remaining.to_string()));
        h.push(("x-ratelimit-reset-tokens", format_reset(w.reset)));
    }
    h
}

impl Headroom {
    /// The `x-ratelimit-*` headers; none for a limit the key does not have.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        window_headers(self.requests, self.tokens)
    }
}

impl Limited {
    /// The `x-ratelimit-*` headers (`Retry-After` is [`Limited::retry_after_secs`]).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        window_headers(self.requests, self.tokens)
    }

    /// Whole seconds to wait, rounded up, at least 1 (for a `Retry-After` header).
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_nanos().div_ceil(1_000_000_000).max(1) as u64
    }

    /// Whether waiting can help (not for a request larger than the key's whole tpm).
    pub fn retryable(&self) -> bool {
        self.kind != LimitKind::RequestTooLarge
    }

    /// A message for the client: which limit, its value, and when to retry.
    pub fn message(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Limited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let limit = |w: Option<Window>| w.map_or(0, |w| w.limit);
        match self.kind {
            LimitKind::Requests => write!(
                f,
                "rate limit reached for key `{}`: {} requests per minute (rpm); retry in {}",
                self.key_name,
                limit(self.requests),
                format_reset(self.retry_after)
            ),
            LimitKind::Tokens => {
                let used = self.tokens.map_or(0, |w| w.limit - w.remaining);
                write!(
                    f,
                    "rate limit reached for key `{}`: {} tokens per minute (tpm), {} used in the last minute, this request needs about {}; retry in {}",
                    self.key_name,
                    limit(self.tokens),
                    used,
                    self.requested_tokens,
                    format_reset(self.retry_after)
                )
            }
            LimitKind::RequestTooLarge => write!(
                f,
                "request too large for key `{}`: it needs about {} tokens (prompt + max_tokens) but the key allows {} tokens per minute (tpm); shorten the prompt or lower max_tokens",
                self.key_name,
                self.requested_tokens,
                limit(self.tokens)
            ),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The shared store's path (a log of ages read from the database) decides as the
    /// in-memory limiter does, request after request, including the `reset` it reports
    /// (to the millisecond the store keeps).
    #[test]
    fn admit_from_log_matches_the_in_memory_limiter() {
        let k = key(7, Some(5), Some(900));
        let mem = RateLimiter::new();
        let t0 = Instant::now();
        let mut log: Vec<(u64, u64)> = Vec::new(); // (admitted at ms, tokens)
        let mut seed = 12345u64;
        let mut now_ms = 0u64;
        for _ in 0..400 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            now_ms += (seed >> 33) % 4000;
            let tokens = 50 + (seed >> 40) % 200;
            let now = t0 + Duration::from_millis(now_ms);
            let past: Vec<(Duration, u64)> = log
                .iter()
                .filter(|(at, _)| now_ms - at < WINDOW.as_millis() as u64)
                .map(|&(at, t)| (Duration::from_millis(now_ms - at), t))
                .collect();
            let shared = RateLimiter::admit_from_log(&k, &past, tokens);
            let local = mem.admit(&k, tokens, now);
            match (&local, &shared) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(
                        a.requests.map(|w| w.remaining),
                        b.requests.map(|w| w.remaining)
                    );
                    assert_eq!(a.tokens.map(|w| w.remaining), b.tokens.map(|w| w.remaining));
                    log.push((now_ms, tokens));
                }
                (Err(a), Err(b)) => {
                    assert_eq!(a.kind, b.kind);
                    let (ra, rb) = (a.retry_after.as_millis(), b.retry_after.as_millis());
                    assert!(ra.abs_diff(rb) <= 1, "{ra} vs {rb} ms");
                }
                _ => panic!("at {now_ms} ms: in memory {local:?}, from the log {shared:?}"),
            }
        }
        assert!(log.len() > 50 && log.len() < 400, "{} admitted", log.len());
    }

    fn key(id: i64, rpm: Option<u32>, tpm: Option<u64>) -> KeyInfo {
        KeyInfo {
            id,
            name: format!("k{id}"),
            prefix: "flm-abcd".into(),
            rpm,
            tpm,
            budget_usd: None,
            created: 0,
            revoked: None,
            admin: false,
        }
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn header<'a>(h: &'a [(&'static str, String)], name: &str) -> &'a str {
        &h.iter().find(|(n, _)| *n == name).unwrap().1
    }

    #[test]
    fn limiter_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<RateLimiter>();
    }

    #[test]
    fn reset_format_matches_openai() {
        assert_eq!(format_reset(Duration::ZERO), "0s");
        assert_eq!(format_reset(Duration::from_micros(1)), "1ms");
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_millis(999)), "999ms");
        assert_eq!(format_reset(secs(1.0)), "1s");
        assert_eq!(format_reset(secs(1.5)), "1.5s");
        assert_eq!(format_reset(Duration::from_millis(59_250)), "59.25s");
        assert_eq!(format_reset(secs(360.0)), "6m0s");
        assert_eq!(format_reset(Duration::from_millis(90_025)), "1m30.025s");
        assert_eq!(format_reset(secs(3600.0)), "1h0m0s");
        // Rounded up, never down.
        assert_eq!(format_reset(Duration::from_nanos(1_000_000_001)), "1.001s");
    }

    #[test]
    fn unlimited_keys_have_no_headers() {
        let rl = RateLimiter::new();
        let k = key(1, None, None);
        let t0 = Instant::now();
        for _ in 0..10_000 {
            let h = rl.admit(&k, 1_000_000, t0).unwrap();
            assert!(h.headers().is_empty());
        }
    }

    #[test]
    fn rpm_window_slides() {
        let rl = RateLimiter::new();
        let k = key(1, Some(3), None);
        let t0 = Instant::now();
        for (i, at) in [0.0, 10.0, 20.0].into_iter().enumerate() {
            let h = rl.admit(&k, 0, t0 + secs(at)).unwrap();
            let w = h.requests.unwrap();
            assert_eq!((w.limit, w.remaining), (3, 2 - i as u64));
            // The oldest request (t=0) leaves the window at t=60.
            assert_eq!(w.reset, secs(60.0 - at));
            assert!(h.tokens.is_none());
            assert_eq!(h.headers().len(), 3, "no token headers without tpm");
        }
        let e = rl.admit(&k, 0, t0 + secs(30.0)).unwrap_err();
        assert_eq!(e.kind, LimitKind::Requests);
        assert_eq!(e.retry_after, secs(30.0));
        assert_eq!(e.retry_after_secs(), 30);
        assert!(e.retryable());
        let h = e.headers();
        assert_eq!(header(&h, "x-ratelimit-limit-requests"), "3");
        assert_eq!(header(&h, "x-ratelimit-remaining-requests"), "0");
        assert_eq!(header(&h, "x-ratelimit-reset-requests"), "30s");
        let m = e.message();
        assert!(
            m.contains("3 requests per minute (rpm)") && m.contains("retry in 30s"),
            "{m}"
        );
        // A refused request is not counted: just before t=60 still full, at t=60 one slot.
        assert!(rl.admit(&k, 0, t0 + secs(59.999)).is_err());
        let h = rl.admit(&k, 0, t0 + secs(60.0)).unwrap();
        assert_eq!(h.requests.unwrap().remaining, 0);
        // Now t=10, 20, 60 are in the window: the next slot frees at t=70.
        let e = rl.admit(&k, 0, t0 + secs(61.0)).unwrap_err();
        assert_eq!(e.retry_after, secs(9.0));
        // Keys are independent.
        assert!(rl.admit(&key(2, Some(3), None), 0, t0 + secs(61.0)).is_ok());
    }

    #[test]
    fn tpm_waits_for_enough_tokens_to_leave() {
        let rl = RateLimiter::new();
        let k = key(1, None, Some(1000));
        let t0 = Instant::now();
        rl.admit(&k, 300, t0).unwrap();
        rl.admit(&k, 300, t0 + secs(10.0)).unwrap();
        let h = rl.admit(&k, 300, t0 + secs(20.0)).unwrap();
        let w = h.tokens.unwrap();
        assert_eq!((w.limit, w.remaining, w.reset), (1000, 100, secs(40.0)));
        let h = h.headers();
        assert_eq!(header(&h, "x-ratelimit-remaining-tokens"), "100");
        assert_eq!(header(&h, "x-ratelimit-reset-tokens"), "40s");
        assert!(h.iter().all(|(n, _)| !n.ends_with("-requests")));
        // 500 more needs 400 freed: the first two requests (t=0, t=10) must leave → t=70.
        let e = rl.admit(&k, 500, t0 + secs(30.0)).unwrap_err();
        assert_eq!(e.kind, LimitKind::Tokens);
        assert_eq!(e.retry_after, secs(40.0));
        let m = e.message();
        assert!(
            m.contains("1000 tokens per minute (tpm)")
                && m.contains("900 used")
                && m.contains("needs about 500")
                && m.contains("retry in 40s"),
            "{m}"
        );
        // 100 still fits exactly.
        assert_eq!(
            rl.admit(&k, 100, t0 + secs(30.0))
                .unwrap()
                .tokens
                .unwrap()
                .remaining,
            0
        );
        // Larger than the whole limit: never fits, and says so.
        let e = rl.admit(&k, 1001, t0 + secs(500.0)).unwrap_err();
        assert_eq!(e.kind, LimitKind::RequestTooLarge);
        assert!(!e.retryable());
        assert!(e.message().contains("lower max_tokens"), "{}", e.message());
    }

    #[test]
    fn settle_corrects_the_estimate() {
        let rl = RateLimiter::new();
        let k = key(7, Some(100), Some(1000));
        let t0 = Instant::now();
        rl.admit(&k, 800, t0).unwrap(); // prompt + max_tokens
        assert!(rl.admit(&k, 300, t0 + secs(1.0)).is_err());
        // The request stopped early: 250 real tokens.
        rl.settle(7, 800, 250, t0);
        let h = rl.admit(&k, 300, t0 + secs(1.0)).unwrap();
        assert_eq!(h.tokens.unwrap().remaining, 1000 - 250 - 300);
        // Settling by the finish instant (after admission) finds the newest matching request.
        rl.settle(7, 300, 700, t0 + secs(5.0));
        let e = rl.admit(&k, 100, t0 + secs(6.0)).unwrap_err();
        assert_eq!(e.tokens.unwrap().remaining, 50);
        // Requests that left the window, and unknown keys, are nothing to settle.
        rl.settle(7, 999, 1, t0);
        rl.settle(8, 1, 2, t0);
        assert_eq!(
            rl.admit(&k, 0, t0 + secs(6.0))
                .unwrap()
                .tokens
                .unwrap()
                .remaining,
            50
        );
        // Settled tokens still leave the window on time.
        let h = rl.admit(&k, 0, t0 + secs(61.5)).unwrap();
        assert_eq!(h.tokens.unwrap().remaining, 1000);
    }

    #[test]
    fn both_limits_report_the_longer_wait() {
        let rl = RateLimiter::new();
        let k = key(1, Some(2), Some(100));
        let t0 = Instant::now();
        rl.admit(&k, 90, t0).unwrap();
        rl.admit(&k, 10, t0 + secs(30.0)).unwrap();
        // rpm frees at t=60; 50 tokens need the t=0 request gone (also t=60): tie → requests.
        let e = rl.admit(&k, 50, t0 + secs(31.0)).unwrap_err();
        assert_eq!((e.kind, e.retry_after), (LimitKind::Requests, secs(29.0)));
        // 100 tokens need both gone (t=90): tokens win.
        let e = rl.admit(&k, 100, t0 + secs(31.0)).unwrap_err();
        assert_eq!((e.kind, e.retry_after), (LimitKind::Tokens, secs(59.0)));
        assert_eq!(e.headers().len(), 6);
        assert_eq!(e.retry_after_secs(), 59);
    }

    #[test]
    fn concurrent_admits_never_exceed_rpm() {
        let rl = std::sync::Arc::new(RateLimiter::new());
        let k = key(1, Some(50), None);
        let t0 = Instant::now();
        let admitted: usize = (0..8)
            .map(|_| {
                let (rl, k) = (rl.clone(), k.clone());
                std::thread::spawn(move || (0..100).filter(|_| rl.admit(&k, 1, t0).is_ok()).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(admitted, 50);
    }
}
