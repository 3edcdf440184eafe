//! The switch driven through its port interface: frames in through
//! `receive`, frames out through each port's `PortTx`, time from a clock
//! the tests move by hand.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::*;
use crate::frame::tests::{frame, tagged};

/// A clock the test moves.
#[derive(Clone, Default)]
struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::SeqCst))
    }
}

/// A port's transmit side that keeps what it is given, or refuses it.
/// With `offloads`, it takes offloaded frames too and keeps their
/// requests.
#[derive(Clone, Default)]
struct Capture {
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    offloads: Option<Arc<Mutex<Vec<Offload>>>>,
    refuse: bool,
}

impl Capture {
    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.frames.lock().unwrap())
    }
}

impl PortTx for Capture {
    fn transmit(&mut self, frame: &[u8]) -> Result<(), TxDropped> {
        if self.refuse {
            return Err(TxDropped);
        }
        self.frames.lock().unwrap().push(frame.to_vec());
        Ok(())
    }

    fn transmit_offloaded(&mut self, offload: &Offload, frame: &[u8]) -> Result<(), TxDropped> {
        let Some(kept) = &self.offloads else {
            return Err(TxDropped);
        };
        kept.lock().unwrap().push(*offload);
        self.transmit(frame)
    }
}

const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
const C: [u8; 6] = [2, 0, 0, 0, 0, 0xc];
const X: [u8; 6] = [2, 0, 0, 0, 0, 0xf];
const BCAST: [u8; 6] = [0xff; 6];
const MCAST: [u8; 6] = [0x01, 0x00, 0x5e, 0, 0, 1];

struct Rig {
    switch: Switch,
    clock: ManualClock,
    ports: Vec<(PortId, Capture)>,
}

impl Rig {
    fn new(mode: Mode) -> Self {
        let clock = ManualClock::default();
        let config = SwitchConfig {
            mode,
            ageing: Duration::from_secs(300),
            max_stations: 64,
        };
        Self {
            switch: Switch::new(config, Box::new(clock.clone())),
            clock,
            ports: Vec::new(),
        }
    }

    /// Adds a port; returns its index in `self.ports`.
    fn port(&mut self, vlan: VlanMode, mac: Option<[u8; 6]>) -> usize {
        let capture = Capture::default();
        let n = self.ports.len();
        let config = PortConfig {
            name: format!("p{n}"),
            vlan,
            mac: mac.map(MacAddr),
        };
        let id = self
            .switch
            .add_port(config, Box::new(capture.clone()))
            .unwrap();
        self.ports.push((id, capture));
        n
    }

    fn access(&mut self, vlan: u16) -> usize {
        self.port(VlanMode::Access(vlan), None)
    }

    fn send(&mut self, from: usize, frame: &[u8]) -> Verdict {
        self.switch.receive(self.ports[from].0, frame)
    }

    fn got(&self, port: usize) -> Vec<Vec<u8>> {
        self.ports[port].1.take()
    }

    fn counters(&mut self, port: usize) -> PortCounters {
        self.switch.counters(self.ports[port].0).unwrap()
    }
}

#[test]
fn hub_floods_every_frame_to_every_other_port() {
    let mut rig = Rig::new(Mode::Hub);
    let (a, b, c) = (rig.access(1), rig.access(1), rig.access(1));
    let f = frame(B, A, 60);
    // Even after B has spoken, a hub keeps flooding: it learns nothing.
    rig.send(b, &frame(A, B, 60));
    rig.got(a);
    rig.got(c);
    assert_eq!(rig.send(a, &f), Verdict::Forwarded(2));
    assert_eq!(rig.got(b), vec![f.clone()]);
    assert_eq!(rig.got(c), vec![f]);
    assert!(rig.got(a).is_empty());
    assert_eq!(rig.counters(b).learned_macs, 0);
}

