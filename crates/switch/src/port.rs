//! A switch port: its configuration (VLAN membership, the MAC it may send
//! from), its transmit side, and its counters.

use crate::frame::{MacAddr, VLAN_MAX, VLAN_MIN};

/// A port's transmit side: where the switch puts frames that leave through
/// it (a guest's receive queue, a host tap, a test's buffer). Frames are
/// complete Ethernet frames, tagged on trunk ports and untagged on access
/// ports.
pub trait PortTx: Send {
    /// Sends `frame` out. An error means the frame was dropped (the
    /// receiver's queue is full, or it is gone); the switch counts it.
    fn transmit(&mut self, frame: &[u8]) -> Result<(), TxDropped>;

    /// Sends `frame`, whose checksum or segmentation is left to the
    /// receiver as `offload` says. A port that cannot take such a frame
    /// drops it (the default); a frame with no offload is [`transmit`]ted.
    ///
    /// [`transmit`]: PortTx::transmit
    fn transmit_offloaded(&mut self, offload: &Offload, frame: &[u8]) -> Result<(), TxDropped> {
        if offload.is_none() {
            self.transmit(frame)
        } else {
            Err(TxDropped)
        }
    }
}

/// The offload request that travels with a frame between ports that take
/// offloads: a `virtio_net_hdr_v1` (flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers), as the sending guest wrote it.
/// The switch reads it only to move its offsets when it adds or removes a
/// VLAN tag; the receiving port decides whether it can take the frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offload(pub [u8; 12]);

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
const NEEDS_CSUM: u8 = 1;

impl Offload {
    /// No checksum to complete and no segmentation.
    pub const NONE: Offload = Offload([0; 12]);

    /// Whether the frame is complete as it is.
    pub fn is_none(&self) -> bool {
        !self.needs_csum() && self.gso_type() == 0
    }

    /// Whether the receiver must complete a checksum.
    pub fn needs_csum(&self) -> bool {
        self.0[0] & NEEDS_CSUM != 0
    }

    /// The segmentation asked for (`VIRTIO_NET_HDR_GSO_*`, 0 for none), ECN
    /// bit included.
    pub fn gso_type(&self) -> u8 {
        self.0[1]
    }

    fn field(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.0[at], self.0[at + 1]])
    }

    fn set_field(&mut self, at: usize, value: u16) {
        self.0[at..at + 2].copy_from_slice(&value.to_le_bytes());
    }

    /// The same request for the frame with its headers `delta` bytes
    /// longer (4 when a tag is added, -4 when one is removed): the
    /// checksum's start and the header length move with them. `None` when
    /// an offset would leave its range (a guest's nonsense).
    pub fn shifted(self, delta: i32) -> Option<Offload> {
        let mut out = self;
        let mv = |v: u16| u16::try_from(i32::from(v) + delta).ok();
        if self.needs_csum() {
            out.set_field(6, mv(self.field(6))?);
        }
        if self.gso_type() != 0 {
            out.set_field(2, mv(self.field(2))?);
        }
        Some(out)
    }
}

/// A frame a port could not send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the port dropped the frame")]
pub struct TxDropped;

/// How a port takes part in VLANs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VlanMode {
    /// Untagged frames on one VLAN: tags are added and removed at this edge,
    /// and tagged frames that arrive are dropped.
    Access(u16),
    /// Tagged frames on each of these VLANs; untagged frames, and frames
    /// tagged with a VLAN not in the list, are dropped.
    Trunk(Vec<u16>),
}

impl VlanMode {
    /// Whether the port carries `vlan`.
    pub fn carries(&self, vlan: u16) -> bool {
        match self {
            VlanMode::Access(v) => *v == vlan,
            VlanMode::Trunk(list) => list.contains(&vlan),
        }
    }
}

impl Default for VlanMode {
    /// Access on VLAN 1, the usual default VLAN.
    fn default() -> Self {
        VlanMode::Access(1)
    }
}

/// A port's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    /// A name unique on its switch (a guest's name and NIC, an uplink tap).
    pub name: String,
    pub vlan: VlanMode,
    /// The only source address the port may send from; `None` for an uplink,
    /// which forwards frames from many stations.
    pub mac: Option<MacAddr>,
}

