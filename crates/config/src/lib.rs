//! Ferrovisor's description files, in TOML.
//!
//! A **guest file** describes one VM: everything `ferrovisor run` takes as
//! flags, plus the host CPUs each vCPU may run on ([`parse_guest`],
//! [`load_guest`]). A **system file** names several guests, inline or by
//! guest file, and says which start with the system ([`parse_system`],
//! [`load_system`]). [`to_guest_toml`] and [`to_system_toml`] write them
//! back. `docs/config.md` describes both formats.
//!
//! The text is parsed into a TOML table and then walked key by key, so every
//! error names the file, the exact field path and the problem, on one line:
//! `system.toml: guests.web.memory: '12X' is not a size ...`. Unknown fields
//! are errors.

mod fields;
pub mod fuzz_entry;
mod guest;
mod pools;
mod regions;
mod sched;
mod switches;
mod system;
mod vsock_allow;
mod write;

use std::path::{Path, PathBuf};

use thiserror::Error;

pub use guest::{load_guest, parse_guest, AFFINITY_ANY};
pub use pools::{Pool, PoolPolicy};
pub use regions::SystemRegion;
pub use switches::{SwitchMode, SystemSwitch, VlanMembership};
pub use system::{
    check_guest_name, load_system, parse_system, NameError, StartPolicy, System, SystemGuest,
    MAX_NAME_LEN,
};
pub use vmm::config::{Uuid, VmConfig};
pub use vmm::rate;
pub use vsock_allow::VsockAllow;
pub use write::{to_guest_toml, to_system_toml};

/// Errors in a description file. Each displays as one line that starts with
/// the file's name.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FileError {
    /// The file could not be read.
    #[error("{origin}: cannot read: {reason}")]
    Read { origin: String, reason: String },
    /// The text is not valid TOML.
    #[error("{origin}: line {line}, column {column}: {message}")]
    Syntax {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// A field is missing, unknown, of the wrong type, or has a bad value.
    #[error("{origin}: {field}: {problem}")]
    Field {
        origin: String,
        /// The dotted path of the field, e.g. `guests.web.disk[0].path`.
        field: String,
        problem: String,
    },
}

/// The 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Parses TOML text into a table, turning a syntax error into one line.
fn parse_table(text: &str, origin: &str) -> Result<toml::Table, FileError> {
    text.parse::<toml::Table>().map_err(|e| {
        let (line, column) = e.span().map_or((1, 1), |s| line_column(text, s.start));
        FileError::Syntax {
            origin: origin.to_string(),
            line,
            column,
            message: e.message().trim().replace('\n', " "),
        }
    })
}

/// Reads a description file: its text, its name for errors, and the
/// directory its relative paths start from (absolute).
fn read_file(path: &Path) -> Result<(String, String, PathBuf), FileError> {
    let origin = path.display().to_string().replace('\n', "\\n");
    let read_err = |e: std::io::Error| FileError::Read {
        origin: origin.clone(),
        reason: e.to_string(),
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() {
        return Err(FileError::Read {
            origin,
            reason: "not a regular file".into(),
        });
    }
    let bytes = std::fs::read(path).map_err(read_err)?;
    let text = String::from_utf8(bytes).map_err(|_| FileError::Read {
        origin: origin.clone(),
        reason: "not UTF-8 text".into(),
    })?;
    let dir = path.parent().unwrap_or(Path::new(""));
    let base_dir = std::path::absolute(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    })
    .map_err(read_err)?;
    Ok((text, origin, base_dir))
}

#[cfg(test)]
mod tests;
