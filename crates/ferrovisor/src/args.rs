//! Command-line parsing for `ferrovisor`.
//!
//! Hand-written rather than generated, so that every mistake gets exactly one
//! line naming the flag and what is wrong with it.

use std::path::PathBuf;

use thiserror::Error;

/// The command line used when `--cmdline` is not given: serial console, and a
/// reboot through the keyboard controller after a panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Guest memory when `--memory` is not given.
pub const DEFAULT_MEMORY: u64 = 512 << 20;

/// Errors in the command line.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("no command given; try 'ferrovisor run --kernel PATH' or 'ferrovisor --help'")]
    NoCommand,
    #[error("unknown command '{0}'; try 'ferrovisor --help'")]
    UnknownCommand(String),
    #[error("unknown flag '{0}'; try 'ferrovisor run --help'")]
    UnknownFlag(String),
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("{0} given twice")]
    Repeated(&'static str),
    #[error("--kernel is required")]
    NoKernel,
    #[error("--cpus: '{0}' is not a number of vCPUs from 1 to 254")]
    BadCpus(String),
    #[error("--memory: '{0}' is not a size (examples: 512M, 2G, 1048576K)")]
    BadSize(String),
    #[error("unexpected argument '{0}'")]
    Unexpected(String),
}

/// Options of `ferrovisor run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunArgs {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub memory: u64,
    /// Print a line of run statistics on stderr at exit.
    pub stats: bool,
}

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run(RunArgs),
    Help,
    RunHelp,
    Version,
}

/// Parses a size such as `512M`, `2G`, `64m`, `1048576K` or a plain byte count.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, shift) = match text.chars().last()? {
        'k' | 'K' => (&text[..text.len() - 1], 10),
        'm' | 'M' => (&text[..text.len() - 1], 20),
        'g' | 'G' => (&text[..text.len() - 1], 30),
        't' | 'T' => (&text[..text.len() - 1], 40),
        _ => (text, 0),
    };
    // Accept an optional trailing "iB"-less form only; digits must be plain.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    value.checked_mul(1u64 << shift)
}

fn parse_cpus(text: &str) -> Result<u8, ArgsError> {
    match text.parse::<u8>() {
        Ok(n) if (1..=254).contains(&n) => Ok(n),
        _ => Err(ArgsError::BadCpus(text.into())),
    }
}

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, ArgsError> {
    let mut args = args.into_iter();
    match args.next().as_deref() {
        None => Err(ArgsError::NoCommand),
        Some("run") => parse_run(args),
        Some("-h" | "--help" | "help") => Ok(Command::Help),
        Some("-V" | "--version" | "version") => Ok(Command::Version),
        Some(other) if other.starts_with('-') => Err(ArgsError::UnknownFlag(other.into())),
        Some(other) => Err(ArgsError::UnknownCommand(other.into())),
    }
}

fn set_once<T>(slot: &mut Option<T>, value: T, flag: &'static str) -> Result<(), ArgsError> {
    if slot.replace(value).is_some() {
        return Err(ArgsError::Repeated(flag));
    }
    Ok(())
}