#[test]
fn bridge_floods_unknown_then_sends_only_to_the_learned_port() {
    let mut rig = Rig::new(Mode::Bridge);
    let (a, b, c) = (rig.access(1), rig.access(1), rig.access(1));
    // B is unknown: flooded.
    assert_eq!(rig.send(a, &frame(B, A, 60)), Verdict::Forwarded(2));
    assert_eq!(rig.got(b).len(), 1);
    assert_eq!(rig.got(c).len(), 1);
    // B answers A, which the bridge has learned: only A's port gets it.
    let reply = frame(A, B, 60);
    assert_eq!(rig.send(b, &reply), Verdict::Forwarded(1));
    assert_eq!(rig.got(a), vec![reply]);
    assert!(rig.got(c).is_empty());
    // And now B is known too.
    assert_eq!(rig.send(a, &frame(B, A, 60)), Verdict::Forwarded(1));
    assert_eq!(rig.got(b).len(), 1);
    assert!(rig.got(c).is_empty());
    assert_eq!(rig.counters(a).learned_macs, 1);
    assert_eq!(rig.counters(b).learned_macs, 1);
    assert_eq!(rig.counters(c).learned_macs, 0);
}

#[test]
fn bridge_floods_broadcast_and_multicast_even_when_known() {
    let mut rig = Rig::new(Mode::Bridge);
    let (a, b, c) = (rig.access(1), rig.access(1), rig.access(1));
    rig.send(b, &frame(A, B, 60));
    rig.got(a);
    rig.got(c);
    for dst in [BCAST, MCAST] {
        assert_eq!(rig.send(a, &frame(dst, A, 60)), Verdict::Forwarded(2));
        assert_eq!(rig.got(b).len(), 1);
        assert_eq!(rig.got(c).len(), 1);
    }
}

#[test]
fn a_frame_for_a_station_behind_its_own_port_goes_nowhere() {
    let mut rig = Rig::new(Mode::Bridge);
    let (uplink, other) = (rig.access(1), rig.access(1));
    rig.send(uplink, &frame(BCAST, A, 60));
    rig.send(uplink, &frame(BCAST, B, 60));
    rig.got(other);
    assert_eq!(rig.send(uplink, &frame(B, A, 60)), Verdict::Forwarded(0));
    assert!(rig.got(other).is_empty());
    assert_eq!(rig.counters(uplink).learned_macs, 2);
}

#[test]
fn stations_age_out_and_are_flooded_to_again() {
    let mut rig = Rig::new(Mode::Bridge);
    let (a, b, c) = (rig.access(1), rig.access(1), rig.access(1));
    rig.send(b, &frame(BCAST, B, 60));
    rig.got(a);
    rig.got(c);
    rig.clock.advance(Duration::from_secs(299));
    assert_eq!(rig.send(a, &frame(B, A, 60)), Verdict::Forwarded(1));
    assert_eq!(rig.counters(b).learned_macs, 1);
    rig.got(b);
    rig.clock.advance(Duration::from_secs(1));
    // 300 s since B last spoke: forgotten, so flooded to B and C again.
    assert_eq!(rig.send(a, &frame(B, A, 60)), Verdict::Forwarded(2));
    assert_eq!(rig.got(c).len(), 1);
    assert_eq!(rig.counters(b).learned_macs, 0);
}

#[test]
fn a_station_that_moves_is_followed() {
    let mut rig = Rig::new(Mode::Bridge);
    let (a, b, c) = (rig.access(1), rig.access(1), rig.access(1));
    rig.send(b, &frame(BCAST, X, 60));
    rig.send(c, &frame(BCAST, X, 60));
    rig.got(b);
    assert_eq!(rig.send(a, &frame(X, A, 60)), Verdict::Forwarded(1));
    assert!(rig.got(b).is_empty());
    // C got X's broadcast from B, then the frame for X.
    assert_eq!(rig.got(c).len(), 2);
    assert_eq!(rig.counters(b).learned_macs, 0);
    assert_eq!(rig.counters(c).learned_macs, 1);
}

