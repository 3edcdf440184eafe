//! `PUT` and `PATCH /guests/NAME/devices/DEVICE/rate`: a running guest's
//! disk and NIC rate limits, changed through its VMM's control socket.
//!
//! The body is an object of rate keys (`{"bandwidth": "20MiB/s", "ops":
//! 500}`; see `vmm::rate`). `PATCH` merges it into the limit in force
//! (`null` removes a key); `PUT` replaces the limit (`{}` removes it). Each
//! value is checked here with the VMM's own parser, so a bad one is a 400
//! naming its key before the VMM is asked; the VMM checks the merged limit
//! and refuses an unknown device (404). Whatever is refused, the old limit
//! stays in force.

use std::time::Duration;

use serde_json::{json, Value};

use crate::api::{Reply, UniqueObject};
use crate::daemon::Daemon;
use crate::description::one_line;
use crate::process::{self, ProcessError};

/// How long the VMM has to answer a change.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Changes `device`'s limits on guest `name`; `replace` for `PUT`.
pub fn change(daemon: &Daemon, name: &str, device: &str, replace: bool, body: &[u8]) -> Reply {
    let rate = match serde_json::from_slice::<UniqueObject>(body) {
        Ok(UniqueObject(fields)) => Value::Object(fields),
        Err(e) if e.is_data() => return Reply::error(400, format!("bad request body: {e}")),
        Err(e) => return Reply::error(400, format!("bad request body: not JSON: {e}")),
    };
    let request = json!({ "op": "limit", "device": device, "rate": rate, "replace": replace });
    let Value::Object(fields) = &request else {
        return Reply::error(500, "cannot build the request");
    };
    if let Err(e) = config::rate::parse_limit_request(fields) {
        return Reply::error(400, e);
    }
    let guest = match daemon.get(name) {
        Ok(g) => g,
        Err(e) => return e.into(),
    };
    let _op = guest.begin();
    let state = guest.record().state;
    if guest.is_deleted() {
        return Reply::error(404, format!("no guest named '{name}'"));
    }
    if !state.is_live() {
        return Reply::error(
            409,
            format!(
                "guest '{name}' is {}; rate limits change only while it runs",
                state.as_str()
            ),
        );
    }
    match process::control(&guest.runtime(), &request, TIMEOUT) {
        Ok(reply) => Reply {
            status: 200,
            body: json!({ "name": name, "limits": reply["limits"] }),
        },
        Err(ProcessError::Refused(why)) if why.starts_with("device:") => Reply::error(404, why),
        Err(ProcessError::Refused(why)) => Reply::error(400, why),
        Err(e) => Reply::error(500, one_line(&e)),
    }
}
