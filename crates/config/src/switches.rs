//! Virtual switches in the system file, to be owned by the daemon:
//!
//! ```toml
//! [switches.lan]
//! mode = "bridge"        # or "hub"
//! uplink = "tap0"        # optional: a host tap that joins the switch
//! uplink_vlan = 10       # optional: the uplink is an access port on VLAN 10
//! # uplink_vlans = [10, 20]  # or: the uplink is a trunk carrying these VLANs
//! ```
//!
//! Without `uplink_vlan` or `uplink_vlans` an uplink is an access port on
//! VLAN 1, as a guest's port is.

use toml::Value;

use crate::fields::Fields;
use crate::FileError;

/// How a switch forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchMode {
    /// Every frame goes to every other port on its VLAN.
    Hub,
    /// A learning bridge.
    Bridge,
}

impl SwitchMode {
    /// The name used in files and on the switch process's command line.
    pub fn as_str(self) -> &'static str {
        match self {
            SwitchMode::Hub => "hub",
            SwitchMode::Bridge => "bridge",
        }
    }
}

pub use vmm::config::VlanMembership;

/// One switch of a system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemSwitch {
    pub name: String,
    pub mode: SwitchMode,
    /// A host tap that joins the switch, and its VLANs.
    pub uplink: Option<(String, VlanMembership)>,
}

/// Parses `[switches]`.
pub(crate) fn switches(table: Option<Fields>) -> Result<Vec<SystemSwitch>, FileError> {
    let Some(mut table) = table else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for name in table.remaining_keys() {
        if crate::check_guest_name(&name).is_err() {
            let problem = "is not a switch name (1 to 32 characters: a-z, 0-9 and -)";
            return Err(table.error(&name, problem));
        }
        let mut s = table.named_table(&name)?;
        let mode = match s.string("mode")?.as_deref() {
            None => return Err(s.error("mode", "is required: \"hub\" or \"bridge\"")),
            Some("hub") => SwitchMode::Hub,
            Some("bridge") => SwitchMode::Bridge,
            Some(other) => {
                return Err(s.error("mode", format!("'{other}' is not \"hub\" or \"bridge\"")))
            }
        };
        let uplink = uplink(&mut s)?;
        s.finish()?;
        out.push(SystemSwitch { name, mode, uplink });
    }
    table.finish()?;
    Ok(out)
}

fn uplink(s: &mut Fields) -> Result<Option<(String, VlanMembership)>, FileError> {
    let tap = s.string("uplink")?;
    let access = s.integer("uplink_vlan")?;
    let trunk = s.take("uplink_vlans");
    let Some(tap) = tap else {
        for (key, given) in [
            ("uplink_vlan", access.is_some()),
            ("uplink_vlans", trunk.is_some()),
        ] {
            if given {
                return Err(s.error(key, "needs an uplink"));
            }
        }
        return Ok(None);
    };
    vmm::config::check_tap_name(&tap).map_err(|_| {
        s.error(
            "uplink",
            format!("'{tap}' is not an interface name (1 to 15 characters, no '/', ':' or spaces)"),
        )
    })?;
    let vlans = match (access, trunk) {
        (Some(_), Some(_)) => {
            return Err(s.error("uplink_vlans", "give uplink_vlan or uplink_vlans, not both"))
        }
        (Some(n), None) => VlanMembership::Access(vlan_id(s, "uplink_vlan", n)?),
        (None, Some(list)) => VlanMembership::Trunk(vlan_list(s, list)?),
        (None, None) => VlanMembership::Access(1),
    };
    Ok(Some((tap, vlans)))
}

/// A VLAN id, 1 to 4094.
pub(crate) fn vlan_id(s: &Fields, key: &str, n: i64) -> Result<u16, FileError> {
    u16::try_from(n)
        .ok()
        .filter(|v| (1..=4094).contains(v))
        .ok_or_else(|| s.error(key, format!("{n} is not a VLAN id (1 to 4094)")))
}

fn vlan_list(s: &Fields, list: Value) -> Result<Vec<u16>, FileError> {
    vlan_list_of(s, "uplink_vlans", list)
}

/// A non-empty list of distinct VLAN ids under `KEY`.
pub(crate) fn vlan_list_of(s: &Fields, key: &str, list: Value) -> Result<Vec<u16>, FileError> {
    let Value::Array(items) = list else {
        return Err(s.error(key, "expected an array of VLAN ids such as [10, 20]"));
    };
    let mut out: Vec<u16> = Vec::with_capacity(items.len());
    for item in items {
        let Value::Integer(n) = item else {
            return Err(s.error(key, "expected an array of VLAN ids such as [10, 20]"));
        };
        let id = vlan_id(s, key, n)?;
        if out.contains(&id) {
            return Err(s.error(key, format!("VLAN {id} is listed twice")));
        }
        out.push(id);
    }
    if out.is_empty() {
        return Err(s.error(key, "names no VLAN"));
    }
    Ok(out)
}
