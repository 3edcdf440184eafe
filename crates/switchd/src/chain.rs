//! Reading a frame out of a guest's transmit descriptor chain and writing one
//! into a receive chain. Every guest address goes through `vm-memory`'s
//! checked accessors: a descriptor that points outside guest memory, a chain
//! that loops or names a descriptor past the table, or a buffer of the wrong
//! direction is an error, never a panic.

use virtio_queue::{desc::split::Descriptor, DescriptorChain};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// The virtio_net_hdr of a VERSION_1 device (`struct virtio_net_hdr_v1`):
/// flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
pub const NET_HDR_LEN: usize = 12;

/// The longest frame (with its header) a transmit chain may carry: the
/// switch's largest frame plus the virtio_net_hdr.
pub const MAX_TX_LEN: usize = switch::frame::MAX_FRAME_LEN + NET_HDR_LEN;

/// The header put in front of every frame written to a receive queue: no
/// offloads, and one buffer (`num_buffers`, which a VERSION_1 driver reads
/// whether or not mergeable buffers were negotiated).
pub const RX_HDR: [u8; NET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

/// Why a descriptor chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("a descriptor points outside guest memory")]
    OutOfBounds,
    #[error("the chain loops or names a descriptor outside the table")]
    Broken,
    #[error("a transmit descriptor is device-writable")]
    WriteOnly,
    #[error("a receive descriptor is device-readable")]
    ReadOnly,
    #[error("the chain holds less than a virtio_net_hdr")]
    Short,
    #[error("the chain holds more than the largest frame")]
    TooLong,
    #[error("the receive buffers are too small for the frame")]
    NoRoom,
}

/// Walks `chain`, calling `each` with every descriptor, and fails if the
/// walk ended on a descriptor that still says a next one follows (the
/// iterator stops on a loop, once it has seen as many descriptors as the
/// queue holds, and on a next index past the table).
fn walk<M, F>(chain: DescriptorChain<M>, mut each: F) -> Result<(), ChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
    F: FnMut(&Descriptor) -> Result<(), ChainError>,
{
    let mut more = false;
    for desc in chain {
        each(&desc)?;
        more = desc.has_next();
    }
    if more {
        return Err(ChainError::Broken);
    }
    Ok(())
}

/// Copies the frame of transmit `chain` into `buf`, which is cleared
/// first, and its virtio_net_hdr into `hdr`.
pub fn read_tx<M>(
    mem: &M::Target,
    chain: DescriptorChain<M>,
    buf: &mut Vec<u8>,
    hdr_out: &mut [u8; NET_HDR_LEN],
) -> Result<(), ChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    buf.clear();
    let mut skip = NET_HDR_LEN;
    walk(chain, |desc| {
        if desc.is_write_only() {
            return Err(ChainError::WriteOnly);
        }
        let len = desc.len() as usize;
        let hdr = skip.min(len);
        skip -= hdr;
        let body = len - hdr;
        if buf.len() + body > MAX_TX_LEN - NET_HDR_LEN {
            return Err(ChainError::TooLong);
        }
        mem.check_range(desc.addr(), len, Permissions::Read)
            .then_some(())
            .ok_or(ChainError::OutOfBounds)?;
        let at = NET_HDR_LEN - skip - hdr;
        mem.read_slice(&mut hdr_out[at..at + hdr], desc.addr())
            .map_err(|_| ChainError::OutOfBounds)?;
        let start = buf.len();
        buf.resize(start + body, 0);
        let from = desc
            .addr()
            .checked_add(hdr as u64)
            .ok_or(ChainError::OutOfBounds)?;
        mem.read_slice(&mut buf[start..], from)
            .map_err(|_| ChainError::OutOfBounds)
    })?;
    if skip > 0 {
        return Err(ChainError::Short);
    }
    Ok(())
}

/// Where the two bytes of a written header's `num_buffers` landed.
pub type NumBuffersAt = [GuestAddress; 2];

/// Writes the bytes of `hdr` followed by `frame`, from byte `start` of that
/// sequence on, into receive `chain`, as far as the chain holds. Returns
/// the bytes written and, when the header's `num_buffers` field (bytes 10
/// and 11) was written, where it landed, for a mergeable frame to patch.
pub fn fill_rx<M>(
    mem: &M::Target,
    chain: DescriptorChain<M>,
    hdr: &[u8; NET_HDR_LEN],
    frame: &[u8],
    start: usize,
) -> Result<(u32, Option<NumBuffersAt>), ChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let total = NET_HDR_LEN + frame.len();
    let mut done = start;
    let mut at = [None, None];
    walk(chain, |desc| {
        if !desc.is_write_only() {
            return Err(ChainError::ReadOnly);
        }
        let mut addr = desc.addr();
        let mut room = desc.len() as usize;
        if !mem.check_range(addr, room, Permissions::Write) {
            return Err(ChainError::OutOfBounds);
        }
        while room > 0 && done < total {
            let src = if done < NET_HDR_LEN {
                &hdr[done..]
            } else {
                &frame[done - NET_HDR_LEN..]
            };
            let n = src.len().min(room);
            for (k, slot) in at.iter_mut().enumerate() {
                let byte = 10 + k;
                if (done..done + n).contains(&byte) {
                    *slot = Some(GuestAddress(addr.0.wrapping_add((byte - done) as u64)));
                }
            }
            mem.write_slice(&src[..n], addr)
                .map_err(|_| ChainError::OutOfBounds)?;
            done += n;
            room -= n;
            addr = GuestAddress(addr.0.wrapping_add(n as u64));
        }
        Ok(())
    })?;
    let written = u32::try_from(done - start).map_err(|_| ChainError::TooLong)?;
    let num_buffers = match at {
        [Some(a), Some(b)] => Some([a, b]),
        _ => None,
    };
    Ok((written, num_buffers))
}

