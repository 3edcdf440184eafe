//! Guest descriptions as the daemon sees them: TOML text, checked in full
//! before anything is written, and the few facts the daemon reports.

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

/// Parses `text` as a guest description; every field is checked.
pub fn check(text: &str) -> Result<Summary, DescriptionError> {
    let config = config::parse_guest(text).map_err(|e| DescriptionError(one_line(&e)))?;
    Ok(Summary {
        cpus: u32::from(config.cpus),
        memory_bytes: config.memory,
    })
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

/// Stand-in for the guest-description parser until it is shared.
mod config {
    use thiserror::Error;

    #[derive(Debug, Error)]
    pub enum Error {
        #[error("not TOML: {0}")]
        Toml(String),
        #[error("{0}")]
        Field(String),
    }

    pub struct Config {
        pub cpus: u8,
        pub memory: u64,
    }

    pub fn parse_guest(text: &str) -> Result<Config, Error> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| Error::Toml(e.message().to_string()))?;
        match table.get("kernel") {
            Some(toml::Value::String(_)) => {}
            Some(_) => return Err(Error::Field("kernel: not a path".into())),
            None => return Err(Error::Field("kernel: missing".into())),
        }
        let cpus = match table.get("cpus") {
            None => 1,
            Some(toml::Value::Integer(n)) if (1..=254).contains(n) => *n as u8,
            Some(_) => return Err(Error::Field("cpus: not a number from 1 to 254".into())),
        };
        let memory = match table.get("memory") {
            None => 512 << 20,
            Some(toml::Value::String(s)) => {
                match s.strip_suffix('M').and_then(|n| n.parse::<u64>().ok()) {
                    Some(n) => n << 20,
                    None => return Err(Error::Field(format!("memory: '{s}' is not a size"))),
                }
            }
            Some(_) => return Err(Error::Field("memory: not a size".into())),
        };
        for key in table.keys() {
            if !["kernel", "initramfs", "cmdline", "cpus", "memory"].contains(&key.as_str()) {
                return Err(Error::Field(format!("{key}: unknown field")));
            }
        }
        Ok(Config { cpus, memory })
    }
}

/// One guest of a system description, ready to send to the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemGuest {
    pub name: String,
    /// The guest's description, TOML text.
    pub config: String,
    /// Start it when the system comes up.
    pub start: bool,
}

/// Parses a system description; guest files are read relative to `base`.
/// Every guest's description is checked before any is returned.
pub fn system(text: &str, base: &std::path::Path) -> Result<Vec<SystemGuest>, DescriptionError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| DescriptionError(e.message().to_string()))?;
    let Some(toml::Value::Array(guests)) = table.get("guest") else {
        return Err(DescriptionError(
            "guest: missing; list guests as [[guest]] tables".into(),
        ));
    };
    let mut out = Vec::new();
    for (i, g) in guests.iter().enumerate() {
        let field = |k: &str| g.get(k).and_then(toml::Value::as_str).map(str::to_string);
        let name =
            field("name").ok_or_else(|| DescriptionError(format!("guest[{i}].name: missing")))?;
        let file = field("config")
            .ok_or_else(|| DescriptionError(format!("guest[{i}].config: missing")))?;
        let path = base.join(&file);
        let config = std::fs::read_to_string(&path).map_err(|e| {
            DescriptionError(format!(
                "guest[{i}].config: cannot read {}: {e}",
                path.display()
            ))
        })?;
        check(&config).map_err(|e| DescriptionError(format!("{}: {}", path.display(), e.0)))?;
        let start = field("start").as_deref() == Some("boot");
        out.push(SystemGuest {
            name,
            config,
            start,
        });
    }
    Ok(out)
}
