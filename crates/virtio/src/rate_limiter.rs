//! Token-bucket rate limiting for device queues, in bandwidth (bytes) and in
//! operations (requests or frames).
//!
//! A [`TokenBucket`] holds at most `size` tokens and refills from empty to
//! full in `refill_time`, so it grants `size / refill_time` tokens per
//! second. It starts full. A one-time burst is an extra allowance spent
//! before the bucket and never refilled. A request costs tokens from both
//! buckets of a [`RateLimiter`]; when either has too few, the request waits
//! and the limiter says for how long. A single request larger than a whole
//! bucket is let through once the bucket is full, and its excess is a debt:
//! the bucket stays empty until the debt is refilled, so such requests still
//! average the bucket's rate.
//!
//! [`DeviceLimiter`] wraps a limiter for a device worker: it reads a clock,
//! arms a timerfd the worker waits on in its epoll set when a request must
//! wait (so a throttled queue is never busy-polled), keeps throttling
//! counters, and can be reconfigured from another thread while the device
//! runs. The clock is injected, so the bucket arithmetic is unit-tested
//! without sleeping.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Errors from setting up a limiter.
#[derive(Debug, Error)]
pub enum RateLimiterError {
    /// The wake-up timer could not be created.
    #[error("cannot create the rate limiter's timer")]
    Timer(#[source] std::io::Error),
}

/// One bucket's parameters, as Firecracker's rate limiter names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketConfig {
    /// The most tokens the bucket holds; it starts full.
    pub size: u64,
    /// Extra tokens spent before the bucket's own, once, never refilled.
    pub one_time_burst: u64,
    /// The time the bucket takes to refill from empty to full.
    pub refill_time: Duration,
}

impl BucketConfig {
    /// A bucket granting `rate` tokens per second that holds `refill_time`
    /// worth of them (at least one token).
    pub fn from_rate(rate: u64, refill_time: Duration, one_time_burst: u64) -> BucketConfig {
        let size = (u128::from(rate) * refill_time.as_nanos() / 1_000_000_000).max(1);
        BucketConfig {
            size: u64::try_from(size).unwrap_or(u64::MAX),
            one_time_burst,
            refill_time,
        }
    }

    /// Tokens granted per second.
    pub fn rate(&self) -> u64 {
        let ns = self.refill_time.as_nanos().max(1);
        u64::try_from(u128::from(self.size) * 1_000_000_000 / ns).unwrap_or(u64::MAX)
    }
}

/// The two buckets of a limiter; `None` leaves that dimension unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimiterConfig {
    pub bandwidth: Option<BucketConfig>,
    pub ops: Option<BucketConfig>,
}

impl LimiterConfig {
    /// Whether neither dimension is limited.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }
}

/// What taking tokens from a bucket did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Take {
    /// The tokens were taken.
    Done,
    /// Not enough tokens: nothing was taken; this many more are needed.
    Short(u64),
}

/// A token bucket on a clock given as time since an arbitrary origin.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    config: BucketConfig,
    burst_left: u64,
    budget: u64,
    /// The time up to which refills have been counted. It runs ahead of
    /// the clock while the bucket owes tokens (a request larger than it).
    last_update: Duration,
}

impl TokenBucket {
    /// A full bucket at time `now`. A zero size or refill time is taken as
    /// one token per nanosecond's worth (never zero), so the arithmetic
    /// never divides by zero.
    pub fn new(config: BucketConfig, now: Duration) -> TokenBucket {
        let config = BucketConfig {
            size: config.size.max(1),
            one_time_burst: config.one_time_burst,
            refill_time: config.refill_time.max(Duration::from_nanos(1)),
        };
        TokenBucket {
            config,
            burst_left: config.one_time_burst,
            budget: config.size,
            last_update: now,
        }
    }

    /// The bucket's parameters.
    pub fn config(&self) -> BucketConfig {
        self.config
    }

    /// Tokens available now (bucket and unspent burst).
    pub fn available(&mut self, now: Duration) -> u64 {
        self.refill(now);
        self.budget.saturating_add(self.burst_left)
    }

    fn refill_ns(&self) -> u128 {
        self.config.refill_time.as_nanos()
    }

    /// Adds the tokens refilled since the last update.
    fn refill(&mut self, now: Duration) {
        let Some(elapsed) = now.checked_sub(self.last_update) else {
            return; // Still paying a debt.
        };
        let size = u128::from(self.config.size);
        let tokens = elapsed.as_nanos() * size / self.refill_ns();
        let room = u128::from(self.config.size - self.budget);
        if tokens >= room {
            self.budget = self.config.size;
            self.last_update = now;
            return;
        }
        // tokens < room <= size: fits a u64. Count only the time those
        // tokens took, so the remainder is not lost.
        self.budget += tokens as u64;
        let used = tokens * self.refill_ns() / size;
        self.last_update += duration_ns(used);
    }

