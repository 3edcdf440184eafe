//! The management API: routes requests to guest operations and maps their
//! errors to status codes (400 bad body or description, 404 unknown guest,
//! 409 not allowed in the guest's state). docs/api/openapi.json describes
//! every path.

use std::time::Duration;

use serde_json::{json, Value};

use crate::daemon::{Daemon, RegistryError};
use crate::description::one_line;
use crate::guest::GuestError;
use crate::http::Request;

/// The longest stop timeout accepted, in seconds.
pub const MAX_STOP_TIMEOUT: u64 = 3600;
/// The stop timeout when none is given, in seconds.
pub const DEFAULT_STOP_TIMEOUT: u64 = 30;

/// A finished API answer: status and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    pub(crate) fn ok(body: Value) -> Reply {
        Reply { status: 200, body }
    }

    /// An error reply `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Reply {
        Reply {
            status,
            body: json!({ "error": message.into() }),
        }
    }
}

impl From<RegistryError> for Reply {
    fn from(e: RegistryError) -> Reply {
        let status = match &e {
            RegistryError::BadName(_) | RegistryError::Description(_) => 400,
            RegistryError::Exists(_) => 409,
            RegistryError::Unknown(_) => 404,
            RegistryError::Guest(g) => return Reply::from_guest(g),
            RegistryError::Io(_) | RegistryError::Jail(_) => 500,
        };
        Reply::error(status, one_line(&e))
    }
}

impl Reply {
    fn from_guest(e: &GuestError) -> Reply {
        let status = match e {
            GuestError::Conflict { .. } | GuestError::NotAdmitted { .. } | GuestError::InUse(_) => {
                409
            }
            GuestError::Files(_) => 400,
            _ => 500,
        };
        Reply::error(status, one_line(e))
    }
}

impl From<GuestError> for Reply {
    fn from(e: GuestError) -> Reply {
        Reply::from_guest(&e)
    }
}

/// The body of `POST /guests`.
#[derive(Debug)]
struct CreateBody {
    name: String,
    /// The guest description, TOML text.
    config: String,
    /// Start the guest right after creating it.
    start: bool,
}

impl CreateBody {
    /// Parses the body field by field, so that an error names the field.
    fn parse(body: &[u8]) -> Result<CreateBody, String> {
        let fields = match serde_json::from_slice::<UniqueObject>(body) {
            Ok(UniqueObject(fields)) => fields,
            Err(e) if e.is_data() => return Err(format!("body: {e}")),
            Err(e) => return Err(format!("body: not JSON: {e}")),
        };
        if let Some(key) = fields
            .keys()
            .find(|k| !["name", "config", "start"].contains(&k.as_str()))
        {
            return Err(format!("{key}: unknown field"));
        }
        let text = |key: &str| match fields.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!("{key}: not a string")),
            None => Err(format!("{key}: missing")),
        };
        let start = match fields.get("start") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err("start: not true or false".into()),
        };
        Ok(CreateBody {
            name: text("name")?,
            config: text("config")?,
            start,
        })
    }
}

/// A JSON object whose keys are all different (serde_json alone keeps the
/// last of two equal keys, so `{"name":"a","name":"b"}` would pass).
pub(crate) struct UniqueObject(pub(crate) serde_json::Map<String, Value>);

impl<'de> serde::Deserialize<'de> for UniqueObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = UniqueObject;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueObject, A::Error> {
                let mut fields = serde_json::Map::new();
                while let Some((key, value)) = map.next_entry::<String, Value>()? {
                    if fields.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!("{key}: given twice")));
                    }
                    fields.insert(key, value);
                }
                Ok(UniqueObject(fields))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// What the connection layer must do beyond a plain JSON reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    Reply(Reply),
    /// Stream lifecycle events.
    Events,
    /// Send the console log of this guest (its last `tail` bytes).
    ConsoleLog(String, Option<u64>),
    /// Upgrade to a raw byte stream bridged to this guest's console.
    ConsoleAttach(String),
}

