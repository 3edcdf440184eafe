//! Guest descriptions as the daemon sees them: TOML text, checked in full
//! before anything is written, and the few facts the daemon reports.

use std::path::Path;

use thiserror::Error;

use crate::images::Policy;

/// A guest description that failed to parse; the message names the field.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{0}")]
pub struct DescriptionError(pub String);

/// What the daemon reports about a description without running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub cpus: u32,
    pub memory_bytes: u64,
}

/// The name descriptions are given in errors.
const ORIGIN: &str = "config";

/// Parses `text` as a guest description; every field is checked. Relative
/// paths are taken from `/`. Returns the summary and the description
/// written back in canonical form (absolute paths, every field explicit),
/// which is what the daemon stores and hands to the VMM.
pub fn check(text: &str) -> Result<(Summary, String), DescriptionError> {
    let config = parse(text)?;
    Ok(summarize(&config))
}

/// Like [`check`], for a new guest (whose runtime directory will be
/// `runtime`): also everything it names on the host must be allowed by
/// `policy` now (files readable beneath an image root, taps, the vsock
/// socket), so that a guest that cannot start is refused at once, naming
/// the field. A description without a `uuid` gets a random one, which the
/// stored text keeps, so the guest has the same SMBIOS UUID at every start.
pub fn check_new(
    text: &str,
    policy: &Policy,
    runtime: &Path,
) -> Result<(Summary, String), DescriptionError> {
    let mut config = parse(text)?;
    if config.uuid.is_none() {
        let uuid = config::Uuid::random().map_err(|e| DescriptionError(one_line(&e)))?;
        config.uuid = Some(uuid);
    }
    policy.open_files(&config).map_err(DescriptionError)?;
    policy
        .check_host(&config, runtime)
        .map_err(DescriptionError)?;
    Ok(summarize(&config))
}

/// The configuration a stored description gives.
pub fn parse_config(text: &str) -> Result<config::VmConfig, DescriptionError> {
    parse(text)
}

pub(crate) fn parse(text: &str) -> Result<config::VmConfig, DescriptionError> {
    config::parse_guest(text, ORIGIN, Path::new("/")).map_err(|e| DescriptionError(one_line(&e)))
}

fn summarize(config: &config::VmConfig) -> (Summary, String) {
    let summary = Summary {
        cpus: u32::from(config.cpus),
        memory_bytes: config.memory,
    };
    (summary, config::to_guest_toml(config))
}

/// Checks a guest name as system files do: 1 to 32 of a-z, 0-9 and -.
pub fn check_name(name: &str) -> Result<(), DescriptionError> {
    config::check_guest_name(name).map_err(|e| DescriptionError(e.to_string()))
}

/// An error and its causes on one line.
pub fn one_line(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line.replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn description(extra: &str) -> String {
        let exe = std::env::current_exe().expect("test binary");
        format!("kernel = \"{}\"\n{extra}", exe.display())
    }

    /// A policy whose one root holds the test binary (the "kernel").
    fn policy() -> Policy {
        let exe = std::env::current_exe().expect("test binary");
        let dir = exe.parent().expect("its directory").to_path_buf();
        Policy {
            roots: crate::images::Roots::open(&[crate::images::RootSpec { dir, block: false }])
                .expect("root"),
            taps: crate::images::Taps::parse("fv*").expect("taps"),
        }
    }

    fn check_new(text: &str) -> Result<(Summary, String), DescriptionError> {
        super::check_new(text, &policy(), Path::new("/run/g"))
    }

    #[test]
    fn taps_and_vsock_sockets_are_checked_against_the_policy() {
        let e = check_new(&description("[[net]]\ntap = \"eth0\"\n")).expect_err("eth0");
        assert_eq!(
            e.0,
            "net[0].tap: 'eth0' is not a tap this daemon may attach guests to (allowed: fv*)"
        );
        check_new(&description("[[net]]\ntap = \"fv-a0\"\n")).expect("own prefix");
        let e = check_new(&description("[vsock]\ncid = 3\nsocket = \"/tmp/v.sock\"\n"))
            .expect_err("outside");
        assert_eq!(
            e.0,
            "vsock.socket: /tmp/v.sock: must be a file in the guest's runtime directory /run/g"
        );
        check_new(&description(
            "[vsock]\ncid = 3\nsocket = \"/run/g/v.sock\"\n",
        ))
        .expect("inside");
    }

    fn uuid_of(text: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix("uuid = "))
            .map(str::to_string)
    }

    #[test]
    fn a_new_guest_without_a_uuid_gets_one_that_is_stored() {
        let (_, first) = check_new(&description("")).unwrap();
        let (_, second) = check_new(&description("")).unwrap();
        let uuid = uuid_of(&first).expect("a uuid in the stored text");
        assert_ne!(Some(uuid.clone()), uuid_of(&second), "one per guest");
        // Reading the stored text back keeps it.
        let (_, again) = check(&first).unwrap();
        assert_eq!(uuid_of(&again), Some(uuid));
    }

    #[test]
    fn a_new_guest_with_a_missing_region_file_is_refused_naming_it() {
        let exe = std::env::current_exe().expect("test binary");
        let ring = exe.with_file_name("no-such-ring0");
        let region = format!("[[region]]\npath = \"{}\"\n", ring.display());
        let err = check_new(&description(&region)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "region[0].path: {}: No such file or directory",
                ring.display()
            )
        );
        // Outside the image roots, it is refused as any guest file is.
        let region = "[[region]]\npath = \"/dev/shm/ring0\"\n";
        let err = check_new(&description(region)).unwrap_err();
        assert!(
            err.0
                .contains("region[0].path: /dev/shm/ring0: not under an image root"),
            "{err}"
        );
    }

    #[test]
    fn a_given_uuid_is_kept() {
        let given = "uuid = \"6f1c2e3d-4b5a-4978-8a1b-0c2d3e4f5a6b\"\n";
        let (_, stored) = check_new(&description(given)).unwrap();
        assert_eq!(
            uuid_of(&stored).as_deref(),
            Some("\"6f1c2e3d-4b5a-4978-8a1b-0c2d3e4f5a6b\"")
        );
    }
}