/// A port configuration the switch refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// The VLAN id is outside 1..=4094.
    #[error("port `{port}`: VLAN {vlan} is outside {VLAN_MIN}..={VLAN_MAX}")]
    VlanRange { port: String, vlan: u16 },
    /// A trunk that carries nothing.
    #[error("port `{0}`: a trunk needs at least one VLAN")]
    EmptyTrunk(String),
    /// A trunk that names a VLAN twice.
    #[error("port `{port}`: VLAN {vlan} is listed twice")]
    DuplicateVlan { port: String, vlan: u16 },
    /// A configured MAC that is a group address, which no station sends from.
    #[error("port `{port}`: {mac} is a multicast address and cannot be a port's MAC")]
    GroupMac { port: String, mac: MacAddr },
    /// The name is empty.
    #[error("a port needs a name")]
    NoName,
}

impl PortConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), PortError> {
        if self.name.is_empty() {
            return Err(PortError::NoName);
        }
        let port = || self.name.clone();
        let vlans: &[u16] = match &self.vlan {
            VlanMode::Access(v) => std::slice::from_ref(v),
            VlanMode::Trunk(list) if list.is_empty() => return Err(PortError::EmptyTrunk(port())),
            VlanMode::Trunk(list) => list,
        };
        for (i, &vlan) in vlans.iter().enumerate() {
            if !(VLAN_MIN..=VLAN_MAX).contains(&vlan) {
                return Err(PortError::VlanRange { port: port(), vlan });
            }
            if vlans[..i].contains(&vlan) {
                return Err(PortError::DuplicateVlan { port: port(), vlan });
            }
        }
        match self.mac {
            Some(mac) if mac.is_group() => Err(PortError::GroupMac { port: port(), mac }),
            _ => Ok(()),
        }
    }
}

/// A port's counters. "rx" is what the port handed to the switch, "tx" what
/// the switch sent out through it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames from this port that the switch dropped, for any reason below.
    pub rx_dropped: u64,
    /// ... because their source was not the port's MAC.
    pub rx_spoofed: u64,
    /// ... because they were malformed (too short or long, bad tag, group
    /// source address).
    pub rx_malformed: u64,
    /// ... because of their VLAN: tagged on an access port, untagged on a
    /// trunk, or tagged with a VLAN the trunk does not carry.
    pub rx_vlan_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames for this port that its transmit side dropped.
    pub tx_dropped: u64,
    /// Stations the bridge has learned behind this port now.
    pub learned_macs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vlan: VlanMode, mac: Option<MacAddr>) -> PortConfig {
        PortConfig {
            name: "p".into(),
            vlan,
            mac,
        }
    }

    #[test]
    fn good_configs_pass() {
        assert_eq!(config(VlanMode::Access(1), None).validate(), Ok(()));
        assert_eq!(
            config(VlanMode::Trunk(vec![10, 20, 4094]), Some(MacAddr([2; 6]))).validate(),
            Ok(())
        );
    }

    #[test]
    fn bad_configs_name_the_port_and_the_fault() {
        let err = config(VlanMode::Access(0), None).validate().unwrap_err();
        assert_eq!(err.to_string(), "port `p`: VLAN 0 is outside 1..=4094");
        let err = config(VlanMode::Trunk(vec![5, 4095]), None).validate();
        assert!(matches!(err, Err(PortError::VlanRange { vlan: 4095, .. })));
        let err = config(VlanMode::Trunk(vec![]), None).validate();
        assert_eq!(err, Err(PortError::EmptyTrunk("p".into())));
        let err = config(VlanMode::Trunk(vec![5, 5]), None).validate();
        assert!(matches!(err, Err(PortError::DuplicateVlan { vlan: 5, .. })));
        let err = config(VlanMode::Access(1), Some(MacAddr::BROADCAST)).validate();
        assert!(matches!(err, Err(PortError::GroupMac { .. })));
        let mut unnamed = config(VlanMode::Access(1), None);
        unnamed.name.clear();
        assert_eq!(unnamed.validate(), Err(PortError::NoName));
    }

    #[test]
    fn membership() {
        assert!(VlanMode::Access(3).carries(3));
        assert!(!VlanMode::Access(3).carries(4));
        assert!(VlanMode::Trunk(vec![3, 4]).carries(4));
        assert!(!VlanMode::Trunk(vec![3, 4]).carries(5));
    }
}