/// Routes one request.
pub fn route(daemon: &Daemon, req: &Request) -> Route {
    let segments: Vec<&str> = req.path.trim_end_matches('/').split('/').skip(1).collect();
    let method = req.method.as_str();
    match (method, segments.as_slice()) {
        ("GET", ["guests"]) => Route::Reply(list(daemon)),
        ("POST", ["guests"]) => Route::Reply(create(daemon, &req.body)),
        ("GET", ["events"]) => Route::Events,
        ("GET", ["guests", name]) => Route::Reply(guest_info(daemon, name)),
        ("DELETE", ["guests", name]) => Route::Reply(match daemon.delete(name) {
            Ok(()) => Reply::ok(json!({ "name": name, "state": "deleted" })),
            Err(e) => e.into(),
        }),
        ("GET", ["guests", name, "console"]) => match daemon.get(name) {
            Ok(_) => match req.query("tail").map(str::parse::<u64>) {
                None => Route::ConsoleLog(name.to_string(), None),
                Some(Ok(n)) => Route::ConsoleLog(name.to_string(), Some(n)),
                Some(Err(_)) => Route::Reply(Reply::error(400, "tail: not a byte count")),
            },
            Err(e) => Route::Reply(e.into()),
        },
        ("GET", ["guests", name, "console", "attach"]) => match daemon.get(name) {
            Ok(_) => Route::ConsoleAttach(name.to_string()),
            Err(e) => Route::Reply(e.into()),
        },
        ("POST", ["guests", name, "sched"]) => {
            let (status, body) = crate::sched::post(daemon, name, &req.body);
            Route::Reply(Reply { status, body })
        }
        ("POST", ["guests", name, action]) => Route::Reply(action_on(daemon, name, action, req)),
        (m @ ("PUT" | "PATCH"), ["guests", name, "devices", device, "rate"]) => Route::Reply(
            crate::limits::change(daemon, name, device, m == "PUT", &req.body),
        ),
        (_, ["guests", _, "devices", _, "rate"]) => Route::Reply(Reply::error(
            405,
            format!("{method} is not allowed on {}", req.path),
        )),
        ("PUT", ["vsock-policy"]) => Route::Reply(crate::vsock_route::put(&req.body)),
        (_, ["vsock-policy"]) => Route::Reply(Reply::error(
            405,
            format!("{method} is not allowed on {}", req.path),
        )),
        ("PUT", ["pools", name]) => Route::Reply(crate::pools::put(name, &req.body)),
        (_, ["pools", _]) => Route::Reply(Reply::error(
            405,
            format!("{method} is not allowed on {}", req.path),
        )),
        ("GET", ["switches"]) => Route::Reply(crate::switch::list(daemon)),
        ("PUT", ["switches", name]) => Route::Reply(crate::switch::put(daemon, name, &req.body)),
        ("GET", ["switches", name]) => Route::Reply(crate::switch::show(daemon, name)),
        ("DELETE", ["switches", name]) => Route::Reply(crate::switch::delete(daemon, name)),
        (_, ["switches"] | ["switches", _]) => Route::Reply(Reply::error(
            405,
            format!("{method} is not allowed on {}", req.path),
        )),
        ("PUT", ["regions", name]) => Route::Reply(crate::region::put(daemon, name, &req.body)),
        (_, ["regions", _]) => Route::Reply(Reply::error(
            405,
            format!("{method} is not allowed on {}", req.path),
        )),
        (_, ["guests"] | ["events"] | ["guests", _] | ["guests", _, _] | ["guests", _, _, _]) => {
            Route::Reply(Reply::error(
                405,
                format!("{method} is not allowed on {}", req.path),
            ))
        }
        _ => Route::Reply(Reply::error(404, format!("no such path: {}", req.path))),
    }
}

