use std::sync::atomic::{AtomicU64, Ordering};

use super::*;

const MS: Duration = Duration::from_millis(1);

/// A clock the test moves by hand.
#[derive(Clone, Default)]
struct FakeClock(Arc<AtomicU64>);

impl FakeClock {
    fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::SeqCst))
    }
}

/// A timer that records when it was last asked to fire.
#[derive(Clone, Default)]
struct FakeTimer(Arc<Mutex<Option<Duration>>>);

impl WakeTimer for FakeTimer {
    fn arm(&mut self, after: Duration) -> std::io::Result<()> {
        *self.0.lock().unwrap() = Some(after);
        Ok(())
    }
    fn clear(&mut self) {
        *self.0.lock().unwrap() = None;
    }
    fn raw_fd(&self) -> RawFd {
        -1
    }
}

fn bucket(size: u64, burst: u64, refill_ms: u64) -> BucketConfig {
    BucketConfig {
        size,
        one_time_burst: burst,
        refill_time: Duration::from_millis(refill_ms),
    }
}

/// A limit of `size` bytes per second, refilled over one second.
fn bandwidth_only(size: u64) -> LimiterConfig {
    LimiterConfig {
        bandwidth: Some(bucket(size, 0, 1000)),
        ops: None,
    }
}

fn limiter(config: LimiterConfig) -> (DeviceLimiter, FakeClock, FakeTimer) {
    let clock = FakeClock::default();
    let timer = FakeTimer::default();
    let l = DeviceLimiter::with_parts(config, Box::new(clock.clone()), Box::new(timer.clone()));
    (l, clock, timer)
}

#[test]
fn a_full_bucket_grants_its_size_then_refills_at_its_rate() {
    let mut b = TokenBucket::new(bucket(1000, 0, 100), Duration::ZERO);
    assert_eq!(b.take(1000, Duration::ZERO), Take::Done);
    assert_eq!(b.take(1, Duration::ZERO), Take::Short(1));
    // 10 tokens per millisecond.
    assert_eq!(b.available(5 * MS), 50);
    assert_eq!(b.take(50, 5 * MS), Take::Done);
    assert_eq!(b.available(5 * MS), 0);
    // Never more than the size.
    assert_eq!(b.available(Duration::from_secs(10)), 1000);
}

#[test]
fn fractions_of_a_token_are_not_lost_between_refills() {
    // 3 tokens per 10 ms: one every 3.33 ms.
    let mut b = TokenBucket::new(bucket(3, 0, 10), Duration::ZERO);
    assert_eq!(b.take(3, Duration::ZERO), Take::Done);
    let mut granted = 0;
    for step in 1..=1000u64 {
        let now = Duration::from_micros(step * 100);
        if b.take(1, now) == Take::Done {
            granted += 1;
        }
    }
    // 100 ms at 300 tokens/s.
    assert_eq!(granted, 30);
}

#[test]
fn the_one_time_burst_is_spent_first_and_never_comes_back() {
    let mut b = TokenBucket::new(bucket(100, 500, 1000), Duration::ZERO);
    assert_eq!(b.available(Duration::ZERO), 600);
    assert_eq!(b.take(550, Duration::ZERO), Take::Done);
    assert_eq!(b.available(Duration::ZERO), 50);
    assert_eq!(b.available(Duration::from_secs(60)), 100);
}

#[test]
fn a_request_larger_than_the_bucket_goes_once_and_leaves_a_debt() {
    let mut b = TokenBucket::new(bucket(100, 0, 100), Duration::ZERO);
    // 1000 tokens/s; a 300-token request on a full 100-token bucket.
    assert_eq!(b.take(300, Duration::ZERO), Take::Done);
    // The next one waits for the 200-token debt and a full bucket.
    let Take::Short(n) = b.take(300, Duration::ZERO) else {
        panic!("a second large request went through at once");
    };
    assert_eq!(b.time_for(n, Duration::ZERO), 300 * MS);
    assert_eq!(b.take(300, 299 * MS), Take::Short(1));
    assert_eq!(b.take(300, 300 * MS), Take::Done);
}

#[test]
fn a_refused_request_says_how_long_to_wait() {
    let config = bandwidth_only(1000);
    let mut l = RateLimiter::new(config, Duration::ZERO);
    assert_eq!(l.consume(800, 1, Duration::ZERO), Ok(()));
    // 500 more needs 300 more tokens: 300 ms at 1000 tokens/s.
    assert_eq!(l.consume(500, 1, Duration::ZERO), Err(300 * MS));
    assert_eq!(l.consume(500, 1, 300 * MS), Ok(()));
}