    /// The time until `tokens` more than the budget have refilled.
    fn time_for(&self, tokens: u64, now: Duration) -> Duration {
        let size = u128::from(self.config.size);
        let ns = (u128::from(tokens) * self.refill_ns()).div_ceil(size);
        let behind = self.last_update.saturating_sub(now);
        behind + duration_ns(ns)
    }

    /// Takes `tokens` at time `now`, burst first. A request larger than the
    /// whole bucket is taken once the bucket is full, leaving a debt.
    fn take(&mut self, tokens: u64, now: Duration) -> Take {
        self.refill(now);
        let from_burst = tokens.min(self.burst_left);
        let rest = tokens - from_burst;
        if rest > self.config.size {
            if self.budget < self.config.size || self.last_update > now {
                return Take::Short(self.config.size - self.budget);
            }
            // A full bucket and a request larger than it: take it all and
            // owe the excess, paid by the refills to come.
            let debt = u128::from(rest - self.budget);
            self.burst_left -= from_burst;
            self.budget = 0;
            self.last_update =
                now + duration_ns(debt * self.refill_ns() / u128::from(self.config.size));
            return Take::Done;
        }
        if rest > self.budget {
            return Take::Short(rest - self.budget);
        }
        self.burst_left -= from_burst;
        self.budget -= rest;
        Take::Done
    }

    /// Puts back tokens taken for a request that did not go ahead (never
    /// above the bucket's size; burst tokens are not restored).
    fn give_back(&mut self, tokens: u64) {
        self.budget = self.budget.saturating_add(tokens).min(self.config.size);
    }
}

fn duration_ns(ns: u128) -> Duration {
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

/// A bandwidth bucket and an operations bucket.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// A limiter with full buckets at time `now`.
    pub fn new(config: LimiterConfig, now: Duration) -> RateLimiter {
        RateLimiter {
            bandwidth: config.bandwidth.map(|c| TokenBucket::new(c, now)),
            ops: config.ops.map(|c| TokenBucket::new(c, now)),
        }
    }

    /// The limiter's parameters.
    pub fn config(&self) -> LimiterConfig {
        LimiterConfig {
            bandwidth: self.bandwidth.as_ref().map(TokenBucket::config),
            ops: self.ops.as_ref().map(TokenBucket::config),
        }
    }

    /// Lets a request of `bytes` and `ops` through at time `now`, taking
    /// its tokens, or says how long until it may be tried again (and takes
    /// nothing).
    pub fn consume(&mut self, bytes: u64, ops: u64, now: Duration) -> Result<(), Duration> {
        if let Some(bucket) = &mut self.ops {
            if let Take::Short(n) = bucket.take(ops, now) {
                return Err(bucket.time_for(n, now));
            }
        }
        if let Some(bucket) = &mut self.bandwidth {
            if let Take::Short(n) = bucket.take(bytes, now) {
                let wait = bucket.time_for(n, now);
                if let Some(ops_bucket) = &mut self.ops {
                    ops_bucket.give_back(ops);
                }
                return Err(wait);
            }
        }
        Ok(())
    }
}

/// A time source, as the time since an arbitrary fixed origin.
pub trait Clock: Send + Sync {
    fn now(&self) -> Duration;
}

