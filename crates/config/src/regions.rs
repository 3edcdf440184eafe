//! Shared regions in the system file, owned by the daemon:
//!
//! ```toml
//! [regions.ring0]
//! size = "2M"                                  # a power of two, 4K to 256M
//! vectors = 2                                  # doorbell vectors per guest (1 to 128; default 1)
//! guests = { producer = "rw", consumer = "ro" } # members; peer ids follow this order
//! ```

use toml::Value;

use crate::fields::Fields;
use crate::FileError;

/// The most doorbell vectors a guest has on one region.
pub const MAX_VECTORS: u16 = 128;
/// The smallest and largest region.
const MIN_SIZE: u64 = 4 << 10;
const MAX_SIZE: u64 = vmm::region::MAX_SIZE;

/// One region of a system: its members in file order (peer id = index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemRegion {
    pub name: String,
    pub size: u64,
    pub vectors: u16,
    /// Each member guest and whether it may only read.
    pub members: Vec<(String, bool)>,
}

/// Parses `[regions]`; `guests` are the system's guest names.
pub(crate) fn regions(
    table: Option<Fields>,
    guests: &[String],
) -> Result<Vec<SystemRegion>, FileError> {
    let Some(mut table) = table else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for name in table.remaining_keys() {
        if crate::check_guest_name(&name).is_err() {
            let problem = "is not a region name (1 to 32 characters: a-z, 0-9 and -)";
            return Err(table.error(&name, problem));
        }
        let mut r = table.named_table(&name)?;
        let size = match r.string("size")? {
            None => return Err(r.error("size", "is required")),
            Some(text) => vmm::config::parse_size(&text)
                .filter(|s| s.is_power_of_two() && (MIN_SIZE..=MAX_SIZE).contains(s))
                .ok_or_else(|| {
                    r.error(
                        "size",
                        format!(
                            "'{text}' is not a power of two from 4K to {}M",
                            MAX_SIZE >> 20
                        ),
                    )
                })?,
        };
        let vectors = match r.integer("vectors")? {
            None => 1,
            Some(n) => u16::try_from(n)
                .ok()
                .filter(|v| (1..=MAX_VECTORS).contains(v))
                .ok_or_else(|| r.error("vectors", format!("{n} is not 1 to {MAX_VECTORS}")))?,
        };
        let members = members(&mut r, guests)?;
        r.finish()?;
        out.push(SystemRegion {
            name,
            size,
            vectors,
            members,
        });
    }
    table.finish()?;
    Ok(out)
}

fn members(r: &mut Fields, guests: &[String]) -> Result<Vec<(String, bool)>, FileError> {
    let Some(mut list) = r.table("guests")? else {
        return Err(r.error("guests", "is required: name the guests that map the region"));
    };
    let mut out = Vec::new();
    for guest in list.remaining_keys() {
        let readonly = match list.take_any(&guest) {
            Some(Value::String(s)) if s == "rw" => false,
            Some(Value::String(s)) if s == "ro" => true,
            _ => return Err(list.error(&guest, "is not \"rw\" or \"ro\"")),
        };
        if !guests.contains(&guest) {
            return Err(list.error(&guest, "is not a guest of this system"));
        }
        out.push((guest, readonly));
    }
    if out.is_empty() {
        return Err(r.error("guests", "names no guest"));
    }
    Ok(out)
}