#[test]
fn vlans_are_isolated_in_both_modes() {
    for mode in [Mode::Hub, Mode::Bridge] {
        let mut rig = Rig::new(mode);
        let (a10, b10, c20) = (rig.access(10), rig.access(10), rig.access(20));
        assert_eq!(rig.send(a10, &frame(BCAST, A, 60)), Verdict::Forwarded(1));
        assert_eq!(rig.got(b10).len(), 1);
        assert!(rig.got(c20).is_empty());
        // C on VLAN 20 cannot reach A even by its address, learned on 10.
        assert_eq!(rig.send(c20, &frame(A, C, 60)), Verdict::Forwarded(0));
        assert!(rig.got(a10).is_empty());
        assert!(rig.got(b10).is_empty());
    }
}

#[test]
fn trunks_get_tagged_frames_and_access_ports_untagged_ones() {
    let mut rig = Rig::new(Mode::Bridge);
    let a10 = rig.access(10);
    let b20 = rig.access(20);
    let trunk = rig.port(VlanMode::Trunk(vec![10, 20]), None);
    let f = frame(BCAST, A, 60);
    rig.send(a10, &f);
    assert_eq!(rig.got(trunk), vec![tagged(BCAST, A, 10, 60)]);
    assert!(rig.got(b20).is_empty());
    // A frame tagged 20 from the trunk reaches the VLAN 20 port untagged.
    let t = tagged(BCAST, X, 20, 60);
    assert_eq!(rig.send(trunk, &t), Verdict::Forwarded(1));
    assert_eq!(rig.got(b20), vec![frame(BCAST, X, 60)]);
    assert!(rig.got(a10).is_empty());
}

#[test]
fn trunk_to_trunk_keeps_the_tag_and_its_priority() {
    let mut rig = Rig::new(Mode::Hub);
    let t1 = rig.port(VlanMode::Trunk(vec![10]), None);
    let t2 = rig.port(VlanMode::Trunk(vec![10, 30]), None);
    let a10 = rig.access(10);
    let t = tagged(BCAST, X, 0xa000 | 10, 100);
    rig.send(t1, &t);
    assert_eq!(rig.got(t2), vec![t.clone()]);
    assert_eq!(rig.got(a10), vec![frame(BCAST, X, 100)]);
    // Untagged into a trunk: tagged with priority 0.
    rig.send(a10, &frame(BCAST, A, 100));
    assert_eq!(rig.got(t1), vec![tagged(BCAST, A, 10, 100)]);
}

#[test]
fn frames_on_the_wrong_vlan_for_a_port_are_dropped_and_counted() {
    let mut rig = Rig::new(Mode::Bridge);
    let a10 = rig.access(10);
    let trunk = rig.port(VlanMode::Trunk(vec![10]), None);
    let drop = Verdict::Dropped(DropReason::Vlan);
    // Tagged into an access port, untagged or VLAN 20 into a VLAN 10 trunk.
    assert_eq!(rig.send(a10, &tagged(BCAST, A, 10, 60)), drop);
    assert_eq!(rig.send(trunk, &frame(BCAST, X, 60)), drop);
    assert_eq!(rig.send(trunk, &tagged(BCAST, X, 20, 60)), drop);
    assert!(rig.got(a10).is_empty());
    assert!(rig.got(trunk).is_empty());
    let c = rig.counters(trunk);
    assert_eq!((c.rx_frames, c.rx_dropped, c.rx_vlan_dropped), (2, 2, 2));
    assert_eq!(rig.counters(a10).rx_vlan_dropped, 1);
    // Nothing was learned from dropped frames.
    assert_eq!(c.learned_macs, 0);
}

