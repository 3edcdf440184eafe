//! Entry points for the `guest_toml` and `system_toml` fuzz targets in
//! `fuzz/`, also called by the unit tests that replay
//! `fuzz/regressions/`.

use std::path::Path;

use crate::{parse_guest, parse_system, to_guest_toml, to_system_toml, FileError};

/// Where relative paths in fuzzed files point: nowhere, so a system file
/// naming guest files by relative path reads nothing.
const BASE_DIR: &str = "/nonexistent/ferrovisor-fuzz";

/// The text of a description file, as the loaders take it: UTF-8 or
/// nothing.
fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// Every error is one line naming a file: the one parsed, or (`named`
/// false) a guest file it refers to.
fn check_error(e: &FileError, named: bool) {
    let line = e.to_string();
    assert!(
        !named || line.starts_with("fuzz.toml"),
        "error without the file name: {line}"
    );
    assert!(!line.contains('\n'), "error on several lines: {line:?}");
}

/// Parses `data` with `parse`; text it accepts must survive a round trip
/// through `write`: the text written back parses to the same value.
/// `named`: errors must name the parsed file (a system file's errors may
/// name a guest file it refers to instead).
fn round_trip<T: PartialEq + std::fmt::Debug>(
    data: &[u8],
    parse: fn(&str, &str, &Path) -> Result<T, FileError>,
    write: fn(&T) -> String,
    named: bool,
) {
    let Some(text) = text(data) else { return };
    let base = Path::new(BASE_DIR);
    match parse(text, "fuzz.toml", base) {
        Ok(value) => {
            let written = write(&value);
            let again = parse(&written, "fuzz.toml", base)
                .unwrap_or_else(|e| panic!("written file does not parse: {e}\n{written}"));
            assert_eq!(again, value, "round trip\n{written}");
        }
        Err(e) => check_error(&e, named),
    }
}

/// Parses a guest file; one it accepts must survive a round trip.
pub fn guest_toml(data: &[u8]) {
    round_trip(data, parse_guest, to_guest_toml, true);
}

/// Parses a system file (guest files it names by path are read, and
/// fail); one it accepts must survive a round trip.
pub fn system_toml(data: &[u8]) {
    round_trip(data, parse_system, to_system_toml, false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::fuzz_entry::seeds;

    #[test]
    fn guest_toml_seeds_and_regressions_replay() {
        for (_, data) in seeds("guest_toml") {
            guest_toml(&data);
        }
    }

    #[test]
    fn system_toml_seeds_and_regressions_replay() {
        for (_, data) in seeds("system_toml") {
            system_toml(&data);
        }
    }
}
