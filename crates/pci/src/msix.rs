//! MSI-X: the capability, the vector table and the pending-bit array (PBA).
//!
//! The table and PBA live in a BAR of the function; the guest writes each
//! vector's message (address and data) and its mask bit there, and turns
//! MSI-X on and masks the whole function through the capability's control
//! word in configuration space.
//!
//! Delivery is the VMM's business ([`MsiDelivery`]): it routes each vector
//! to its message (KVM GSI routing) and signals it (an irqfd). A vector is
//! routed whenever it becomes deliverable or its message changes while
//! deliverable; an interrupt on a masked vector sets its pending bit instead,
//! and the interrupt is sent when the vector is unmasked.

use std::io;
use std::sync::Arc;

/// The MSI-X capability id.
pub const CAPABILITY_ID: u8 = 0x11;
/// Size of one table entry.
pub const ENTRY_SIZE: u64 = 16;
/// The capability's length in configuration space.
pub const CAPABILITY_LEN: usize = 12;
/// Control word: MSI-X enable.
pub const CONTROL_ENABLE: u16 = 1 << 15;
/// Control word: all vectors masked.
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: the vector is masked.
const VECTOR_MASKED: u32 = 1;

/// The message a vector sends: an address in the interrupt range and data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// The VMM's side of one function's MSI-X vectors.
pub trait MsiDelivery: Send + Sync {
    /// Makes `vector` deliver `message` from now on.
    fn route(&self, vector: u16, message: MsiMessage) -> io::Result<()>;
    /// Sends `vector`'s interrupt.
    fn signal(&self, vector: u16) -> io::Result<()>;
    /// `vector` stopped being deliverable (masked, or MSI-X turned off):
    /// interrupts that reach it without passing through [`Msix::trigger`]
    /// must be held until the next [`MsiDelivery::route`]. Nothing to do
    /// for a delivery whose only source is `trigger`.
    fn hold(&self, _vector: u16) -> io::Result<()> {
        Ok(())
    }
    /// A descriptor that raises `vector` when written, with nothing in
    /// between (KVM's irqfd of its route), for a source in another process;
    /// `None` where there is none.
    fn irqfd(&self, _vector: u16) -> Option<vmm_sys_util::eventfd::EventFd> {
        None
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    address_low: u32,
    address_high: u32,
    data: u32,
    control: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.address_high) << 32 | u64::from(self.address_low),
            data: self.data,
        }
    }

    fn word(&self, index: usize) -> u32 {
        [self.address_low, self.address_high, self.data, self.control][index]
    }
}

/// One function's MSI-X state.
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    delivery: Arc<dyn MsiDelivery>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("vectors", &self.entries.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .finish_non_exhaustive()
    }
}

impl Msix {
    /// `vectors` vectors (1 to 2048), all masked, MSI-X off.
    pub fn new(vectors: u16, delivery: Arc<dyn MsiDelivery>) -> Self {
        let n = usize::from(vectors.clamp(1, 2048));
        let masked = Entry {
            address_low: 0,
            address_high: 0,
            data: 0,
            control: VECTOR_MASKED,
        };
        Self {
            entries: vec![masked; n],
            pending: vec![false; n],
            enabled: false,
            function_masked: false,
            delivery,
        }
    }

    /// The number of vectors.
    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// The table's size in bytes.
    pub fn table_len(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// The PBA's size in bytes (whole quadwords).
    pub fn pba_len(&self) -> u64 {
        (self.entries.len() as u64).div_ceil(64) * 8
    }

    /// The capability body for configuration space, and its write mask:
    /// table and PBA in BAR `bar` at the given offsets.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> (Vec<u8>, Vec<u8>) {
        let mut body = vec![CAPABILITY_ID, 0];
        body.extend_from_slice(&(self.vectors() - 1).to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let mut wmask = vec![0u8; CAPABILITY_LEN];
        wmask[3] = ((CONTROL_ENABLE | CONTROL_FUNCTION_MASK) >> 8) as u8;
        (body, wmask)
    }

    /// Whether MSI-X is on (the transport uses INTx otherwise).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn deliverable(&self, vector: usize) -> bool {
        self.enabled && !self.function_masked && !self.entries[vector].masked()
    }