#[test]
fn a_port_sends_only_from_its_mac() {
    let mut rig = Rig::new(Mode::Bridge);
    let guest = rig.port(VlanMode::Access(1), Some(A));
    let other = rig.access(1);
    assert_eq!(rig.send(guest, &frame(BCAST, A, 60)), Verdict::Forwarded(1));
    assert_eq!(
        rig.send(guest, &frame(BCAST, B, 60)),
        Verdict::Dropped(DropReason::Spoofed)
    );
    assert_eq!(rig.got(other).len(), 1);
    let c = rig.counters(guest);
    assert_eq!((c.rx_frames, c.rx_dropped, c.rx_spoofed), (2, 1, 1));
    // The spoofed source was not learned: frames for B still flood.
    assert_eq!(rig.send(other, &frame(B, C, 60)), Verdict::Forwarded(1));
}

#[test]
fn malformed_frames_are_counted_and_dropped() {
    let mut rig = Rig::new(Mode::Bridge);
    let a = rig.access(1);
    let b = rig.access(1);
    let mut bad_tag = tagged(BCAST, A, 10, 60);
    bad_tag.truncate(16);
    let inputs: [&[u8]; 5] = [
        &[],
        &[0xff; 13],
        &frame(BCAST, MCAST, 60),
        &tagged(BCAST, A, 4095, 60),
        &bad_tag,
    ];
    for input in inputs {
        assert!(matches!(
            rig.send(a, input),
            Verdict::Dropped(DropReason::Malformed(_))
        ));
    }
    assert!(rig.got(b).is_empty());
    let c = rig.counters(a);
    assert_eq!((c.rx_frames, c.rx_dropped, c.rx_malformed), (5, 5, 5));
    assert_eq!(c.rx_bytes, 13 + 60 + 64 + 16);
}

#[test]
fn counters_count_frames_and_bytes_both_ways() {
    let mut rig = Rig::new(Mode::Hub);
    let a = rig.access(1);
    let trunk = rig.port(VlanMode::Trunk(vec![1]), None);
    rig.send(a, &frame(BCAST, A, 60));
    rig.send(a, &frame(BCAST, A, 1500));
    let ca = rig.counters(a);
    assert_eq!((ca.rx_frames, ca.rx_bytes, ca.rx_dropped), (2, 1560, 0));
    assert_eq!((ca.tx_frames, ca.tx_bytes), (0, 0));
    let ct = rig.counters(trunk);
    // Each frame grew by its tag on the way out.
    assert_eq!((ct.tx_frames, ct.tx_bytes), (2, 1568));
}

#[test]
fn a_refusing_port_counts_tx_drops_and_others_still_get_the_frame() {
    let mut rig = Rig::new(Mode::Hub);
    let a = rig.access(1);
    let full = Capture {
        refuse: true,
        ..Capture::default()
    };
    let config = PortConfig {
        name: "full".into(),
        vlan: VlanMode::Access(1),
        mac: None,
    };
    let full_id = rig.switch.add_port(config, Box::new(full)).unwrap();
    let b = rig.access(1);
    assert_eq!(rig.send(a, &frame(BCAST, A, 60)), Verdict::Forwarded(1));
    assert_eq!(rig.got(b).len(), 1);
    let c = rig.switch.counters(full_id).unwrap();
    assert_eq!((c.tx_frames, c.tx_dropped), (0, 1));
}

#[test]
fn removed_ports_take_their_stations_with_them() {
    let mut rig = Rig::new(Mode::Bridge);
    let (a, b, c) = (rig.access(1), rig.access(1), rig.access(1));
    rig.send(b, &frame(BCAST, B, 60));
    let id = rig.ports[b].0;
    assert_eq!(rig.switch.remove_port(id).unwrap().rx_frames, 1);
    assert_eq!(rig.switch.remove_port(id), None);
    assert_eq!(
        rig.switch.receive(id, &frame(BCAST, B, 60)),
        Verdict::Dropped(DropReason::NoSuchPort)
    );
    rig.got(c);
    // B's address is forgotten: flooded to the ports that are left.
    assert_eq!(rig.send(a, &frame(B, A, 60)), Verdict::Forwarded(1));
    assert_eq!(rig.got(c).len(), 1);
    assert_eq!(rig.switch.find_port("p1"), None);
    assert_eq!(rig.switch.find_port("p2"), Some(rig.ports[c].0));
}

