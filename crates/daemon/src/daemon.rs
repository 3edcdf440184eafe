//! The daemon's registry of guests: creating (atomically, through a temporary
//! directory), finding, deleting, and re-adopting guests from the state
//! directory when the daemon starts.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
#[cfg(test)]
use std::time::Duration;

use thiserror::Error;

use crate::description::{self, one_line, DescriptionError};
use crate::events::{now_ms, EventBus};
use crate::files;
use crate::guest::{self, Guest, GuestError, Record, State};
use crate::images::Policy;
use crate::jail::{JailError, JailPolicy};

/// Errors of registry operations.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// The message is the config crate's own (`config::check_guest_name`).
    #[error("{0}")]
    BadName(String),
    #[error("bad guest description")]
    Description(#[from] DescriptionError),
    #[error("guest '{0}' already exists")]
    Exists(String),
    #[error("no guest named '{0}'")]
    Unknown(String),
    #[error("cannot write the guest's directory")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("jail")]
    Jail(#[from] JailError),
}

/// Checks a guest name: it becomes a directory name and a URL path segment.
pub fn check_name(name: &str) -> Result<(), RegistryError> {
    description::check_name(name).map_err(|e| RegistryError::BadName(e.0))
}

/// Takes `STATE_DIR/daemon.lock`, so that two daemons never manage the
/// same guests.
fn lock_state_dir(state_dir: &Path) -> std::io::Result<fs::File> {
    use std::os::fd::AsRawFd;
    let file = files::append_private(&state_dir.join("daemon.lock"))?;
    // SAFETY: flock has no memory effects; the descriptor is open.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            "another daemon is using it",
        ));
    }
    Ok(file)
}

/// The daemon's shared state.
#[derive(Debug)]
pub struct Daemon {
    /// Where guest directories live (`STATE_DIR/guests`).
    guests_dir: PathBuf,
    /// Where each switch keeps its sockets (`STATE_DIR/switches`).
    switches_dir: PathBuf,
    /// Held (flock) while the daemon runs: one daemon per state directory.
    _lock: fs::File,
    /// The binary that runs guests.
    exe: PathBuf,
    guests: Mutex<BTreeMap<String, Arc<Guest>>>,
    pub events: Arc<EventBus>,
    /// Guests that could not be read back at start, with why.
    pub broken: Vec<(String, String)>,
    /// What guests may use on the host.
    policy: Policy,
    /// How guests are jailed; `None` with `--no-jail`.
    jail: Option<Arc<JailPolicy>>,
}

impl Daemon {
    /// Opens (creating if needed) `state_dir`, reads back every guest in it
    /// and re-adopts those whose process still runs.
    pub fn open(state_dir: &Path, exe: PathBuf, policy: Policy) -> std::io::Result<Daemon> {
        Self::open_with(state_dir, exe, policy, None)
    }

