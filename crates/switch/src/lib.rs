//! The fabric's Ethernet switch: a hub or a learning bridge with VLANs,
//! anti-spoofing and per-port counters. No KVM, no sockets: frames arrive
//! as byte slices through [`Switch::receive`] and leave through each port's
//! [`PortTx`], so the same core serves guests' virtio-net queues, host taps
//! and unit tests.
//!
//! A frame goes through these steps:
//!
//! 1. **Checks.** A frame too short or too long, with a multicast source or a
//!    tag for VLAN 0 or 4095 is dropped as malformed. A port with a
//!    configured MAC sends only from it; other frames are dropped as spoofed.
//! 2. **Ingress VLAN.** An access port's frames must be untagged and belong
//!    to its VLAN; a trunk's must carry a tag for a VLAN in its list.
//! 3. **Learning** (bridge only): the source is recorded against the port
//!    and VLAN in the forwarding database, which forgets it after the
//!    ageing time.
//! 4. **Forwarding.** A bridge sends a frame for a known unicast address to
//!    that station's port only (and nowhere if that is the port it came
//!    from). Everything else (a hub's every frame, a bridge's broadcast,
//!    multicast and unknown destinations) is flooded to every other port on
//!    the frame's VLAN. Ports on other VLANs never see it.
//! 5. **Egress VLAN.** The frame leaves an access port untagged and a trunk
//!    tagged. The switch copies a frame only to add or remove a tag, once
//!    per frame whatever the number of ports.
//!
//! Every drop is counted on the port it came from (or, when its transmit
//! side refuses it, on the port it was going to). Nothing a port sends can
//! make the switch panic.

mod fdb;
pub mod frame;
mod port;

use std::time::Duration;

pub use fdb::{Clock, MonotonicClock};
pub use frame::{FrameError, MacAddr};
pub use port::{Offload, PortConfig, PortCounters, PortError, PortTx, TxDropped, VlanMode};

use fdb::{Fdb, Learned};

/// How long a bridge remembers a station it has not heard from (the usual
/// 802.1D default).
pub const DEFAULT_AGEING: Duration = Duration::from_secs(300);
/// The most stations a bridge learns; past this it floods.
pub const DEFAULT_MAX_STATIONS: usize = 4096;
/// How often (at most) receiving a frame also sweeps aged stations away.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// How the switch forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every frame goes to every other port on its VLAN.
    Hub,
    /// Learns where stations are and sends unicast frames only there.
    Bridge,
}

/// A switch's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchConfig {
    pub mode: Mode,
    /// How long a bridge remembers a station.
    pub ageing: Duration,
    /// The most stations a bridge learns.
    pub max_stations: usize,
}

impl SwitchConfig {
    /// `mode` with the default ageing time and table size.
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            ageing: DEFAULT_AGEING,
            max_stations: DEFAULT_MAX_STATIONS,
        }
    }
}

/// A port's handle on its switch. Handles are not reused while the switch
/// lives, so a stale one names no port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(usize);

/// Errors from changing the switch's ports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SwitchError {
    /// The port's configuration is invalid.
    #[error(transparent)]
    Port(#[from] PortError),
    /// Another port has this name.
    #[error("the switch already has a port named `{0}`")]
    DuplicateName(String),
    /// Two ports would send from the same MAC.
    #[error("port `{port}`: MAC {mac} already belongs to port `{owner}`")]
    DuplicateMac {
        port: String,
        mac: MacAddr,
        owner: String,
    },
}

/// Why the switch dropped a frame it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The port does not exist (any more).
    NoSuchPort,
    /// The frame is malformed.
    Malformed(FrameError),
    /// Its source is not the port's MAC.
    Spoofed,
    /// Its VLAN (or lack of a tag) is not allowed on the port.
    Vlan,
}

/// What the switch did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Sent to this many ports (0: no other port is on its VLAN, or its
    /// destination is behind the port it came from).
    Forwarded(usize),
    /// Dropped, and counted on the port it came from.
    Dropped(DropReason),
}

struct Port {
    config: PortConfig,
    tx: Box<dyn PortTx>,
    counters: PortCounters,
}

/// One switch.
pub struct Switch {
    config: SwitchConfig,
    ports: Vec<Option<Port>>,
    fdb: Fdb,
    clock: Box<dyn Clock>,
    last_sweep: Duration,
    /// Scratch buffers for the tagged and untagged forms of the frame being
    /// switched, and the ports it goes to.
    tagged: Vec<u8>,
    untagged: Vec<u8>,
    targets: Vec<usize>,
}

