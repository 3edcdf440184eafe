//! Guest-to-guest vsock policy in the system file: which guest may connect
//! to which port of which other guest. Everything not allowed is refused.
//!
//! ```toml
//! [[vsock_allow]]
//! from = "web"     # the connecting guest
//! to = "db"        # the guest it connects to (by its CID)
//! port = 5000      # the port it connects to, 1 to 4294967294
//! ```

use crate::fields::Fields;
use crate::system::SystemGuest;
use crate::FileError;

/// One rule: guest `from` may connect to port `port` of guest `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockAllow {
    pub from: String,
    pub to: String,
    pub port: u32,
}

/// Parses the `[[vsock_allow]]` tables; both guests must be the system's
/// and have vsock.
pub(crate) fn vsock_allow(
    tables: Vec<Fields>,
    guests: &[SystemGuest],
) -> Result<Vec<VsockAllow>, FileError> {
    let mut out = Vec::new();
    for mut t in tables {
        let guest = |t: &mut Fields, key: &'static str| {
            let name = t.required_string(key)?;
            match guests.iter().find(|g| g.name == name) {
                None => Err(t.error(key, format!("'{name}' is not a guest of this system"))),
                Some(g) if g.config.vsock.is_none() => {
                    Err(t.error(key, format!("guest '{name}' has no [vsock]")))
                }
                Some(_) => Ok(name),
            }
        };
        let from = guest(&mut t, "from")?;
        let to = guest(&mut t, "to")?;
        if from == to {
            return Err(t.error("to", "is the same guest as 'from'"));
        }
        let port = match t.integer("port")? {
            None => return Err(t.error("port", "is required")),
            Some(p) => u32::try_from(p)
                .ok()
                .filter(|p| (1..u32::MAX).contains(p))
                .ok_or_else(|| {
                    t.error("port", format!("{p} is not a port from 1 to 4294967294"))
                })?,
        };
        t.finish()?;
        out.push(VsockAllow { from, to, port });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::VsockAllow;
    use crate::{parse_system, to_system_toml};

    const GUESTS: &str = "[guests.a]\nkernel = \"k\"\nvsock = { cid = 3, socket = \"a.sock\" }\n\
        [guests.b]\nkernel = \"k\"\nvsock = { cid = 4, socket = \"b.sock\" }\n\
        [guests.c]\nkernel = \"k\"\n";

    fn err(rules: &str) -> String {
        parse_system(
            &format!("{GUESTS}{rules}"),
            "system.toml",
            Path::new("/srv"),
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn rules_are_read_and_written_back() {
        let text = format!("{GUESTS}[[vsock_allow]]\nfrom = \"a\"\nto = \"b\"\nport = 5000\n");
        let system = parse_system(&text, "system.toml", Path::new("/srv")).unwrap();
        let rule = VsockAllow {
            from: "a".into(),
            to: "b".into(),
            port: 5000,
        };
        assert_eq!(system.vsock_allow, vec![rule]);
        let again = parse_system(&to_system_toml(&system), "again.toml", Path::new("/srv"));
        assert_eq!(again.unwrap().vsock_allow, system.vsock_allow);
    }

    #[test]
    fn bad_rules_are_one_line_naming_the_field() {
        let cases = [
            (
                "from = \"x\"\nto = \"b\"\nport = 1",
                "vsock_allow[0].from: 'x' is not a guest of this system",
            ),
            (
                "from = \"a\"\nto = \"c\"\nport = 1",
                "vsock_allow[0].to: guest 'c' has no [vsock]",
            ),
            (
                "from = \"a\"\nto = \"a\"\nport = 1",
                "vsock_allow[0].to: is the same guest as 'from'",
            ),
            (
                "from = \"a\"\nto = \"b\"\nport = 0",
                "vsock_allow[0].port: 0 is not a port from 1 to 4294967294",
            ),
            (
                "from = \"a\"\nto = \"b\"\nport = 4294967295",
                "vsock_allow[0].port: 4294967295 is not a port from 1 to 4294967294",
            ),
            (
                "from = \"a\"\nto = \"b\"",
                "vsock_allow[0].port: is required",
            ),
            (
                "from = \"a\"\nto = \"b\"\nport = 1\nproto = \"x\"",
                "vsock_allow[0].proto: unknown field",
            ),
        ];
        for (rule, want) in cases {
            let e = err(&format!("[[vsock_allow]]\n{rule}\n"));
            assert!(e.contains(want), "{rule}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