    /// [`Daemon::open`], starting guests in `jail` (unconfined with `None`).
    /// A guest without a uid yet is given one.
    pub fn open_with(
        state_dir: &Path,
        exe: PathBuf,
        policy: Policy,
        jail: Option<JailPolicy>,
    ) -> std::io::Result<Daemon> {
        let jail = jail.map(Arc::new);
        let guests_dir = state_dir.join("guests");
        files::private_dir(state_dir)?;
        files::private_dir(&guests_dir)?;
        let lock = lock_state_dir(state_dir)?;
        let mut daemon = Daemon {
            guests_dir,
            switches_dir: state_dir.join("switches"),
            _lock: lock,
            exe,
            guests: Mutex::new(BTreeMap::new()),
            events: Arc::new(EventBus::default()),
            broken: Vec::new(),
            policy,
            jail: jail.clone(),
        };
        let mut found = BTreeMap::new();
        for entry in fs::read_dir(&daemon.guests_dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                // A create or delete that did not finish.
                let _ = fs::remove_dir_all(entry.path());
                continue;
            }
            match Guest::load(&name, entry.path()) {
                Ok(guest) => {
                    found.insert(name, Arc::new(guest.with_jail(jail.clone())));
                }
                Err(why) => daemon.broken.push((name, why)),
            }
        }
        if let Some(policy) = &jail {
            let mut taken = uids(&found);
            for guest in found.values().filter(|g| g.record().uid.is_none()) {
                match policy.allocate_uid(&taken) {
                    Ok(uid) => {
                        taken.insert(uid);
                        let _ = guest.set_uid(uid);
                    }
                    Err(e) => daemon.broken.push((guest.name.clone(), e.to_string())),
                }
            }
        }
        crate::switch::readopt_all(&daemon.switches_dir);
        for guest in found.values() {
            // A guest on a switch loses its port when its VMM ends.
            let after = match description::parse_config(&guest.description) {
                Ok(config) => crate::switch::closer(&daemon, &guest.name, &config),
                Err(_) => Box::new(|| {}),
            };
            guest.adopt(&daemon.events, after);
        }
        daemon.guests = Mutex::new(found);
        Ok(daemon)
    }

    fn map(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Guest>>> {
        self.guests.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The guest named `name`.
    pub fn get(&self, name: &str) -> Result<Arc<Guest>, RegistryError> {
        self.map()
            .get(name)
            .cloned()
            .ok_or_else(|| RegistryError::Unknown(name.to_string()))
    }

    /// Every guest, by name.
    pub fn all(&self) -> Vec<Arc<Guest>> {
        self.map().values().cloned().collect()
    }

    /// The binary that runs guests.
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    /// Creates guest `name` from `text`: checked in full, written to a
    /// temporary directory, renamed into place.
    pub fn create(&self, name: &str, text: &str) -> Result<Arc<Guest>, RegistryError> {
        check_name(name)?;
        let runtime = self.guests_dir.join(name).join(guest::RUNTIME);
        let (summary, text) = description::check_new(text, &self.policy, &runtime)?;
        let text = text.as_str();
        let mut map = self.map();
        if map.contains_key(name) {
            return Err(RegistryError::Exists(name.to_string()));
        }
        let uid = match &self.jail {
            Some(policy) => Some(policy.allocate_uid(&uids(&map))?),
            None => None,
        };
        let tmp = self
            .guests_dir
            .join(format!(".new-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let made = (|| -> Result<Record, RegistryError> {
            files::new_private_dir(&tmp)?;
            files::new_private_dir(&tmp.join(guest::RUNTIME))?;
            files::write_durable(&tmp.join(guest::DESCRIPTION), text.as_bytes())?;
            let record = Record {
                state: State::Created,
                pid: None,
                start_ticks: None,
                started_ms: None,
                exit: None,
                runs: 0,
                created_ms: now_ms(),
                uid,
            };
            guest::write_json(&tmp.join(guest::RECORD), &record)?;
            let dir = self.guests_dir.join(name);
            fs::rename(&tmp, dir)?;
            files::sync_dir(&self.guests_dir)?;
            Ok(record)
        })();
        let record = match made {
            Ok(record) => record,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let guest = Arc::new(
            Guest::new(
                name,
                self.guests_dir.join(name),
                text.to_string(),
                summary,
                record,
            )
            .with_jail(self.jail.clone()),
        );
        map.insert(name.to_string(), guest.clone());
        drop(map);
        self.events.emit(name, "created", "created", None);
        Ok(guest)
    }

    /// The directory of switch `name`'s sockets.
    pub fn switch_dir(&self, name: &str) -> PathBuf {
        self.switches_dir.join(name)
    }

    /// What guests may use on the host.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Starts `guest` (whose operation lock the caller holds): opens each
    /// of its files beneath the image roots, once; locks its disk images
    /// (a write lock for a read-write disk, a read lock for a read-only
    /// one); hands the open descriptors to the VMM.
    pub fn start_guest(&self, guest: &Arc<Guest>) -> Result<(), GuestError> {
        guest.check_startable()?;
        let config =
            description::parse_config(&guest.description).map_err(|e| GuestError::Files(e.0))?;
        self.policy
            .check_host(&config, &guest.runtime())
            .map_err(GuestError::Files)?;
        let mut files = self.policy.open_files(&config).map_err(GuestError::Files)?;
        for f in &files {
            let Some(readonly) = f.disk_readonly else {
                continue;
            };
            if let Err(e) = vmm::guest_file::lock(&f.file, !readonly, &f.path) {
                let how = if readonly { "read-only" } else { "read-write" };
                let by = match self.holder_of(&f.file, &guest.name) {
                    Some(other) => format!("guest '{other}' holds it"),
                    None => one_line(&e),
                };
                return Err(GuestError::InUse(format!(
                    "{}: {}: guest '{}' cannot use it {how}: {by}",
                    f.field,
                    f.path.display(),
                    guest.name
                )));
            }
        }
        let ports = crate::switch::open_ports(self, &guest.name, &config)
            .map_err(|e| GuestError::Files(e.to_string()))?;
        for port in ports {
            files.push(crate::images::GuestFile::switch_port(port));
        }
        let closer = crate::switch::closer(self, &guest.name, &config);
        guest.start(&self.exe, &self.events, config, files, closer)
    }

    /// The live guest other than `me` that has the image open as `file`
    /// among its disks (OFD locks name no holder, so the daemon looks in
    /// its own records).
    fn holder_of(&self, file: &fs::File, me: &str) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata().ok()?;
        let same = |path: &Path| {
            fs::metadata(path).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
        };
        self.all()
            .into_iter()
            .filter(|g| g.name != me && g.record().state.is_live())
            .find(|g| {
                description::parse_config(&g.description)
                    .is_ok_and(|c| c.disks.iter().any(|d| same(&d.path)))
            })
            .map(|g| g.name.clone())
    }

    /// Deletes a guest that is not running: its directory goes too.
    ///
    /// The guest is looked up, then its operation lock is waited for; by
    /// then another delete may have removed it, and a new guest may have
    /// been created under the same name. So the guest found first must
    /// still be the registered one, and not yet deleted.
    pub fn delete(&self, name: &str) -> Result<(), RegistryError> {
        let guest = self.get(name)?;
        let _op = guest.begin();
        self.delete_locked(name, &guest)
    }

    /// Deletes `guest` (registered as `name`) whose operation lock the
    /// caller holds.
    pub fn delete_locked(&self, name: &str, guest: &Arc<Guest>) -> Result<(), RegistryError> {
        let mut map = self.map();
        let registered = map.get(name).is_some_and(|g| Arc::ptr_eq(g, guest));
        if guest.is_deleted() || !registered {
            return Err(RegistryError::Unknown(name.to_string()));
        }
        guest.mark_deleted()?;
        map.remove(name);
        drop(map);
        let doomed = self
            .guests_dir
            .join(format!(".del-{name}-{}", std::process::id()));
        fs::rename(&guest.dir, &doomed)?;
        let _ = fs::remove_dir_all(&doomed);
        if let Some(policy) = &self.jail {
            policy.release(name);
        }
        self.events.emit(name, "deleted", "deleted", None);
        Ok(())
    }
}

/// The uids the guests in `guests` hold.
fn uids(guests: &BTreeMap<String, Arc<Guest>>) -> std::collections::BTreeSet<u32> {
    guests.values().filter_map(|g| g.record().uid).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon in a fresh directory and a description whose kernel exists.
    fn scratch(tag: &str) -> (PathBuf, Daemon, String) {
        let dir = std::env::temp_dir().join(format!("fv-daemon-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch dir");
        let kernel = dir.join("vmlinuz");
        fs::write(&kernel, b"not run").expect("kernel");
        let policy = Policy {
            roots: crate::images::Roots::open(&[crate::images::RootSpec {
                dir: dir.clone(),
                block: false,
            }])
            .expect("root"),
            taps: crate::images::Taps::parse("fv*").expect("taps"),
        };
        let daemon =
            Daemon::open(&dir.join("state"), PathBuf::from("/bin/false"), policy).expect("open");
        let text = format!("kernel = \"{}\"\n", kernel.display());
        (dir, daemon, text)
    }

    #[test]
    fn a_delete_that_waited_spares_a_new_guest_of_the_same_name() {
        let (dir, daemon, text) = scratch("spare");
        let old = daemon.create("web", &text).expect("create");
        std::thread::scope(|s| {
            // An operation holds the old guest; a delete queues behind it.
            let op = old.begin();
            let late = s.spawn(|| daemon.delete("web"));
            while !late.is_finished() && daemon.get("web").is_ok() {
                // Meanwhile the old guest goes (as another delete would do
                // it) and a new one takes its name.
                std::thread::sleep(Duration::from_millis(20));
                old.mark_deleted().expect("mark");
                daemon.map().remove("web");
                fs::remove_dir_all(&old.dir).expect("remove");
            }
            let new = daemon.create("web", &text).expect("create again");
            drop(op);
            let outcome = late.join().expect("delete thread");
            assert!(
                matches!(outcome, Err(RegistryError::Unknown(ref n)) if n == "web"),
                "{outcome:?}"
            );
            let still = daemon.get("web").expect("the new guest is still there");
            assert!(Arc::ptr_eq(&still, &new));
            assert!(new.dir.join(guest::DESCRIPTION).exists());
        });
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_bad_name_is_one_message_the_config_rule() {
        let e = check_name("../x").expect_err("bad name");
        assert_eq!(
            e.to_string(),
            "'../x' is not a guest name (1 to 32 characters: a-z, 0-9 and -)"
        );
    }

    #[test]
    fn create_refuses_boot_files_that_are_not_there() {
        let (dir, daemon, _) = scratch("files");
        fs::create_dir_all(dir.join("sub")).expect("sub");
        let root = dir.display().to_string();
        let cases = [
            (
                format!("kernel = \"{root}/nonexistent\"\n"),
                format!(
                    "bad guest description: kernel: {root}/nonexistent: No such file or directory"
                ),
            ),
            (
                format!("kernel = \"{root}/sub\"\n"),
                format!("bad guest description: kernel: {root}/sub: not a regular file"),
            ),
            (
                "kernel = \"/etc/passwd\"\n".to_string(),
                format!(
                    "bad guest description: kernel: /etc/passwd: not under an image root ({root})"
                ),
            ),
        ];
        for (text, want) in cases {
            let e = daemon.create("x", &text).expect_err("refused");
            assert_eq!(crate::description::one_line(&e), want);
        }
        let kernel = dir.join("vmlinuz");
        let text = format!(
            "kernel = \"{}\"\ninitramfs = \"{root}/initrd\"\n",
            kernel.display()
        );
        let e = daemon.create("x", &text).expect_err("refused");
        assert!(
            one(&e).contains(&format!(": initramfs: {root}/initrd")),
            "{e}"
        );
        let text = format!(
            "kernel = \"{}\"\n[[disk]]\npath = \"/etc/shadow\"\n",
            kernel.display()
        );
        let e = daemon.create("x", &text).expect_err("refused");
        assert!(
            one(&e).contains(": disk[0].path: /etc/shadow: not under an image root"),
            "{e}"
        );
        assert!(daemon.get("x").is_err());
        assert_eq!(fs::read_dir(&daemon.guests_dir).expect("dir").count(), 0);
        let _ = fs::remove_dir_all(dir);
    }

    fn one(e: &RegistryError) -> String {
        crate::description::one_line(e)
    }

    #[test]
    fn names_are_checked() {
        for good in ["a", "web-1", "db2"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "a b", "ü", "A", &"x".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