/// Writes `hdr` (`RX_HDR`, or the sender's offload request with
/// `num_buffers` 1) then `frame` into receive `chain`; returns the bytes
/// written (the used length). The whole frame must fit.
pub fn write_rx<M>(
    mem: &M::Target,
    chain: DescriptorChain<M>,
    hdr: &[u8; NET_HDR_LEN],
    frame: &[u8],
) -> Result<u32, ChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let (written, _) = fill_rx(mem, chain, hdr, frame, 0)?;
    if written as usize != NET_HDR_LEN + frame.len() {
        return Err(ChainError::NoRoom);
    }
    Ok(written)
}

/// Sets a written header's `num_buffers` to `n`.
pub fn set_num_buffers<M: GuestMemory + ?Sized>(
    mem: &M,
    at: NumBuffersAt,
    n: u16,
) -> Result<(), ChainError> {
    for (addr, byte) in at.into_iter().zip(n.to_le_bytes()) {
        mem.write_slice(&[byte], addr)
            .map_err(|_| ChainError::OutOfBounds)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    #[test]
    fn a_transmit_chain_gives_its_header_apart_even_when_split_across_descriptors() {
        let mem = memory();
        let queue = MockSplitQueue::new(&mem, 16);
        let hdr: [u8; NET_HDR_LEN] = [1, 1, 54, 0, 0xa8, 5, 34, 0, 16, 0, 0, 0];
        mem.write_slice(&hdr[..5], GuestAddress(0x10_0000)).unwrap();
        mem.write_slice(&hdr[5..], GuestAddress(0x11_0000)).unwrap();
        mem.write_slice(b"frame-bytes", GuestAddress(0x11_0007))
            .unwrap();
        let chain = queue
            .build_desc_chain(&[desc(0x10_0000, 5, false), desc(0x11_0000, 18, false)])
            .unwrap();
        let (mut buf, mut got) = (Vec::new(), [0u8; NET_HDR_LEN]);
        read_tx(&mem, chain, &mut buf, &mut got).unwrap();
        assert_eq!(got, hdr);
        assert_eq!(buf, b"frame-bytes");
    }

    #[test]
    fn bad_chains_are_refused_not_read() {
        let mem = memory();
        let queue = MockSplitQueue::new(&mem, 16);
        let mut cases = vec![
            (vec![desc(0x10_0000, 8, false)], ChainError::Short),
            (vec![desc(0x10_0000, 64, true)], ChainError::WriteOnly),
            (vec![desc(0x1f_fff0, 64, false)], ChainError::OutOfBounds),
        ];
        for (descs, want) in cases.drain(..) {
            let chain = queue.build_desc_chain(&descs).unwrap();
            let (mut buf, mut hdr) = (Vec::new(), [0u8; NET_HDR_LEN]);
            assert_eq!(read_tx(&mem, chain, &mut buf, &mut hdr), Err(want));
        }
    }

    #[test]
    fn a_receive_chain_gets_the_header_given_then_the_frame_or_nothing_if_too_small() {
        let mem = memory();
        let queue = MockSplitQueue::new(&mem, 16);
        let hdr: [u8; NET_HDR_LEN] = [1, 0, 0, 0, 0, 0, 34, 0, 16, 0, 1, 0];
        let chain = queue
            .build_desc_chain(&[desc(0x10_0000, 10, true), desc(0x12_0000, 100, true)])
            .unwrap();
        assert_eq!(write_rx(&mem, chain, &hdr, b"0123456789"), Ok(22));
        let mut got = [0u8; 12];
        mem.read_slice(&mut got[..10], GuestAddress(0x10_0000))
            .unwrap();
        mem.read_slice(&mut got[10..], GuestAddress(0x12_0000))
            .unwrap();
        assert_eq!(got, hdr);
        let mut frame = [0u8; 10];
        mem.read_slice(&mut frame, GuestAddress(0x12_0002)).unwrap();
        assert_eq!(&frame, b"0123456789");
        let small = queue
            .build_desc_chain(&[desc(0x10_0000, 16, true)])
            .unwrap();
        assert_eq!(
            write_rx(&mem, small, &RX_HDR, &[0u8; 64]),
            Err(ChainError::NoRoom)
        );
        let read_only = queue
            .build_desc_chain(&[desc(0x10_0000, 200, false)])
            .unwrap();
        assert_eq!(
            write_rx(&mem, read_only, &RX_HDR, &[0u8; 64]),
            Err(ChainError::ReadOnly)
        );
    }

    #[test]
    fn a_frame_spreads_over_two_chains_and_its_header_counts_them() {
        let mem = memory();
        let queue = MockSplitQueue::new(&mem, 16);
        let frame: Vec<u8> = (0..30).collect();
        let first = queue
            .build_desc_chain(&[desc(0x10_0000, 20, true)])
            .unwrap();
        let (n, at) = fill_rx(&mem, first, &RX_HDR, &frame, 0).unwrap();
        assert_eq!(n, 20);
        let at = at.expect("num_buffers was written");
        let second = queue
            .build_desc_chain(&[desc(0x12_0000, 100, true)])
            .unwrap();
        assert_eq!(
            fill_rx(&mem, second, &RX_HDR, &frame, 20).unwrap(),
            (22, None)
        );
        set_num_buffers(&mem, at, 2).unwrap();
        let mut hdr = [0u8; 12];
        mem.read_slice(&mut hdr, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 2);
        let mut rest = [0u8; 22];
        mem.read_slice(&mut rest, GuestAddress(0x12_0000)).unwrap();
        assert_eq!(rest[..], frame[8..]);
    }
}