#[test]
fn an_ops_token_is_given_back_when_bandwidth_refuses() {
    let config = LimiterConfig {
        bandwidth: Some(bucket(100, 0, 1000)),
        ops: Some(bucket(2, 0, 1000)),
    };
    let mut l = RateLimiter::new(config, Duration::ZERO);
    assert_eq!(l.consume(100, 1, Duration::ZERO), Ok(()));
    assert!(l.consume(10, 1, Duration::ZERO).is_err());
    // The refused request cost no op: one op is still there.
    assert_eq!(l.consume(0, 1, Duration::ZERO), Ok(()));
    assert!(l.consume(0, 1, Duration::ZERO).is_err());
}

#[test]
fn ops_limit_alone_counts_requests_not_bytes() {
    let config = LimiterConfig {
        bandwidth: None,
        ops: Some(BucketConfig::from_rate(500, 100 * MS, 0)),
    };
    let mut l = RateLimiter::new(config, Duration::ZERO);
    let mut done = 0;
    for step in 0..1000u32 {
        if l.consume(1 << 20, 1, step * MS).is_ok() {
            done += 1;
        }
    }
    // 50 at start (a full bucket) plus 500/s for 999 ms.
    assert_eq!(done, 50 + 499);
}

#[test]
fn rates_convert_to_buckets_and_back() {
    let b = BucketConfig::from_rate(20 << 20, 100 * MS, 0);
    assert_eq!(b.size, 2 << 20);
    assert_eq!(b.rate(), 20 << 20);
    assert_eq!(BucketConfig::from_rate(1, MS, 0).size, 1);
}

#[test]
fn an_unlimited_limiter_admits_everything() {
    let (l, _clock, timer) = limiter(LimiterConfig::default());
    for _ in 0..1000 {
        assert!(l.admit(u64::MAX / 2, 1));
    }
    assert_eq!(*timer.0.lock().unwrap(), None);
}

#[test]
fn a_refusal_arms_the_timer_and_counts_the_wait() {
    let config = bandwidth_only(1000);
    let (l, clock, timer) = limiter(config);
    assert!(l.admit(1000, 1));
    assert!(!l.admit(500, 1));
    assert_eq!(*timer.0.lock().unwrap(), Some(500 * MS));
    assert!(l.stats().waiting);
    clock.advance(200 * MS);
    assert!(!l.admit(500, 1));
    assert_eq!(*timer.0.lock().unwrap(), Some(300 * MS));
    clock.advance(300 * MS);
    l.timer_fired();
    assert!(l.admit(500, 1));
    let stats = l.stats();
    assert_eq!(stats.throttled, 500 * MS);
    assert_eq!(stats.delayed_ops, 1);
    assert_eq!(stats.delayed_bytes, 500);
    assert!(!stats.waiting);
}

#[test]
fn raising_the_limit_wakes_a_waiting_request() {
    let config = bandwidth_only(1000);
    let (l, _clock, timer) = limiter(config);
    assert!(l.admit(1000, 1));
    assert!(!l.admit(1000, 1));
    let raised = bandwidth_only(10_000);
    l.set_config(raised);
    assert_eq!(*timer.0.lock().unwrap(), Some(Duration::ZERO));
    assert_eq!(l.config(), raised);
    assert!(l.admit(1000, 1));
}

#[test]
fn removing_the_limit_admits_at_once() {
    let config = LimiterConfig {
        bandwidth: None,
        ops: Some(bucket(1, 0, 1000)),
    };
    let (l, _clock, _timer) = limiter(config);
    assert!(l.admit(0, 1));
    assert!(!l.admit(0, 1));
    l.set_config(LimiterConfig::default());
    assert!(l.admit(0, 1));
    assert_eq!(l.stats().delayed_ops, 1);
}

#[test]
fn the_real_timer_fires_and_clears() {
    let mut t = TimerFd::new().unwrap();
    t.arm(Duration::from_millis(1)).unwrap();
    let mut pfd = libc::pollfd {
        fd: t.raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(n, 1, "the timer did not fire within 5 s");
    t.clear();
    pfd.revents = 0;
    // SAFETY: as above.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    assert_eq!(n, 0, "a cleared timer still polls readable");
}
