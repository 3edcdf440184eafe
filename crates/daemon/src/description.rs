//! Guest descriptions as the daemon sees them: TOML text, checked in full
//! before anything is written, and the few facts the daemon reports.

use std::path::Path;

use thiserror::Error;

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

/// Like [`check`], for a new guest: also the files it boots from (kernel,
/// initramfs, disk images, shared regions) must be readable regular files
/// now, so that a
/// guest that cannot start is refused at once, naming the field. A
/// description without a `uuid` gets a random one, which the stored text
/// keeps, so the guest has the same SMBIOS UUID at every start.
pub fn check_new(text: &str) -> Result<(Summary, String), DescriptionError> {
    let mut config = parse(text)?;
    if config.uuid.is_none() {
        let uuid = config::Uuid::random().map_err(|e| DescriptionError(one_line(&e)))?;
        config.uuid = Some(uuid);
    }
    check_file("kernel", &config.kernel)?;
    if let Some(initramfs) = &config.initramfs {
        check_file("initramfs", initramfs)?;
    }
    for (i, disk) in config.disks.iter().enumerate() {
        check_file(&format!("disk[{i}].path"), &disk.path)?;
    }
    for (i, region) in config.regions.iter().enumerate() {
        check_file(&format!("region[{i}].path"), &region.path)?;
    }
    Ok(summarize(&config))
}

/// Checks that `path` (the value of `field`) is a readable regular file.
fn check_file(field: &str, path: &Path) -> Result<(), DescriptionError> {
    let fail = |why: String| DescriptionError(format!("{field}: {}: {why}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| fail(io_text(&e)))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    std::fs::File::open(path).map_err(|e| fail(io_text(&e)))?;
    Ok(())
}

/// An I/O error's text without the "(os error N)" suffix.
fn io_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
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
        let region = "[[region]]\npath = \"/nonexistent/ring0\"\n";
        let err = check_new(&description(region)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "region[0].path: /nonexistent/ring0: No such file or directory"
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