impl std::fmt::Debug for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switch")
            .field("config", &self.config)
            .field("ports", &self.ports.iter().flatten().count())
            .field("stations", &self.fdb.len())
            .finish_non_exhaustive()
    }
}

impl Switch {
    /// An empty switch that reads the time from `clock`.
    pub fn new(config: SwitchConfig, clock: Box<dyn Clock>) -> Self {
        let now = clock.now();
        Self {
            fdb: Fdb::new(config.ageing, config.max_stations),
            config,
            ports: Vec::new(),
            clock,
            last_sweep: now,
            tagged: Vec::new(),
            untagged: Vec::new(),
            targets: Vec::new(),
        }
    }

    /// The switch's mode.
    pub fn mode(&self) -> Mode {
        self.config.mode
    }

    fn live_ports(&self) -> impl Iterator<Item = (usize, &Port)> {
        self.ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i, p)))
    }

    /// Adds a port; frames for it go to `tx`.
    pub fn add_port(
        &mut self,
        config: PortConfig,
        tx: Box<dyn PortTx>,
    ) -> Result<PortId, SwitchError> {
        config.validate()?;
        for (_, other) in self.live_ports() {
            if other.config.name == config.name {
                return Err(SwitchError::DuplicateName(config.name));
            }
            if let (Some(mac), Some(theirs)) = (config.mac, other.config.mac) {
                if mac == theirs {
                    return Err(SwitchError::DuplicateMac {
                        port: config.name,
                        mac,
                        owner: other.config.name.clone(),
                    });
                }
            }
        }
        self.ports.push(Some(Port {
            config,
            tx,
            counters: PortCounters::default(),
        }));
        Ok(PortId(self.ports.len() - 1))
    }

    /// Removes a port and forgets the stations behind it; returns its last
    /// counters, or `None` if there was no such port.
    pub fn remove_port(&mut self, id: PortId) -> Option<PortCounters> {
        let port = self.ports.get_mut(id.0)?.take()?;
        self.fdb.flush_port(id.0);
        let mut counters = port.counters;
        counters.learned_macs = 0;
        Some(counters)
    }

    /// The port with this name.
    pub fn find_port(&self, name: &str) -> Option<PortId> {
        self.live_ports()
            .find(|(_, p)| p.config.name == name)
            .map(|(i, _)| PortId(i))
    }

    /// Every port, in the order they were added.
    pub fn ports(&self) -> Vec<(PortId, &PortConfig)> {
        self.live_ports()
            .map(|(i, p)| (PortId(i), &p.config))
            .collect()
    }

    /// A port's counters, after forgetting the stations that have aged out.
    pub fn counters(&mut self, id: PortId) -> Option<PortCounters> {
        self.age();
        self.ports.get(id.0)?.as_ref().map(|p| p.counters)
    }

    /// Forgets the stations that have aged out. Receiving frames does this
    /// too, at most once a second; a forgotten station is never used for
    /// forwarding, swept or not.
    pub fn age(&mut self) {
        let now = self.clock.now();
        self.last_sweep = now;
        for port in self.fdb.age(now) {
            if let Some(Some(p)) = self.ports.get_mut(port) {
                p.counters.learned_macs = p.counters.learned_macs.saturating_sub(1);
            }
        }
    }

    /// Records the frame's source against its port (bridge mode).
    fn learn(&mut self, vlan: u16, src: MacAddr, from: usize, now: Duration) {
        let bump = |ports: &mut Vec<Option<Port>>, i: usize, up: bool| {
            if let Some(Some(p)) = ports.get_mut(i) {
                let c = &mut p.counters.learned_macs;
                *c = if up { *c + 1 } else { c.saturating_sub(1) };
            }
        };
        match self.fdb.learn(vlan, src.to_u64(), from, now) {
            Learned::New => bump(&mut self.ports, from, true),
            Learned::Moved { from: old } => {
                bump(&mut self.ports, old, false);
                bump(&mut self.ports, from, true);
            }
            Learned::Refreshed | Learned::Full => {}
        }
    }

    /// Checks a frame from port `from` and works out its VLAN.
    fn admit(port: &mut Port, frame: &[u8]) -> Result<(frame::Header, u16), DropReason> {
        let c = &mut port.counters;
        c.rx_frames += 1;
        c.rx_bytes += frame.len() as u64;
        let verdict = match frame::parse(frame) {
            Err(e) => {
                c.rx_malformed += 1;
                Err(DropReason::Malformed(e))
            }
            Ok(h) if port.config.mac.is_some_and(|mac| mac != h.src) => {
                c.rx_spoofed += 1;
                Err(DropReason::Spoofed)
            }
            Ok(h) => match (&port.config.vlan, h.vlan()) {
                (VlanMode::Access(v), None) => Ok((h, *v)),
                (VlanMode::Trunk(list), Some(v)) if list.contains(&v) => Ok((h, v)),
                _ => {
                    c.rx_vlan_dropped += 1;
                    Err(DropReason::Vlan)
                }
            },
        };
        if verdict.is_err() {
            c.rx_dropped += 1;
        }
        verdict
    }

    /// Switches one frame that port `from` sent.
    pub fn receive(&mut self, from: PortId, frame: &[u8]) -> Verdict {
        self.receive_offloaded(from, Offload::NONE, frame)
    }

    /// Switches one frame that port `from` sent with an offload request
    /// (checksum or segmentation left to the receiver): each destination
    /// gets the request with its offsets moved by the tag the switch adds
    /// or removes, and drops the frame if it cannot take it.
    pub fn receive_offloaded(&mut self, from: PortId, offload: Offload, frame: &[u8]) -> Verdict {
        let Some(Some(port)) = self.ports.get_mut(from.0) else {
            return Verdict::Dropped(DropReason::NoSuchPort);
        };
        let (header, vlan) = match Self::admit(port, frame) {
            Ok(admitted) => admitted,
            Err(reason) => return Verdict::Dropped(reason),
        };
        let now = self.clock.now();
        if now.saturating_sub(self.last_sweep) >= SWEEP_INTERVAL {
            self.age();
        }
        self.targets.clear();
        if self.config.mode == Mode::Bridge {
            self.learn(vlan, header.src, from.0, now);
            if !header.dst.is_group() {
                if let Some(to) = self.fdb.lookup(vlan, header.dst.to_u64(), now) {
                    if to == from.0 {
                        return Verdict::Forwarded(0);
                    }
                    self.targets.push(to);
                }
            }
        }
        if self.targets.is_empty() {
            let members = self.ports.iter().enumerate().filter_map(|(i, p)| {
                let p = p.as_ref()?;
                (i != from.0 && p.config.vlan.carries(vlan)).then_some(i)
            });
            self.targets.extend(members);
        }
        // Keep the priority bits of an incoming tag; untagged frames get 0.
        let tci = header.tci.map_or(0, |t| t & 0xf000) | vlan;
        Verdict::Forwarded(self.transmit(frame, offload, header.tci.is_some(), tci))
    }

    /// Sends `frame` to every port in `self.targets`, tagged or untagged as
    /// each wants; returns how many ports took it.
    fn transmit(
        &mut self,
        frame: &[u8],
        offload: Offload,
        ingress_tagged: bool,
        tci: u16,
    ) -> usize {
        let Switch {
            ports,
            targets,
            tagged,
            untagged,
            ..
        } = self;
        tagged.clear();
        untagged.clear();
        let mut sent = 0;
        for &i in targets.iter() {
            let Some(Some(port)) = ports.get_mut(i) else {
                continue;
            };
            let trunk = matches!(port.config.vlan, VlanMode::Trunk(_));
            let (out, delta): (&[u8], i32) = match (trunk, ingress_tagged) {
                (true, true) | (false, false) => (frame, 0),
                (true, false) => {
                    if tagged.is_empty() {
                        frame::tag_into(frame, tci, tagged);
                    }
                    (tagged, 4)
                }
                (false, true) => {
                    if untagged.is_empty() {
                        frame::untag_into(frame, untagged);
                    }
                    (untagged, -4)
                }
            };
            let c = &mut port.counters;
            let sent_out = match offload.shifted(delta) {
                Some(o) if o.is_none() => port.tx.transmit(out),
                Some(o) => port.tx.transmit_offloaded(&o, out),
                None => Err(TxDropped),
            };
            match sent_out {
                Ok(()) => {
                    c.tx_frames += 1;
                    c.tx_bytes += out.len() as u64;
                    sent += 1;
                }
                Err(TxDropped) => c.tx_dropped += 1,
            }
        }
        sent
    }
}

#[cfg(test)]
mod tests;