/// The monotonic clock (the timerfd's clock too).
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    pub fn new() -> MonotonicClock {
        MonotonicClock {
            origin: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// How much a limiter has held requests back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ThrottleStats {
    /// Total time a request was waiting for tokens.
    pub throttled: Duration,
    /// Requests that had to wait, and their bytes.
    pub delayed_ops: u64,
    pub delayed_bytes: u64,
    /// Whether a request is waiting now.
    pub waiting: bool,
}

/// A wake-up timer the worker waits on.
pub trait WakeTimer: Send {
    /// Fires once after `after` (replacing any earlier setting).
    fn arm(&mut self, after: Duration) -> std::io::Result<()>;
    /// Clears a fired timer so it stops polling readable.
    fn clear(&mut self);
    /// The fd that polls readable when the timer fired (-1 if none).
    fn raw_fd(&self) -> RawFd;
}

/// A non-blocking monotonic timerfd.
#[derive(Debug)]
pub struct TimerFd(OwnedFd);

impl TimerFd {
    pub fn new() -> std::io::Result<TimerFd> {
        // SAFETY: timerfd_create takes no pointers; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(TimerFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

impl WakeTimer for TimerFd {
    fn arm(&mut self, after: Duration) -> std::io::Result<()> {
        // A zero it_value would disarm the timer: fire in 1 ns instead.
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(after.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: libc::c_long::from(after.subsec_nanos() as i32),
            },
        };
        // SAFETY: `spec` is a valid itimerspec that outlives the call; the
        // old value is not asked for.
        let r =
            unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn clear(&mut self) {
        let mut count = 0u64;
        // SAFETY: reads at most 8 bytes into `count`; the fd is
        // non-blocking, so an unfired timer returns EAGAIN at once.
        unsafe {
            libc::read(
                self.0.as_raw_fd(),
                (&mut count as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

struct Inner {
    limiter: RateLimiter,
    timer: Box<dyn WakeTimer>,
    stats: ThrottleStats,
    /// When the request now waiting was first refused.
    waiting_since: Option<Duration>,
}

/// A limiter as a device worker uses it, shared with whoever changes its
/// limits while the device runs.
pub struct DeviceLimiter {
    clock: Box<dyn Clock>,
    timer_fd: RawFd,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for DeviceLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLimiter")
            .field("config", &self.config())
            .finish_non_exhaustive()
    }
}

impl DeviceLimiter {
    /// A limiter on the monotonic clock with its own timerfd.
    pub fn new(config: LimiterConfig) -> Result<Arc<DeviceLimiter>, RateLimiterError> {
        let timer = TimerFd::new().map_err(RateLimiterError::Timer)?;
        Ok(Arc::new(Self::with_parts(
            config,
            Box::new(MonotonicClock::new()),
            Box::new(timer),
        )))
    }

    /// A limiter on any clock and timer (tests inject both).
    pub fn with_parts(
        config: LimiterConfig,
        clock: Box<dyn Clock>,
        timer: Box<dyn WakeTimer>,
    ) -> DeviceLimiter {
        let now = clock.now();
        DeviceLimiter {
            timer_fd: timer.raw_fd(),
            clock,
            inner: Mutex::new(Inner {
                limiter: RateLimiter::new(config, now),
                timer,
                stats: ThrottleStats::default(),
                waiting_since: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fd the worker waits on: readable when a waiting request may be
    /// tried again.
    pub fn timer_fd(&self) -> RawFd {
        self.timer_fd
    }

    /// Lets a request of `bytes` and `ops` go ahead, or refuses it and arms
    /// the timer for when it may be tried again. A refused request must be
    /// retried (the same one) when the timer fires.
    pub fn admit(&self, bytes: u64, ops: u64) -> bool {
        let now = self.clock.now();
        let mut inner = self.lock();
        match inner.limiter.consume(bytes, ops, now) {
            Ok(()) => {
                if let Some(since) = inner.waiting_since.take() {
                    let s = &mut inner.stats;
                    s.throttled += now.saturating_sub(since);
                    s.delayed_ops += ops;
                    s.delayed_bytes += bytes;
                    s.waiting = false;
                }
                true
            }
            Err(wait) => {
                if inner.waiting_since.is_none() {
                    inner.waiting_since = Some(now);
                    inner.stats.waiting = true;
                }
                if let Err(e) = inner.timer.arm(wait) {
                    // Without a timer the queue would stall: let it go.
                    eprintln!("rate limiter: cannot arm the timer: {e}; the request goes ahead");
                    return true;
                }
                false
            }
        }
    }

    /// Clears the fired timer; call when its fd polls readable.
    pub fn timer_fired(&self) {
        self.lock().timer.clear();
    }

    /// The limits in force.
    pub fn config(&self) -> LimiterConfig {
        self.lock().limiter.config()
    }

    /// Replaces the limits, with full buckets. A request waiting under the
    /// old limits is tried again at once.
    pub fn set_config(&self, config: LimiterConfig) {
        let now = self.clock.now();
        let mut inner = self.lock();
        inner.limiter = RateLimiter::new(config, now);
        if inner.waiting_since.is_some() {
            let _ = inner.timer.arm(Duration::ZERO);
        }
    }

    /// The throttling counters, the current wait included.
    pub fn stats(&self) -> ThrottleStats {
        let now = self.clock.now();
        let inner = self.lock();
        let mut stats = inner.stats;
        if let Some(since) = inner.waiting_since {
            stats.throttled += now.saturating_sub(since);
        }
        stats
    }
}

#[cfg(test)]
#[path = "rate_limiter_tests.rs"]
mod tests;
