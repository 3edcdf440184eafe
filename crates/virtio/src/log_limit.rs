//! Rate limiting for log lines a guest can trigger.
//!
//! A driver that breaks a queue after every reset, or floods a device with
//! bad requests, must not fill the VMM's stderr (the daemon's `vmm.err`).
//! Lines go through one token bucket for the whole process: a burst of
//! [`BURST`] lines, then [`PER_SECOND`] a second; lines beyond are dropped
//! and counted, and the next line printed says how many were.

use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

/// Lines printed at once before the limit applies.
pub const BURST: u32 = 20;
/// Lines printed per second past the burst.
pub const PER_SECOND: u32 = 5;

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Print it; `suppressed` lines were dropped since the last one.
    Print { suppressed: u64 },
    /// Drop it.
    Drop,
}

/// A token bucket.
#[derive(Debug)]
pub struct RateLimiter {
    burst: u32,
    per_second: u32,
    tokens: f64,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimiter {
    /// A full bucket of `burst` tokens refilled at `per_second`.
    pub const fn new(burst: u32, per_second: u32) -> RateLimiter {
        RateLimiter {
            burst,
            per_second,
            tokens: burst as f64,
            last: None,
            suppressed: 0,
        }
    }

    /// Whether a line at `now` is printed.
    pub fn admit(&mut self, now: Instant) -> Admit {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last);
            self.tokens = (self.tokens + elapsed.as_secs_f64() * f64::from(self.per_second))
                .min(f64::from(self.burst));
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Admit::Print {
                suppressed: std::mem::take(&mut self.suppressed),
            }
        } else {
            self.suppressed += 1;
            Admit::Drop
        }
    }
}

static LIMITER: Mutex<RateLimiter> = Mutex::new(RateLimiter::new(BURST, PER_SECOND));

/// Prints `line` to stderr unless the process's guest-triggered lines are
/// over their rate.
pub fn log(line: fmt::Arguments<'_>) {
    let admit = LIMITER
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .admit(Instant::now());
    match admit {
        Admit::Print { suppressed: 0 } => eprintln!("{line}"),
        Admit::Print { suppressed } => {
            eprintln!("{line} ({suppressed} similar lines were suppressed)")
        }
        Admit::Drop => {}
    }
}

/// Like `eprintln!`, for a line a guest can trigger: rate-limited.
#[macro_export]
macro_rules! guest_log {
    ($($arg:tt)*) => {
        $crate::log_limit::log(format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_passes_then_lines_are_dropped_and_counted() {
        let mut limiter = RateLimiter::new(3, 1);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.admit(t0), Admit::Print { suppressed: 0 });
        }
        for _ in 0..100 {
            assert_eq!(limiter.admit(t0), Admit::Drop);
        }
        // A second later one token is back, and the line says what was lost.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(limiter.admit(t1), Admit::Print { suppressed: 100 });
        assert_eq!(limiter.admit(t1), Admit::Drop);
    }

    #[test]
    fn the_bucket_refills_only_to_its_burst() {
        let mut limiter = RateLimiter::new(2, 10);
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(limiter.admit(t0), Admit::Print { suppressed: 0 });
        let printed = (0..10)
            .filter(|_| limiter.admit(later) != Admit::Drop)
            .count();
        assert_eq!(printed, 2);
    }
}
