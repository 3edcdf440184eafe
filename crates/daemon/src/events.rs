//! The lifecycle event bus: every state change of every guest becomes one
//! JSON line, delivered to each subscriber of `GET /events`.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// One lifecycle event.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub guest: String,
    /// What happened: created, started, paused, resumed, stopped, crashed,
    /// deleted, adopted.
    pub event: &'static str,
    /// The guest's state after the event (`deleted` after a delete).
    pub state: String,
    /// Why the guest ended, for stopped and crashed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Fans events out to subscribers; a subscriber that went away is dropped
/// at the next event.
#[derive(Debug, Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<Sender<Event>>>,
}

impl EventBus {
    /// A new receiver of every later event.
    pub fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = channel();
        self.lock().push(tx);
        rx
    }

    /// Sends `event` to every live subscriber.
    pub fn publish(&self, event: Event) {
        self.lock().retain(|tx| tx.send(event.clone()).is_ok());
    }

    /// Builds and publishes an event stamped now.
    pub fn emit(&self, guest: &str, event: &'static str, state: &str, reason: Option<String>) {
        self.publish(Event {
            time_ms: now_ms(),
            guest: guest.to_string(),
            event,
            state: state.to_string(),
            reason,
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Sender<Event>>> {
        self.subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subscriber_sees_events_after_it_subscribed() {
        let bus = EventBus::default();
        bus.emit("a", "created", "created", None);
        let one = bus.subscribe();
        let two = bus.subscribe();
        bus.emit("a", "started", "running", None);
        assert_eq!(one.try_recv().expect("event").event, "started");
        assert_eq!(two.try_recv().expect("event").event, "started");
        assert!(one.try_recv().is_err());
    }

    #[test]
    fn dropped_subscribers_are_forgotten() {
        let bus = EventBus::default();
        drop(bus.subscribe());
        bus.emit("a", "created", "created", None);
        assert!(bus.lock().is_empty());
    }
}
