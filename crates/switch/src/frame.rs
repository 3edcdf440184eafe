//! Ethernet frames as the switch sees them: destination and source MAC, an
//! optional 802.1Q tag, and the rest. Frames are plain byte slices; nothing
//! here trusts their contents, and every accessor checks lengths first.

use std::fmt;

/// Ethernet header length without a tag: destination, source, EtherType.
pub const HEADER_LEN: usize = 14;
/// Length of an 802.1Q tag (TPID and TCI).
pub const TAG_LEN: usize = 4;
/// The 802.1Q tag protocol identifier.
pub const TPID_8021Q: u16 = 0x8100;
/// The longest frame the switch carries: a 64 KiB segment (what virtio-net
/// offloads hand over) plus a tagged header.
pub const MAX_FRAME_LEN: usize = 65_536 + HEADER_LEN + TAG_LEN;
/// The lowest and highest VLAN ids a port may use (0 means "priority tag
/// only" and 4095 is reserved).
pub const VLAN_MIN: u16 = 1;
pub const VLAN_MAX: u16 = 4094;

/// Why a frame was refused before it was switched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than an Ethernet header (or a tagged header, when tagged).
    #[error("frame of {0} bytes is shorter than its header")]
    TooShort(usize),
    /// Longer than [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes is longer than the switch carries")]
    TooLong(usize),
    /// The source address is a group (multicast) address, which no station has.
    #[error("source address is a multicast address")]
    GroupSource,
    /// An 802.1Q tag with VLAN id 0 or 4095.
    #[error("802.1Q tag names VLAN {0}, which no port carries")]
    BadVlan(u16),
}

/// A 48-bit MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The broadcast address ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// Whether this is a group address (multicast or broadcast): the I/G bit.
    pub fn is_group(&self) -> bool {
        self.0[0] & 1 != 0
    }

    /// The address as the low 48 bits of a `u64`, for compact table keys.
    pub fn to_u64(self) -> u64 {
        let b = self.0;
        u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What the switch reads from a frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub dst: MacAddr,
    pub src: MacAddr,
    /// The 802.1Q tag's control information (priority, DEI, VLAN id), if
    /// the frame carries a tag.
    pub tci: Option<u16>,
}

impl Header {
    /// The VLAN id of the frame's tag, if tagged.
    pub fn vlan(&self) -> Option<u16> {
        self.tci.map(|tci| tci & 0x0fff)
    }
}

fn mac_at(frame: &[u8], at: usize) -> MacAddr {
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&frame[at..at + 6]);
    MacAddr(mac)
}

/// Reads and checks a frame's header.
pub fn parse(frame: &[u8]) -> Result<Header, FrameError> {
    if frame.len() < HEADER_LEN {
        return Err(FrameError::TooShort(frame.len()));
    }
    if frame.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLong(frame.len()));
    }
    let dst = mac_at(frame, 0);
    let src = mac_at(frame, 6);
    if src.is_group() {
        return Err(FrameError::GroupSource);
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let tci = if ethertype == TPID_8021Q {
        if frame.len() < HEADER_LEN + TAG_LEN {
            return Err(FrameError::TooShort(frame.len()));
        }
        let tci = u16::from_be_bytes([frame[14], frame[15]]);
        let vid = tci & 0x0fff;
        if !(VLAN_MIN..=VLAN_MAX).contains(&vid) {
            return Err(FrameError::BadVlan(vid));
        }
        Some(tci)
    } else {
        None
    };
    Ok(Header { dst, src, tci })
}

/// Writes `frame` (untagged) into `out` with an 802.1Q tag carrying `tci`
/// inserted after the source address.
pub fn tag_into(frame: &[u8], tci: u16, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(frame.len() + TAG_LEN);
    out.extend_from_slice(&frame[..12]);
    out.extend_from_slice(&TPID_8021Q.to_be_bytes());
    out.extend_from_slice(&tci.to_be_bytes());
    out.extend_from_slice(&frame[12..]);
}

/// Writes `frame` (tagged) into `out` without its 802.1Q tag.
pub fn untag_into(frame: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(frame.len() - TAG_LEN);
    out.extend_from_slice(&frame[..12]);
    out.extend_from_slice(&frame[12 + TAG_LEN..]);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An untagged IPv4-typed frame of `len` bytes (at least the header).
    pub fn frame(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
        let mut f = Vec::with_capacity(len);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        f.resize(len.max(HEADER_LEN), 0x5a);
        f
    }

    /// The same frame with an 802.1Q tag for `vlan`.
    pub fn tagged(dst: [u8; 6], src: [u8; 6], vlan: u16, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        tag_into(&frame(dst, src, len), vlan, &mut out);
        out
    }

    #[test]
    fn parses_untagged_and_tagged_headers() {
        let f = frame([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], 60);
        let h = parse(&f).unwrap();
        assert_eq!(h.dst, MacAddr([2, 0, 0, 0, 0, 2]));
        assert_eq!(h.src, MacAddr([2, 0, 0, 0, 0, 1]));
        assert_eq!(h.vlan(), None);
        let t = tagged([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], 0x2000 | 10, 60);
        assert_eq!(parse(&t).unwrap().vlan(), Some(10));
        assert_eq!(parse(&t).unwrap().tci, Some(0x2000 | 10));
    }

    #[test]
    fn short_long_group_source_and_bad_tags_are_errors() {
        assert_eq!(parse(&[0; 13]), Err(FrameError::TooShort(13)));
        let mut t = tagged([2; 6], [2; 6], 10, 14);
        t.truncate(16);
        assert_eq!(parse(&t), Err(FrameError::TooShort(16)));
        let long = vec![0u8; MAX_FRAME_LEN + 1];
        assert_eq!(parse(&long), Err(FrameError::TooLong(MAX_FRAME_LEN + 1)));
        let f = frame([2; 6], [1, 0, 0, 0, 0, 1], 60);
        assert_eq!(parse(&f), Err(FrameError::GroupSource));
        assert_eq!(
            parse(&tagged([2; 6], [2; 6], 0, 60)),
            Err(FrameError::BadVlan(0))
        );
        assert_eq!(
            parse(&tagged([2; 6], [2; 6], 4095, 60)),
            Err(FrameError::BadVlan(4095))
        );
    }

    #[test]
    fn tag_then_untag_gives_back_the_frame() {
        let f = frame([2; 6], [4; 6], 64);
        let mut t = Vec::new();
        tag_into(&f, 7, &mut t);
        assert_eq!(t.len(), 68);
        assert_eq!(&t[12..16], &[0x81, 0x00, 0x00, 0x07]);
        let mut u = Vec::new();
        untag_into(&t, &mut u);
        assert_eq!(u, f);
    }

    #[test]
    fn mac_addresses_print_and_pack() {
        let mac = MacAddr([0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:ef");
        assert_eq!(mac.to_u64(), 0x5254_00ab_cdef);
        assert!(MacAddr::BROADCAST.is_group());
        assert!(!mac.is_group());
    }
}
