//! The VMM's own resource use, read from procfs.

/// Resident memory of this process, split the way `/proc/self/status` does.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ResidentMemory {
    /// Private anonymous memory: the VMM's heap and stacks.
    pub anon_kib: u64,
    /// File-backed pages: the binary and its libraries.
    pub file_kib: u64,
    /// Shared memory: guest RAM, which lives in a memfd.
    pub shmem_kib: u64,
}

/// Parses the `Rss*` lines of a `/proc/PID/status` file.
pub fn parse_status(status: &str) -> ResidentMemory {
    let mut rss = ResidentMemory::default();
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let kib = value
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap_or(0);
        match key {
            "RssAnon" => rss.anon_kib = kib,
            "RssFile" => rss.file_kib = kib,
            "RssShmem" => rss.shmem_kib = kib,
            _ => {}
        }
    }
    rss
}

/// This process's resident memory, or zeros if procfs cannot be read.
pub fn resident_memory() -> ResidentMemory {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| parse_status(&s))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_parsed() {
        let text = "Name:\tferrovisor\nVmRSS:\t  9000 kB\nRssAnon:\t    1200 kB\nRssFile:\t    3400 kB\nRssShmem:\t  65536 kB\n";
        assert_eq!(
            parse_status(text),
            ResidentMemory {
                anon_kib: 1200,
                file_kib: 3400,
                shmem_kib: 65536
            }
        );
    }
}