fn parse_run<I: Iterator<Item = String>>(mut args: I) -> Result<Command, ArgsError> {
    let (mut kernel, mut initramfs, mut cmdline, mut cpus, mut memory) =
        (None, None, None, None, None);
    let mut stats = false;
    while let Some(arg) = args.next() {
        // Accept both "--flag value" and "--flag=value".
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &'static str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or(ArgsError::MissingValue(name))
        };
        match flag.as_str() {
            "--kernel" => set_once(&mut kernel, PathBuf::from(value("--kernel")?), "--kernel")?,
            "--initramfs" | "--initrd" => set_once(
                &mut initramfs,
                PathBuf::from(value("--initramfs")?),
                "--initramfs",
            )?,
            "--cmdline" => set_once(&mut cmdline, value("--cmdline")?, "--cmdline")?,
            "--cpus" => set_once(&mut cpus, parse_cpus(&value("--cpus")?)?, "--cpus")?,
            "--memory" => {
                let text = value("--memory")?;
                let size = parse_size(&text).ok_or(ArgsError::BadSize(text))?;
                set_once(&mut memory, size, "--memory")?
            }
            "--stats" => stats = true,
            "-h" | "--help" => return Ok(Command::RunHelp),
            f if f.starts_with('-') => return Err(ArgsError::UnknownFlag(f.into())),
            _ => return Err(ArgsError::Unexpected(arg)),
        }
    }
    Ok(Command::Run(RunArgs {
        kernel: kernel.ok_or(ArgsError::NoKernel)?,
        initramfs,
        cmdline: cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.into()),
        cpus: cpus.unwrap_or(1),
        memory: memory.unwrap_or(DEFAULT_MEMORY),
        stats,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(line: &str) -> Result<Command, ArgsError> {
        parse(line.split_whitespace().map(String::from))
    }

    fn run(line: &str) -> RunArgs {
        match parse_str(line).unwrap() {
            Command::Run(r) => r,
            other => panic!("expected run, got {other:?}"),
        }
    }

    #[test]
    fn run_takes_every_flag() {
        let r = run("run --kernel k --initramfs i --cmdline x=1 --cpus 2 --memory 1G --stats");
        assert_eq!(r.kernel, PathBuf::from("k"));
        assert_eq!(r.initramfs, Some(PathBuf::from("i")));
        assert_eq!(r.cmdline, "x=1");
        assert_eq!((r.cpus, r.memory, r.stats), (2, 1 << 30, true));
    }

    #[test]
    fn defaults_apply() {
        let r = run("run --kernel=vmlinuz");
        assert_eq!((r.cpus, r.memory), (1, DEFAULT_MEMORY));
        assert_eq!(r.cmdline, DEFAULT_CMDLINE);
        assert_eq!(r.initramfs, None);
    }

    #[test]
    fn cmdline_with_spaces_survives_as_one_argument() {
        let args = ["run", "--kernel", "k", "--cmdline", "console=ttyS0 quiet"];
        let Command::Run(r) = parse(args.map(String::from)).unwrap() else {
            panic!()
        };
        assert_eq!(r.cmdline, "console=ttyS0 quiet");
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("12X"), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("-1G"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn bad_input_is_refused_with_its_name() {
        assert_eq!(
            parse_str("run --kernel k --cpus 0"),
            Err(ArgsError::BadCpus("0".into()))
        );
        assert_eq!(
            parse_str("run --kernel k --cpus 300"),
            Err(ArgsError::BadCpus("300".into()))
        );
        assert_eq!(
            parse_str("run --kernel k --memory 12X"),
            Err(ArgsError::BadSize("12X".into()))
        );
        assert_eq!(
            parse_str("run --kernel k --bogus"),
            Err(ArgsError::UnknownFlag("--bogus".into()))
        );
        assert_eq!(parse_str("run --cpus 1"), Err(ArgsError::NoKernel));
        assert_eq!(
            parse_str("run --kernel"),
            Err(ArgsError::MissingValue("--kernel"))
        );
        assert_eq!(
            parse_str("run --kernel a --kernel b"),
            Err(ArgsError::Repeated("--kernel"))
        );
        assert_eq!(
            parse_str("fly"),
            Err(ArgsError::UnknownCommand("fly".into()))
        );
        assert_eq!(parse_str(""), Err(ArgsError::NoCommand));
        assert_eq!(
            parse_str("run --kernel k extra"),
            Err(ArgsError::Unexpected("extra".into()))
        );
    }

    #[test]
    fn every_error_is_one_line() {
        let errors = [
            ArgsError::NoCommand,
            ArgsError::BadSize("x".into()),
            ArgsError::UnknownFlag("--x".into()),
            ArgsError::NoKernel,
        ];
        for e in errors {
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }
}
