//! The control protocol: one JSON object per line on `control.sock`, one
//! JSON reply line each. A bad line gets `{"ok":false,"error":...}` and the
//! connection stays open.

use serde_json::{json, Map, Value};
use switch::{MacAddr, VlanMode};

/// A request, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    AddPort {
        port: String,
        mac: MacAddr,
        vlan: VlanMode,
    },
    RemovePort {
        port: String,
    },
    Show,
    Shutdown,
}

/// Whether `name` is a valid port name: `[A-Za-z0-9_.-]{1,64}`.
pub fn valid_port_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
        && name != "."
        && name != ".."
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<MacAddr> {
    let mut out = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut out {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(MacAddr(out))
}

fn vlan_id(v: &Value, field: &str) -> Result<u16, String> {
    v.as_u64()
        .and_then(|n| u16::try_from(n).ok())
        .ok_or_else(|| format!("`{field}`: a VLAN is a number from 1 to 4094"))
}

/// Parses `{"access":N}` or `{"trunk":[N,...]}`.
pub fn parse_vlan(v: &Value) -> Result<VlanMode, String> {
    let obj = v
        .as_object()
        .filter(|o| o.len() == 1)
        .ok_or("`vlan` must be {\"access\":N} or {\"trunk\":[N,...]}")?;
    match obj.iter().next() {
        Some((k, n)) if k == "access" => Ok(VlanMode::Access(vlan_id(n, "vlan.access")?)),
        Some((k, list)) if k == "trunk" => {
            let list = list
                .as_array()
                .ok_or("`vlan.trunk` must be a list of VLANs")?;
            let ids = list
                .iter()
                .map(|n| vlan_id(n, "vlan.trunk"))
                .collect::<Result<_, _>>()?;
            Ok(VlanMode::Trunk(ids))
        }
        _ => Err("`vlan` must be {\"access\":N} or {\"trunk\":[N,...]}".into()),
    }
}

/// The JSON form of a VLAN membership.
pub fn vlan_json(vlan: &VlanMode) -> Value {
    match vlan {
        VlanMode::Access(v) => json!({ "access": v }),
        VlanMode::Trunk(list) => json!({ "trunk": list }),
    }
}

fn string_field<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<&'a str, String> {
    match obj.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("`{field}` must be a string")),
        None => Err(format!("`{field}` is missing")),
    }
}

fn no_other_fields(obj: &Map<String, Value>, allowed: &[&str]) -> Result<(), String> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!("unknown field `{k}`")),
        None => Ok(()),
    }
}

fn port_field(obj: &Map<String, Value>) -> Result<String, String> {
    let port = string_field(obj, "port")?;
    if !valid_port_name(port) {
        return Err(format!(
            "`port`: `{port}` is not 1 to 64 of A-Z a-z 0-9 _ . -"
        ));
    }
    Ok(port.to_string())
}

/// Parses one request line.
pub fn parse(line: &str) -> Result<Request, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not a JSON object: {e}"))?;
    let obj = value.as_object().ok_or("a request is a JSON object")?;
    match string_field(obj, "op")? {
        "add_port" => {
            no_other_fields(obj, &["op", "port", "mac", "vlan"])?;
            let port = port_field(obj)?;
            let mac_text = string_field(obj, "mac")?;
            let mac = parse_mac(mac_text)
                .ok_or_else(|| format!("`mac`: `{mac_text}` is not a MAC address"))?;
            let vlan = match obj.get("vlan") {
                None => VlanMode::default(),
                Some(v) => parse_vlan(v)?,
            };
            Ok(Request::AddPort { port, mac, vlan })
        }
        "remove_port" => {
            no_other_fields(obj, &["op", "port"])?;
            Ok(Request::RemovePort {
                port: port_field(obj)?,
            })
        }
        "show" => {
            no_other_fields(obj, &["op"])?;
            Ok(Request::Show)
        }
        "shutdown" => {
            no_other_fields(obj, &["op"])?;
            Ok(Request::Shutdown)
        }
        other => Err(format!(
            "`op`: unknown operation `{other}` (add_port, remove_port, show, shutdown)"
        )),
    }
}

/// An error reply.
pub fn error(message: impl std::fmt::Display) -> Value {
    json!({ "ok": false, "error": message.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        let r = parse(
            r#"{"op":"add_port","port":"web-net0","mac":"52:54:00:00:00:0a","vlan":{"trunk":[10,20]}}"#,
        );
        assert_eq!(
            r,
            Ok(Request::AddPort {
                port: "web-net0".into(),
                mac: MacAddr([0x52, 0x54, 0, 0, 0, 0x0a]),
                vlan: VlanMode::Trunk(vec![10, 20]),
            })
        );
        let r = parse(r#"{"op":"add_port","port":"a","mac":"02:00:00:00:00:01"}"#);
        assert!(matches!(
            r,
            Ok(Request::AddPort {
                vlan: VlanMode::Access(1),
                ..
            })
        ));
        assert_eq!(parse(r#"{"op":"show"}"#), Ok(Request::Show));
        assert_eq!(
            parse(r#"{"op":"remove_port","port":"a"}"#),
            Ok(Request::RemovePort { port: "a".into() })
        );
    }

    #[test]
    fn bad_requests_name_the_field() {
        let cases = [
            ("nonsense", "not a JSON object"),
            ("[1]", "a request is a JSON object"),
            (r#"{"op":"fly"}"#, "`op`: unknown operation"),
            (
                r#"{"op":"add_port","port":"../x","mac":"02:00:00:00:00:01"}"#,
                "`port`",
            ),
            (
                r#"{"op":"add_port","port":"a","mac":"02:00:00:00:01"}"#,
                "`mac`",
            ),
            (
                r#"{"op":"add_port","port":"a","mac":"02:00:00:00:00:01","vlan":{"access":70000}}"#,
                "`vlan.access`",
            ),
            (
                r#"{"op":"add_port","port":"a","mac":"02:00:00:00:00:01","vlan":5}"#,
                "`vlan`",
            ),
            (r#"{"op":"show","extra":1}"#, "unknown field `extra`"),
            (r#"{"op":"remove_port"}"#, "`port` is missing"),
        ];
        for (line, want) in cases {
            let err = parse(line).unwrap_err();
            assert!(err.contains(want), "{line}: {err}");
            assert!(!err.contains('\n'));
        }
        assert_eq!(parse_mac("52:54:00:00:00:0a:00"), None);
        assert!(!valid_port_name(&"x".repeat(65)));
    }
}