fn list(daemon: &Daemon) -> Reply {
    // Each guest is asked in its own thread, so that one stalled VMM costs
    // a listing at most one short timeout, not one per guest.
    let all = daemon.all();
    let guests: Vec<Value> = std::thread::scope(|s| {
        let asks: Vec<_> = all.iter().map(|g| s.spawn(|| g.info(false))).collect();
        asks.into_iter()
            .zip(&all)
            .map(|(ask, g)| ask.join().unwrap_or_else(|_| json!({ "name": g.name })))
            .collect()
    });
    Reply::ok(json!({ "guests": guests }))
}

fn guest_info(daemon: &Daemon, name: &str) -> Reply {
    match daemon.get(name) {
        Ok(guest) => {
            let mut info = guest.info(true);
            if let Ok(config) = crate::description::parse_config(&guest.description) {
                let ports = crate::switch::guest_ports(daemon, name, &config);
                if !ports.is_empty() {
                    info["switch_ports"] = Value::Array(ports);
                }
            }
            Reply::ok(info)
        }
        Err(e) => e.into(),
    }
}

fn create(daemon: &Daemon, body: &[u8]) -> Reply {
    let body = match CreateBody::parse(body) {
        Ok(b) => b,
        Err(e) => return Reply::error(400, format!("bad request body: {e}")),
    };
    let guest = match daemon.create(&body.name, &body.config) {
        Ok(g) => g,
        Err(e) => return e.into(),
    };
    if body.start {
        let _op = guest.begin();
        if guest.is_deleted() {
            return Reply::error(404, format!("no guest named '{}'", body.name));
        }
        if let Err(e) = daemon.start_guest(&guest) {
            // All or nothing: a guest that did not start is not kept.
            let mut reply = Reply::from(e);
            let undone = daemon.delete_locked(&body.name, &guest).is_ok();
            if let Some(Value::String(message)) = reply.body.get_mut("error") {
                message.push_str(if undone {
                    "; the guest was not created"
                } else {
                    "; the guest was created but not started"
                });
            }
            return reply;
        }
    }
    Reply {
        status: 201,
        body: guest.info(true),
    }
}

/// Reads `?timeout=SECONDS` of a stop.
fn stop_timeout(req: &Request) -> Result<Duration, Reply> {
    match req.query("timeout") {
        None => Ok(Duration::from_secs(DEFAULT_STOP_TIMEOUT)),
        Some(text) => match text.parse::<u64>() {
            Ok(n) if n <= MAX_STOP_TIMEOUT => Ok(Duration::from_secs(n)),
            _ => Err(Reply::error(
                400,
                format!(
                    "timeout: '{text}' is not a number of seconds from 0 to {MAX_STOP_TIMEOUT}"
                ),
            )),
        },
    }
}

fn action_on(daemon: &Daemon, name: &str, action: &str, req: &Request) -> Reply {
    let guest = match daemon.get(name) {
        Ok(g) => g,
        Err(e) => return e.into(),
    };
    let timeout = if action == "stop" {
        match stop_timeout(req) {
            Ok(t) => t,
            Err(reply) => return reply,
        }
    } else {
        Duration::ZERO
    };
    let _op = guest.begin();
    // The guest may have been deleted while this waited for its lock.
    if guest.is_deleted() {
        return Reply::error(404, format!("no guest named '{name}'"));
    }
    let done: Result<Option<&str>, GuestError> = match action {
        "start" => daemon.start_guest(&guest).map(|()| None),
        "pause" => guest.set_paused(true, &daemon.events).map(|()| None),
        "resume" => guest.set_paused(false, &daemon.events).map(|()| None),
        "stop" => guest.stop(timeout, &daemon.events).map(Some),
        "kill" => guest.kill().map(|()| None),
        _ => return Reply::error(404, format!("no such action: {action}")),
    };
    match done {
        Ok(how) => {
            let mut info = guest.info(true);
            if let Some(how) = how {
                info["stopped_by"] = json!(how);
            }
            Reply::ok(info)
        }
        Err(e) => e.into(),
    }
}
