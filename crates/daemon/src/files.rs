//! Private, durable files of the state directory: directories are 0700,
//! files 0600, and a state file is replaced atomically and durably
//! (temporary file, `fsync`, rename, `fsync` of the directory), so a crash
//! leaves either the old or the new file, never a torn one, and no other
//! local user reads a guest's description, console or record.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The mode of every directory the daemon keeps.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every file the daemon writes.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and missing parents) as 0700; an existing one is made
/// 0700 too, so a state directory from an older daemon is closed as well.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
}

/// Creates the new directory `dir` as 0700 (an error if it exists).
pub fn new_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(DIR_MODE).create(dir)
}

/// Opens `path` for appending, creating it as 0600.
pub fn append_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Creates (or truncates) `path` as 0600 for writing.
pub fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Creates (or truncates) `path` as 0600, open for reading and appending:
/// a log its writer can cut to its tail in place (`vmm::stderr_log`).
pub fn create_private_log(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_APPEND)
        .mode(FILE_MODE)
        .open(path)
}

/// `fsync`s the directory `dir`, so that a rename in it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `bytes`: a 0600 temporary file beside it, synced,
/// renamed over `path`, and the directory synced.
pub fn write_durable(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let Some(file_name) = path.file_name() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no file name"));
    };
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut file = create_private(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fv-files-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_durable_write_replaces_the_file_and_is_private() {
        let dir = scratch("durable");
        private_dir(&dir).expect("dir");
        let path = dir.join("state.json");
        write_durable(&path, b"one").expect("first");
        write_durable(&path, b"two").expect("second");
        assert_eq!(fs::read(&path).expect("read"), b"two");
        assert_eq!(fs::metadata(&path).expect("meta").mode() & 0o777, FILE_MODE);
        assert!(!dir.join("state.json.tmp").exists(), "no temporary left");
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn an_existing_open_directory_is_closed() {
        let dir = scratch("close");
        fs::create_dir_all(&dir).expect("dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        private_dir(&dir).expect("private");
        assert_eq!(fs::metadata(&dir).expect("meta").mode() & 0o777, DIR_MODE);
        let _ = fs::remove_dir_all(dir);
    }
}