    /// Routes `vector` and sends its pending interrupt, if it is deliverable.
    fn release(&mut self, vector: usize) {
        if !self.deliverable(vector) {
            return;
        }
        let _ = self
            .delivery
            .route(vector as u16, self.entries[vector].message());
        if std::mem::take(&mut self.pending[vector]) {
            let _ = self.delivery.signal(vector as u16);
        }
    }

    /// Takes the capability's control word after the guest wrote it.
    pub fn set_control(&mut self, control: u16) {
        let was: Vec<bool> = (0..self.entries.len())
            .map(|v| self.deliverable(v))
            .collect();
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        for (vector, was_deliverable) in was.into_iter().enumerate() {
            if !was_deliverable {
                self.release(vector);
            } else if !self.deliverable(vector) {
                let _ = self.delivery.hold(vector as u16);
            }
        }
    }

    /// Reads the table at `offset`; only aligned 4- and 8-byte accesses
    /// return data, others read as zero.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let at = offset + 4 * i as u64;
            let Some(entry) = self.entries.get((at / ENTRY_SIZE) as usize) else {
                return;
            };
            chunk.copy_from_slice(&entry.word((at % ENTRY_SIZE / 4) as usize).to_le_bytes());
        }
    }

    /// Writes the table at `offset` (aligned 4- or 8-byte accesses).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let at = offset + 4 * i as u64;
            let vector = (at / ENTRY_SIZE) as usize;
            if vector >= self.entries.len() {
                return;
            }
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let was_deliverable = self.deliverable(vector);
            let entry = &mut self.entries[vector];
            match at % ENTRY_SIZE / 4 {
                0 => entry.address_low = value,
                1 => entry.address_high = value,
                2 => entry.data = value,
                _ => entry.control = value & VECTOR_MASKED,
            }
            let message_changed = at % ENTRY_SIZE < 12;
            if !was_deliverable || message_changed {
                self.release(vector);
            } else if !self.deliverable(vector) {
                let _ = self.delivery.hold(vector as u16);
            }
        }
    }

    /// Reads the PBA at `offset`.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let first = (offset as usize + i) * 8;
            *byte = (0..8)
                .filter(|bit| self.pending.get(first + bit).copied().unwrap_or(false))
                .fold(0u8, |acc, bit| acc | 1 << bit);
        }
    }

    /// The irqfd that raises `vector` directly, when MSI-X is on and the
    /// vector deliverable now (so its route is set). Written while the
    /// guest masks the vector later, it still delivers: only for sources
    /// whose driver does not mask vectors while they run (virtio queues).
    pub fn irqfd(&self, vector: u16) -> Option<vmm_sys_util::eventfd::EventFd> {
        let v = usize::from(vector);
        if v >= self.entries.len() || !self.deliverable(v) {
            return None;
        }
        self.delivery.irqfd(vector)
    }

    /// Raises `vector`: sent now if deliverable, otherwise left pending.
    /// Vectors past the table are ignored.
    pub fn trigger(&mut self, vector: u16) -> io::Result<()> {
        let v = usize::from(vector);
        if v >= self.entries.len() {
            return Ok(());
        }
        if self.deliverable(v) {
            self.delivery.signal(vector)
        } else {
            self.pending[v] = true;
            Ok(())
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what the VMM would have done.
    #[derive(Default)]
    pub struct Recorder {
        pub routes: Mutex<Vec<(u16, MsiMessage)>>,
        pub signals: Mutex<Vec<u16>>,
        pub holds: Mutex<Vec<u16>>,
    }

    impl MsiDelivery for Recorder {
        fn route(&self, vector: u16, message: MsiMessage) -> io::Result<()> {
            self.routes.lock().unwrap().push((vector, message));
            Ok(())
        }
        fn signal(&self, vector: u16) -> io::Result<()> {
            self.signals.lock().unwrap().push(vector);
            Ok(())
        }
        fn hold(&self, vector: u16) -> io::Result<()> {
            self.holds.lock().unwrap().push(vector);
            Ok(())
        }
    }

    fn msix(vectors: u16) -> (Msix, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        (Msix::new(vectors, rec.clone()), rec)
    }

    fn write32(m: &mut Msix, offset: u64, v: u32) {
        m.write_table(offset, &v.to_le_bytes());
    }

    fn program(m: &mut Msix, vector: u64, address: u64, data: u32) {
        write32(m, vector * 16, address as u32);
        write32(m, vector * 16 + 4, (address >> 32) as u32);
        write32(m, vector * 16 + 8, data);
    }

    #[test]
    fn capability_encodes_size_bar_and_offsets() {
        let (m, _) = msix(3);
        let (body, wmask) = m.capability(0, 0x4000, 0x5000);
        assert_eq!(body[0], CAPABILITY_ID);
        assert_eq!(u16::from_le_bytes([body[2], body[3]]), 2);
        assert_eq!(u32::from_le_bytes(body[4..8].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(body[8..12].try_into().unwrap()), 0x5000);
        assert_eq!(wmask[3], 0xc0);
    }

    #[test]
    fn table_reads_back_and_vectors_start_masked() {
        let (mut m, _) = msix(2);
        program(&mut m, 1, 0xfee0_1000, 0x4041);
        let mut b = [0u8; 8];
        m.read_table(16, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0xfee0_1000);
        let mut c = [0u8; 4];
        m.read_table(16 + 12, &mut c);
        assert_eq!(u32::from_le_bytes(c), 1);
    }

    #[test]
    fn unmasked_vector_is_routed_and_signalled() {
        let (mut m, rec) = msix(2);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 0, 0xfee0_0000, 0x30);
        write32(&mut m, 12, 0);
        let expected = MsiMessage {
            address: 0xfee0_0000,
            data: 0x30,
        };
        assert_eq!(rec.routes.lock().unwrap().last(), Some(&(0, expected)));
        m.trigger(0).unwrap();
        assert_eq!(*rec.signals.lock().unwrap(), vec![0]);
    }

    #[test]
    fn masked_vector_latches_pba_and_fires_on_unmask() {
        let (mut m, rec) = msix(2);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 1, 0xfee0_0000, 0x31);
        m.trigger(1).unwrap();
        assert!(rec.signals.lock().unwrap().is_empty());
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        write32(&mut m, 16 + 12, 0);
        assert_eq!(*rec.signals.lock().unwrap(), vec![1]);
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
    }

    #[test]
    fn a_vector_that_stops_being_deliverable_is_held_once() {
        let (mut m, rec) = msix(2);
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 0, 0xfee0_0000, 0x30);
        write32(&mut m, 12, 0);
        assert!(rec.holds.lock().unwrap().is_empty());
        // Masking the vector holds it; masking it again does nothing more.
        write32(&mut m, 12, 1);
        write32(&mut m, 12, 1);
        assert_eq!(*rec.holds.lock().unwrap(), vec![0]);
        // Unmasked, it is routed again; turning MSI-X off holds it again,
        // and vector 1, never deliverable, is not held.
        write32(&mut m, 12, 0);
        m.set_control(0);
        assert_eq!(*rec.holds.lock().unwrap(), vec![0, 0]);
        assert_eq!(rec.routes.lock().unwrap().len(), 2);
    }

    #[test]
    fn function_mask_holds_every_vector() {
        let (mut m, rec) = msix(1);
        program(&mut m, 0, 0xfee0_0000, 0x32);
        write32(&mut m, 12, 0);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.trigger(0).unwrap();
        assert!(rec.signals.lock().unwrap().is_empty());
        m.set_control(CONTROL_ENABLE);
        assert_eq!(*rec.signals.lock().unwrap(), vec![0]);
    }

    #[test]
    fn odd_accesses_and_vectors_past_the_table_are_harmless() {
        let (mut m, rec) = msix(1);
        m.write_table(1, &[1, 2]);
        m.write_table(16, &[0; 4]);
        let mut b = [0xaa; 2];
        m.read_table(0, &mut b);
        assert_eq!(b, [0, 0]);
        m.trigger(7).unwrap();
        assert!(rec.signals.lock().unwrap().is_empty());
    }
}