#[test]
fn bad_port_configs_are_refused_with_the_reason() {
    let mut rig = Rig::new(Mode::Bridge);
    rig.port(VlanMode::Access(1), Some(A));
    let cfg = |name: &str, vlan, mac| PortConfig {
        name: name.into(),
        vlan,
        mac,
    };
    let tx = || Box::new(Capture::default());
    let err = rig
        .switch
        .add_port(cfg("p0", VlanMode::Access(1), None), tx());
    assert_eq!(err, Err(SwitchError::DuplicateName("p0".into())));
    let err = rig
        .switch
        .add_port(cfg("q", VlanMode::Access(1), Some(MacAddr(A))), tx())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "port `q`: MAC 02:00:00:00:00:0a already belongs to port `p0`"
    );
    let err = rig
        .switch
        .add_port(cfg("q", VlanMode::Trunk(vec![]), None), tx());
    assert_eq!(
        err,
        Err(SwitchError::Port(PortError::EmptyTrunk("q".into())))
    );
    assert_eq!(rig.switch.ports().len(), 1);
}

#[test]
fn a_full_station_table_floods_new_stations() {
    let clock = ManualClock::default();
    let config = SwitchConfig {
        mode: Mode::Bridge,
        ageing: Duration::from_secs(300),
        max_stations: 1,
    };
    let mut switch = Switch::new(config, Box::new(clock));
    let caps: Vec<Capture> = (0..3).map(|_| Capture::default()).collect();
    let ids: Vec<PortId> = caps
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let cfg = PortConfig {
                name: format!("p{i}"),
                vlan: VlanMode::Access(1),
                mac: None,
            };
            switch.add_port(cfg, Box::new(c.clone())).unwrap()
        })
        .collect();
    switch.receive(ids[0], &frame(BCAST, A, 60));
    switch.receive(ids[1], &frame(BCAST, B, 60));
    // A was learned, B was not (the table holds one station).
    assert_eq!(
        switch.receive(ids[2], &frame(A, C, 60)),
        Verdict::Forwarded(1)
    );
    assert_eq!(
        switch.receive(ids[2], &frame(B, C, 60)),
        Verdict::Forwarded(2)
    );
}

/// Every combination of: known, broadcast and multicast addresses; no tag
/// or a tag for a carried, foreign or reserved VLAN; lengths around the
/// header sizes; and no change or one byte of the EtherType or tag
/// overwritten.
fn mangled_frames() -> Vec<Vec<u8>> {
    let macs = [A, B, C, X, BCAST, MCAST];
    let tags = [None, Some(10), Some(20), Some(30), Some(0), Some(4095)];
    let lens = [0, 13, 14, 17, 18, 60];
    let mutations = [None, Some(12), Some(13), Some(15)];
    let mut out = Vec::new();
    for dst in macs {
        for src in macs {
            for tag in tags {
                for len in lens {
                    for mutation in mutations {
                        let mut f = match tag {
                            None => frame(dst, src, 60),
                            Some(vlan) => tagged(dst, src, vlan, 60),
                        };
                        if let Some(at) = mutation {
                            f[at] ^= 0x5a;
                        }
                        f.truncate(len);
                        out.push(f);
                    }
                }
            }
        }
    }
    out
}

#[test]
fn mangled_frames_never_break_isolation_tagging_or_the_counts() {
    let mut rig = Rig::new(Mode::Bridge);
    let a10 = rig.port(VlanMode::Access(10), Some(A));
    let trunk = rig.port(VlanMode::Trunk(vec![10, 20]), None);
    let c20 = rig.port(VlanMode::Access(20), Some(C));
    let frames = mangled_frames();
    let mut dropped = [0u64; 3];
    let mut from_a10_to_c20 = 0;
    let sends = frames
        .iter()
        .flat_map(|f| [a10, trunk, c20].map(|p| (p, f)));
    for (from, f) in sends {
        if let Verdict::Dropped(_) = rig.send(from, f) {
            dropped[from] += 1;
        }
        let (at_a10, at_trunk, at_c20) = (rig.got(a10), rig.got(trunk), rig.got(c20));
        if from == a10 {
            from_a10_to_c20 += at_c20.len();
        }
        rig.clock.advance(Duration::from_millis(50));
        for frame in at_a10.iter().chain(&at_c20) {
            assert_ne!(
                &frame[12..14],
                &[0x81, 0x00],
                "a tagged frame left an access port"
            );
        }
        for frame in at_trunk {
            let header = frame::parse(&frame).expect("the trunk got a malformed frame");
            assert!(matches!(header.vlan(), Some(10 | 20)), "{header:?}");
        }
    }
    assert_eq!(
        from_a10_to_c20, 0,
        "a frame crossed from VLAN 10 to VLAN 20"
    );
    let mut received = 0;
    for port in [a10, trunk, c20] {
        let c = rig.counters(port);
        received += c.rx_frames;
        assert_eq!(c.rx_dropped, dropped[port]);
        assert_eq!(
            c.rx_dropped,
            c.rx_spoofed + c.rx_malformed + c.rx_vlan_dropped
        );
        assert!(c.rx_dropped > 0 && c.rx_dropped < c.rx_frames, "{c:?}");
    }
    assert_eq!(received, 3 * frames.len() as u64);
}

/// A TCP segment's offload request: checksum from byte 34, TSO over IPv4
/// with 54 bytes of headers, as a guest writes it for an untagged frame.
fn tso_request() -> Offload {
    let mut h = [0u8; 12];
    h[0] = 1; // NEEDS_CSUM
    h[1] = 1; // GSO_TCPV4
    h[2..4].copy_from_slice(&54u16.to_le_bytes());
    h[4..6].copy_from_slice(&1448u16.to_le_bytes());
    h[6..8].copy_from_slice(&34u16.to_le_bytes());
    h[8..10].copy_from_slice(&16u16.to_le_bytes());
    Offload(h)
}

#[test]
fn an_offloaded_frame_reaches_ports_that_take_offloads_with_offsets_moved_by_the_tag() {
    let mut rig = Rig::new(Mode::Hub);
    let a = rig.access(10);
    let kept = Arc::new(Mutex::new(Vec::new()));
    let trunk = Capture {
        offloads: Some(kept.clone()),
        ..Capture::default()
    };
    let id = rig
        .switch
        .add_port(
            PortConfig {
                name: "trunk".into(),
                vlan: VlanMode::Trunk(vec![10]),
                mac: None,
            },
            Box::new(trunk.clone()),
        )
        .unwrap();
    let plain = rig.access(10);
    let f = frame(B, A, 2000);
    let verdict = rig
        .switch
        .receive_offloaded(rig.ports[a].0, tso_request(), &f);
    // The trunk took it, tagged, with csum_start and hdr_len 4 bytes on;
    // the access port that takes no offloads dropped it, counted.
    assert_eq!(verdict, Verdict::Forwarded(1));
    let got = kept.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(u16::from_le_bytes([got[0].0[6], got[0].0[7]]), 38);
    assert_eq!(u16::from_le_bytes([got[0].0[2], got[0].0[3]]), 58);
    assert_eq!(got[0].0[4..6], tso_request().0[4..6], "gso_size unchanged");
    assert_eq!(trunk.take()[0].len(), f.len() + 4);
    assert!(rig.got(plain).is_empty());
    assert_eq!(rig.counters(plain).tx_dropped, 1);
    // Back from the trunk to the access port: untagged, offsets 4 back.
    let mut back = tso_request().shifted(4).unwrap();
    back.0[1] = 0; // checksum only
    let tagged_frame = tagged(A, B, 10, 2000);
    rig.switch.receive_offloaded(id, back, &tagged_frame);
    assert!(rig.got(a).is_empty(), "the access port takes no offloads");
    assert_eq!(
        tso_request().shifted(-40),
        None,
        "an offset that would go below zero drops the frame"
    );
}
