//! The virtio-blk request parser: a pure function from guest memory and a descriptor chain to a
//! validated request (or the status to report), so it can be unit-tested against
//! `virtio_queue::mock` and fuzzed.
//!
//! Layout (virtio 1.2 §5.2.6, with VIRTIO_F_ANY_LAYOUT implied by VERSION_1): the device-readable
//! part of the chain starts with the 16-byte header `{le32 type, le32 reserved, le64 sector}`
//! followed by the data the device reads (OUT, DISCARD/WRITE_ZEROES segments); the
//! device-writable part holds the data the device writes (IN, GET_ID) and ends with the 1-byte
//! status. Descriptor boundaries need not match field boundaries (the parser treats both parts
//! as byte streams), but every device-readable descriptor must come before the first
//! device-writable one.

use std::ops::Deref;

use smallvec::SmallVec;
use vblk_engine::{IoVec, IoVecs};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::config::{SECTORS_PER_BLOCK, SECTOR_SHIFT, SECTOR_SIZE};

pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// Length of the request header.
pub const HEADER_LEN: u64 = 16;
/// Length of one DISCARD / WRITE_ZEROES segment.
pub const DWZ_SEGMENT_LEN: u64 = 16;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Most host iovecs one request may resolve to (a segment that spans two guest memory regions
/// becomes two iovecs): the kernel's IOV_MAX.
pub const MAX_IOVECS: usize = 1024;
/// Largest read or write the device takes in one request, whatever the queue size: it bounds
/// the engine's bookkeeping for one request (which always starts however many operations it
/// needs) and a bounce buffer. [`RequestLimits::max_bytes`] is `seg_max × size_max` below it.
pub const MAX_REQUEST_BYTES: u64 = 1 << 30;

/// Descriptors beyond `seg_max` a chain may have (header, status, and a split header or payload).
const EXTRA_DESCRIPTORS: usize = 4;

/// What the parser checks a request against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Current capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    pub read_only: bool,
    /// Largest number of data segments (descriptors) in one read or write.
    pub seg_max: u32,
    /// Largest data segment in bytes.
    pub size_max: u32,
    pub max_discard_seg: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub max_write_zeroes_sectors: u32,
    /// Largest read or write in bytes: `seg_max × size_max` of the negotiated limits, also for a
    /// driver that negotiated neither (at most [`MAX_REQUEST_BYTES`]).
    pub max_bytes: u64,
}

impl RequestLimits {
    /// Limits matching [`crate::config::BlkConfig`] for a volume of `size_bytes`, for a driver
    /// that negotiated `SIZE_MAX` and `SEG_MAX` (see [`negotiated`](Self::negotiated)).
    pub fn new(size_bytes: u64, read_only: bool, queue_size: u16) -> RequestLimits {
        use crate::config::*;
        RequestLimits {
            capacity_sectors: size_bytes >> SECTOR_SHIFT,
            read_only,
            seg_max: seg_max_for(queue_size),
            size_max: SIZE_MAX,
            max_discard_seg: MAX_DISCARD_SEG,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_WRITE_ZEROES_SEG,
            max_write_zeroes_sectors: MAX_WRITE_ZEROES_SECTORS,
            max_bytes: (u64::from(seg_max_for(queue_size)) * u64::from(SIZE_MAX)).min(MAX_REQUEST_BYTES),
        }
    }

    /// The limits a driver that acknowledged `features` agreed to. `size_max` and `seg_max`
    /// bind only a driver that negotiated `VIRTIO_BLK_F_SIZE_MAX` / `VIRTIO_BLK_F_SEG_MAX`
    /// (virtio 1.2 §5.2.3), and some do not: OVMF acknowledges neither and sends a whole
    /// transfer as one descriptor. Without them a segment may be as large as a request
    /// ([`max_bytes`](Self::max_bytes), the same bound a negotiating driver has) and a request
    /// may have as many segments as the engine takes iovecs ([`MAX_IOVECS`]).
    pub fn negotiated(mut self, features: u64) -> RequestLimits {
        use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX};
        if features & (1 << VIRTIO_BLK_F_SIZE_MAX) == 0 {
            self.size_max = MAX_REQUEST_BYTES as u32;
        }
        if features & (1 << VIRTIO_BLK_F_SEG_MAX) == 0 {
            self.seg_max = MAX_IOVECS as u32;
        }
        self
    }
}

/// A contiguous piece of guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestSeg {
    pub addr: GuestAddress,
    pub len: u32,
}

/// The segments of a request's data: inline for the usual one (no allocation per request; see
/// [`vblk_engine::IoVecs`]).
pub type Segs = SmallVec<[GuestSeg; 1]>;

/// The data buffers of a read or write: guest segments and the same memory as host iovecs.
#[derive(Debug)]
pub struct DataBuf {
    pub segs: Segs,
    /// Host virtual addresses of `segs`, valid while the guest memory object the request was
    /// parsed against is alive.
    pub iov: IoVecs,
    /// Total bytes.
    pub len: u64,
}

/// A byte range of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

/// A validated request.
#[derive(Debug)]
pub enum BlkOp {
    /// VIRTIO_BLK_T_IN: read `buf.len` bytes at `offset` into `buf` (device-writable).
    Read { offset: u64, buf: DataBuf },
    /// VIRTIO_BLK_T_OUT: write `buf` (device-readable) at `offset`.
    Write { offset: u64, buf: DataBuf },
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: the device writes the 20-byte id into `segs` (truncated to their
    /// length).
    GetId { segs: Segs },
    /// VIRTIO_BLK_T_DISCARD, trimmed to whole 4 KiB blocks (may be empty: nothing to do).
    Discard(Vec<ByteRange>),
    /// VIRTIO_BLK_T_WRITE_ZEROES (unmap allowed or not, the engine unmaps: reads return zeros).
    WriteZeroes(Vec<ByteRange>),
}

/// Why a request is refused; [`RequestError::status`] is the status byte to report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the chain has no device-writable byte for the status")]
    NoStatus,
    #[error("a device-readable descriptor follows a device-writable one")]
    BadLayout,
    #[error("the chain has more than {0} descriptors")]
    TooManyDescriptors(usize),
    #[error("the request header has {0} bytes, need 16")]
    ShortHeader(u64),
    #[error("guest memory at {addr:#x} (+{len}) is not mapped")]
    BadAddress { addr: u64, len: u64 },
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("request type {0} has data buffers in the wrong direction")]
    WrongDirection(u32),
    #[error("data length {0} is not a multiple of 512")]
    BadLength(u64),
    #[error("sectors {sector}+{sectors} are beyond the capacity of {capacity} sectors")]
    OutOfRange { sector: u64, sectors: u64, capacity: u64 },
    #[error("a data segment of {0} bytes exceeds size_max")]
    SegmentTooLarge(u32),
    #[error("{0} data segments exceed seg_max")]
    TooManySegments(usize),
    #[error("a read or write of {0} bytes exceeds the device's limit per request (seg_max × size_max)")]
    TooLong(u64),
    #[error("the device is read-only")]
    ReadOnly,
    #[error("a discard/write-zeroes payload of {0} bytes is not a non-zero multiple of 16")]
    BadSegmentPayload(u64),
    #[error("{count} discard/write-zeroes segments exceed the maximum of {max}")]
    TooManyDiscardSegments { count: u64, max: u32 },
    #[error("discard/write-zeroes flags {0:#x} are not supported")]
    BadFlags(u32),
    #[error("{sectors} sectors in one discard/write-zeroes segment exceed the maximum of {max}")]
    DiscardTooLarge { sectors: u32, max: u32 },
}

impl RequestError {
    /// The virtio-blk status for this error.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_)
            | RequestError::BadFlags(_)
            | RequestError::TooManyDiscardSegments { .. } => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }
}

/// The result of parsing one descriptor chain.
#[derive(Debug)]
pub struct ParsedRequest {
    /// Head descriptor index (for the used ring).
    pub head: u16,
    /// Where to write the status byte: the last byte of the device-writable part. `None` when
    /// the chain has no (mapped) device-writable byte: the chain can only be returned with a
    /// used length of 0.
    pub status_addr: Option<GuestAddress>,
    /// Total device-writable bytes of the chain, status included: the used length reported on
    /// completion (as QEMU does) when the status byte was written.
    pub writable_len: u32,
    /// The request type from the header, when there was one.
    pub req_type: Option<u32>,
    pub op: Result<BlkOp, RequestError>,
}

// Moved from parser to submission by value: see the size note on `Chain` (backend.rs).
const _: () = assert!(std::mem::size_of::<ParsedRequest>() <= 128);

/// Parse the descriptor chain of one virtio-blk request.
///
/// Never panics and never writes guest memory; reads only the header and DISCARD /
/// WRITE_ZEROES segments. Host pointers in the result stay valid as long as the memory object
/// behind the chain is alive.
pub fn parse_request<M>(chain: DescriptorChain<M>, limits: &RequestLimits) -> ParsedRequest
where
    M: Deref + Clone,
    M::Target: GuestMemoryBackend,
{
    let head = chain.head_index();
    parse_descriptors(chain.memory(), head, chain.clone(), limits)
}

/// The descriptors of the chain whose head is `head`, read from the descriptor table at
/// `table` of a queue of `queue_size` entries, indirect tables resolved: the walk of
/// virtio-queue's `DescriptorChain`, for a chain that is not in the avail ring (one that an
/// earlier backend left in flight, see [`crate::inflight`]). The chain ends where it breaks the
/// rules (a head or next index past its table, more descriptors than the table holds, a nested
/// or misaligned indirect table, unreadable memory); [`parse_descriptors`] then refuses what is
/// left if it is not a whole request.
pub fn chain_at<M>(mem: &M, table: GuestAddress, queue_size: u16, head: u16) -> Vec<Descriptor>
where
    M: GuestMemoryBackend + ?Sized,
{
    const DESC: u64 = 16;
    let mut out = Vec::new();
    let (mut table, mut size, mut idx, mut ttl) = (table, u32::from(queue_size), u32::from(head), u32::from(queue_size));
    let mut indirect = false;
    // A chain longer than 2^32 bytes is illegal (virtio 1.2, 2.7.5.2): it ends there.
    let mut bytes: u32 = 0;
    while ttl > 0 && idx < size {
        let Some(addr) = table.checked_add(u64::from(idx) * DESC) else { break };
        let Ok(d) = mem.read_obj::<Descriptor>(addr) else { break };
        if d.refers_to_indirect_table() {
            if indirect || u64::from(d.len()) % DESC != 0 || u64::from(d.len()) / DESC > u64::from(u16::MAX) {
                break;
            }
            (table, size, idx, indirect) = (d.addr(), d.len() / DESC as u32, 0, true);
            ttl = size;
            continue;
        }
        let Some(b) = bytes.checked_add(d.len()) else { break };
        bytes = b;
        out.push(d);
        if !d.has_next() {
            break;
        }
        idx = u32::from(d.next());
        ttl -= 1;
    }
    out
}

/// [`parse_request`] over any sequence of descriptors (the fuzzing entry point: no queue
/// needed). `descs` is the chain in order, indirect tables already resolved.
pub fn parse_descriptors<M, I>(mem: &M, head: u16, descs: I, limits: &RequestLimits) -> ParsedRequest
where
    M: GuestMemoryBackend + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let max_descs = limits.seg_max as usize + EXTRA_DESCRIPTORS;
    // Inline for the usual 2-3 descriptors: no allocation for the common request.
    let mut readable: SmallVec<[GuestSeg; 4]> = SmallVec::new();
    let mut writable: SmallVec<[GuestSeg; 4]> = SmallVec::new();
    let mut last_writable: Option<GuestSeg> = None;
    let mut writable_total: u64 = 0;
    let mut bad_layout = false;
    let mut too_many = false;
    for d in descs {
        if d.len() == 0 {
            continue;
        }
        let seg = GuestSeg { addr: d.addr(), len: d.len() };
        if d.is_write_only() {
            writable_total = writable_total.saturating_add(u64::from(d.len()));
            last_writable = Some(seg);
        } else if last_writable.is_some() {
            bad_layout = true;
        }
        // Keep at most max_descs descriptors but walk on to find the status byte (the chain
        // itself is bounded by the queue or indirect table size).
        if readable.len() + writable.len() >= max_descs {
            too_many = true;
            continue;
        }
        if d.is_write_only() {
            writable.push(seg);
        } else {
            readable.push(seg);
        }
    }

    let status_addr = last_writable
        .and_then(|s| s.addr.checked_add(u64::from(s.len) - 1))
        .filter(|a| mem.address_in_range(*a));
    let mut out = ParsedRequest {
        head,
        status_addr,
        writable_len: u32::try_from(writable_total).unwrap_or(u32::MAX),
        req_type: None,
        op: Err(RequestError::NoStatus),
    };
    if status_addr.is_none() {
        return out;
    }
    if bad_layout {
        out.op = Err(RequestError::BadLayout);
        return out;
    }
    if too_many {
        out.op = Err(RequestError::TooManyDescriptors(max_descs));
        return out;
    }

    let readable_total: u64 = readable.iter().map(|s| u64::from(s.len)).sum();
    if readable_total < HEADER_LEN {
        out.op = Err(RequestError::ShortHeader(readable_total));
        return out;
    }
    let mut hdr = [0u8; HEADER_LEN as usize];
    if let Err(e) = read_stream(mem, &readable, 0, &mut hdr) {
        out.op = Err(e);
        return out;
    }
    let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15]]);
    out.req_type = Some(req_type);

    // Data the device reads: the readable stream after the header. Data the device writes: the
    // writable stream without its last (status) byte.
    let out_data = sub_stream(&readable, HEADER_LEN, readable_total - HEADER_LEN);
    let in_data = sub_stream(&writable, 0, writable_total - 1);
    out.op = match (out_data, in_data) {
        (Ok(o), Ok(i)) => parse_op(mem, req_type, sector, o, i, limits),
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    out
}

fn parse_op<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    req_type: u32,
    sector: u64,
    out_data: Segs,
    in_data: Segs,
    limits: &RequestLimits,
) -> Result<BlkOp, RequestError> {
    match req_type {
        VIRTIO_BLK_T_IN => {
            if !out_data.is_empty() {
                return Err(RequestError::WrongDirection(req_type));
            }
            let (offset, buf) = data_buf(mem, sector, in_data, limits)?;
            Ok(BlkOp::Read { offset, buf })
        }
        VIRTIO_BLK_T_OUT => {
            if !in_data.is_empty() {
                return Err(RequestError::WrongDirection(req_type));
            }
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            let (offset, buf) = data_buf(mem, sector, out_data, limits)?;
            Ok(BlkOp::Write { offset, buf })
        }
        // The sector of a flush is reserved (0); stray data buffers are ignored.
        VIRTIO_BLK_T_FLUSH => Ok(BlkOp::Flush),
        VIRTIO_BLK_T_GET_ID => Ok(BlkOp::GetId { segs: in_data }),
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if !in_data.is_empty() {
                return Err(RequestError::WrongDirection(req_type));
            }
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            parse_dwz(mem, req_type == VIRTIO_BLK_T_DISCARD, &out_data, limits)
        }
        t => Err(RequestError::Unsupported(t)),
    }
}

/// Validate the data of a read or write and resolve it to host iovecs.
fn data_buf<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    sector: u64,
    segs: Segs,
    limits: &RequestLimits,
) -> Result<(u64, DataBuf), RequestError> {
    let len: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::BadLength(len));
    }
    if segs.len() > limits.seg_max as usize {
        return Err(RequestError::TooManySegments(segs.len()));
    }
    if let Some(s) = segs.iter().find(|s| s.len > limits.size_max) {
        return Err(RequestError::SegmentTooLarge(s.len));
    }
    if len > limits.max_bytes.min(MAX_REQUEST_BYTES) {
        return Err(RequestError::TooLong(len));
    }
    let sectors = len >> SECTOR_SHIFT;
    check_range(sector, sectors, limits.capacity_sectors)?;
    let offset = sector << SECTOR_SHIFT; // sector <= capacity < 2^55: no overflow.
    let mut iov = IoVecs::new();
    for s in &segs {
        // One region holds the whole segment (nearly always): one lookup. Otherwise walk the
        // regions it spans, which also finds the first unmapped byte.
        if let Ok(slice) = mem.get_slice(s.addr, s.len as usize) {
            if iov.len() == MAX_IOVECS {
                return Err(RequestError::TooManySegments(iov.len() + 1));
            }
            iov.push(IoVec { ptr: slice.ptr_guard_mut().as_ptr(), len: slice.len() });
            continue;
        }
        for piece in GuestMemoryBackend::get_slices(mem, s.addr, s.len as usize) {
            let slice = piece.map_err(|_| RequestError::BadAddress { addr: s.addr.raw_value(), len: u64::from(s.len) })?;
            if iov.len() == MAX_IOVECS {
                return Err(RequestError::TooManySegments(iov.len() + 1));
            }
            iov.push(IoVec { ptr: slice.ptr_guard_mut().as_ptr(), len: slice.len() });
        }
    }
    Ok((offset, DataBuf { segs, iov, len }))
}

fn check_range(sector: u64, sectors: u64, capacity: u64) -> Result<(), RequestError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange { sector, sectors, capacity }),
    }
}

/// Parse and validate DISCARD / WRITE_ZEROES segments (`struct virtio_blk_discard_write_zeroes`:
/// le64 sector, le32 num_sectors, le32 flags).
fn parse_dwz<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    discard: bool,
    payload: &[GuestSeg],
    limits: &RequestLimits,
) -> Result<BlkOp, RequestError> {
    let (max_seg, max_sectors) = if discard {
        (limits.max_discard_seg, limits.max_discard_sectors)
    } else {
        (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
    };
    let total: u64 = payload.iter().map(|s| u64::from(s.len)).sum();
    if total == 0 || !total.is_multiple_of(DWZ_SEGMENT_LEN) {
        return Err(RequestError::BadSegmentPayload(total));
    }
    let count = total / DWZ_SEGMENT_LEN;
    if count > u64::from(max_seg) {
        return Err(RequestError::TooManyDiscardSegments { count, max: max_seg });
    }
    let mut raw = vec![0u8; total as usize];
    read_stream(mem, payload, 0, &mut raw)?;
    let mut ranges = Vec::with_capacity(count as usize);
    for c in raw.chunks_exact(DWZ_SEGMENT_LEN as usize) {
        let sector = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let num = u32::from_le_bytes([c[8], c[9], c[10], c[11]]);
        let flags = u32::from_le_bytes([c[12], c[13], c[14], c[15]]);
        // Unknown flags are unsupported, and so is unmap on a discard (virtio 1.2 §5.2.6.2).
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && flags != 0) {
            return Err(RequestError::BadFlags(flags));
        }
        if num > max_sectors {
            return Err(RequestError::DiscardTooLarge { sectors: num, max: max_sectors });
        }
        check_range(sector, u64::from(num), limits.capacity_sectors)?;
        if num == 0 {
            continue;
        }
        let end = sector + u64::from(num);
        if discard {
            // Discard is advisory: keep the whole blocks inside the range.
            let first = sector.div_ceil(SECTORS_PER_BLOCK) * SECTORS_PER_BLOCK;
            let last = end / SECTORS_PER_BLOCK * SECTORS_PER_BLOCK;
            if last > first {
                ranges.push(ByteRange { offset: first << SECTOR_SHIFT, len: (last - first) << SECTOR_SHIFT });
            }
        } else {
            ranges.push(ByteRange { offset: sector << SECTOR_SHIFT, len: u64::from(num) << SECTOR_SHIFT });
        }
    }
    Ok(if discard { BlkOp::Discard(ranges) } else { BlkOp::WriteZeroes(ranges) })
}

/// The sub-stream `[skip, skip+len)` of a list of segments.
fn sub_stream(segs: &[GuestSeg], mut skip: u64, mut len: u64) -> Result<Segs, RequestError> {
    let mut out = Segs::new();
    for s in segs {
        if len == 0 {
            break;
        }
        let slen = u64::from(s.len);
        if skip >= slen {
            skip -= slen;
            continue;
        }
        let n = (slen - skip).min(len);
        let addr = s
            .addr
            .checked_add(skip)
            .ok_or(RequestError::BadAddress { addr: s.addr.raw_value(), len: slen })?;
        // n <= s.len, so it fits in u32.
        out.push(GuestSeg { addr, len: n as u32 });
        skip = 0;
        len -= n;
    }
    Ok(out)
}

/// Read `buf.len()` bytes of a segment stream starting at byte `skip`.
pub fn read_stream<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    segs: &[GuestSeg],
    skip: u64,
    buf: &mut [u8],
) -> Result<(), RequestError> {
    // The header of a request sits in its first descriptor (nearly always): read it from one
    // region without building the sub-stream.
    if let Some(first) = segs.first().filter(|f| skip == 0 && f.len as usize >= buf.len()) {
        if let Ok(slice) = mem.get_slice(first.addr, buf.len()) {
            slice.copy_to(buf);
            return Ok(());
        }
    }
    let mut done = 0usize;
    for s in sub_stream(segs, skip, buf.len() as u64)? {
        let n = s.len as usize;
        mem.read_slice(&mut buf[done..done + n], s.addr)
            .map_err(|_| RequestError::BadAddress { addr: s.addr.raw_value(), len: u64::from(s.len) })?;
        done += n;
    }
    if done != buf.len() {
        return Err(RequestError::ShortHeader(done as u64));
    }
    Ok(())
}

/// Write `data` into a segment stream from its start, up to the stream's length; returns the
/// bytes written.
pub fn write_stream<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    segs: &[GuestSeg],
    data: &[u8],
) -> Result<usize, RequestError> {
    let mut done = 0usize;
    for s in sub_stream(segs, 0, data.len() as u64)? {
        let n = s.len as usize;
        mem.write_slice(&data[done..done + n], s.addr)
            .map_err(|_| RequestError::BadAddress { addr: s.addr.raw_value(), len: u64::from(s.len) })?;
        done += n;
    }
    Ok(done)
}

/// The GET_ID answer for a volume name: its first 20 bytes, NUL-padded.
pub fn device_id(name: &str) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let n = name.len().min(ID_BYTES);
    id[..n].copy_from_slice(&name.as_bytes()[..n]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    type Mem = GuestMemoryMmap<()>;
    const MEM_SIZE: u64 = 0x100_0000;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const PAYLOAD: u64 = 0x38_0000;
    const INDIRECT: u64 = 0x40_0000;

    fn mem() -> Mem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    fn limits() -> RequestLimits {
        RequestLimits::new(64 << 20, false, 256)
    }

    fn header(m: &Mem, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    fn rd(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, 0, 0))
    }

    fn wr(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0))
    }

    fn parse_with(m: &Mem, descs: &[RawDescriptor], l: &RequestLimits) -> ParsedRequest {
        let q = MockSplitQueue::new(m, 256);
        let chain = q.build_desc_chain(descs).unwrap();
        parse_request(chain, l)
    }

    fn parse(m: &Mem, descs: &[RawDescriptor]) -> ParsedRequest {
        parse_with(m, descs, &limits())
    }

    fn status(p: &ParsedRequest) -> u8 {
        match &p.op {
            Ok(_) => STATUS_OK,
            Err(e) => e.status(),
        }
    }

    fn segments(m: &Mem, segs: &[(u64, u32, u32)]) -> u32 {
        let mut raw = Vec::new();
        for &(sector, num, flags) in segs {
            raw.extend_from_slice(&sector.to_le_bytes());
            raw.extend_from_slice(&num.to_le_bytes());
            raw.extend_from_slice(&flags.to_le_bytes());
        }
        m.write_slice(&raw, GuestAddress(PAYLOAD)).unwrap();
        raw.len() as u32
    }

    #[test]
    fn good_in() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 8);
        let p = parse(&m, &[rd(HDR, 16), wr(DATA, 4096), wr(DATA + 0x1000, 4096), wr(STATUS, 1)]);
        assert_eq!(p.req_type, Some(VIRTIO_BLK_T_IN));
        assert_eq!(p.status_addr, Some(GuestAddress(STATUS)));
        assert_eq!(p.writable_len, 8193);
        assert_eq!(status(&p), STATUS_OK);
        let Ok(BlkOp::Read { offset, buf }) = p.op else { panic!("not a read: {:?}", p.op) };
        assert_eq!(offset, 4096);
        assert_eq!(buf.len, 8192);
        assert_eq!(buf.segs.len(), 2);
        assert_eq!(buf.iov.len(), 2);
        let host = m.get_host_address(GuestAddress(DATA)).unwrap();
        assert_eq!(buf.iov[0].ptr, host);
        assert_eq!(buf.iov[0].len, 4096);
    }

    #[test]
    fn good_out() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 16);
        let p = parse(&m, &[rd(HDR, 16), rd(DATA, 8192), wr(STATUS, 1)]);
        assert_eq!(p.writable_len, 1);
        let Ok(BlkOp::Write { offset, buf }) = p.op else { panic!("not a write: {:?}", p.op) };
        assert_eq!(offset, 16 * 512);
        assert_eq!(buf.len, 8192);
    }

    #[test]
    fn any_layout_header_and_data_share_descriptors() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        // Header split in two, the second descriptor continues with 4096 bytes of data.
        let data_after_hdr = HDR + 16;
        let p = parse(&m, &[rd(HDR, 8), rd(HDR + 8, 8 + 4096), wr(STATUS, 1)]);
        let Ok(BlkOp::Write { buf, .. }) = p.op else { panic!("{:?}", p.op) };
        assert_eq!(buf.segs.as_slice(), [GuestSeg { addr: GuestAddress(data_after_hdr), len: 4096 }]);
        // A read whose data and status share one writable descriptor.
        header(&m, VIRTIO_BLK_T_IN, 0);
        let p = parse(&m, &[rd(HDR, 16), wr(DATA, 4097)]);
        assert_eq!(p.status_addr, Some(GuestAddress(DATA + 4096)));
        let Ok(BlkOp::Read { buf, .. }) = p.op else { panic!("{:?}", p.op) };
        assert_eq!(buf.len, 4096);
    }

    #[test]
    fn indirect_chain() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let table = [rd(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)];
        for (i, d) in table.iter().enumerate() {
            let mut d = Descriptor::from(*d);
            if i + 1 < table.len() {
                d.set_flags(d.flags() | virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16);
                d.set_next(i as u16 + 1);
            }
            m.write_obj(RawDescriptor::from(d), GuestAddress(INDIRECT + 16 * i as u64)).unwrap();
        }
        let head = RawDescriptor::from(Descriptor::new(INDIRECT, 48, VRING_DESC_F_INDIRECT as u16, 0));
        let p = parse(&m, &[head]);
        assert!(matches!(p.op, Ok(BlkOp::Read { .. })), "{:?}", p.op);
        assert_eq!(p.status_addr, Some(GuestAddress(STATUS)));
    }

    #[test]
    fn good_flush() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let p = parse(&m, &[rd(HDR, 16), wr(STATUS, 1)]);
        assert!(matches!(p.op, Ok(BlkOp::Flush)));
    }

    #[test]
    fn good_get_id() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let p = parse(&m, &[rd(HDR, 16), wr(DATA, 20), wr(STATUS, 1)]);
        assert_eq!(p.writable_len, 21);
        let Ok(BlkOp::GetId { segs }) = p.op else { panic!("{:?}", p.op) };
        let id = device_id("vol-a");
        assert_eq!(write_stream(&m, &segs, &id).unwrap(), 20);
        let mut back = [0xffu8; 20];
        m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(&back[..5], b"vol-a");
        assert!(back[5..].iter().all(|&b| b == 0));
        // Long names are truncated to 20 bytes, short buffers get a prefix.
        assert_eq!(&device_id("abcdefghijklmnopqrstuvwxyz"), b"abcdefghijklmnopqrst");
        let short = [GuestSeg { addr: GuestAddress(DATA), len: 4 }];
        assert_eq!(write_stream(&m, &short, &id).unwrap(), 4);
    }

    #[test]
    fn good_discard_and_write_zeroes() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        // One aligned segment, one trimmed to whole blocks (sectors 9..31 -> 16..24), one
        // entirely inside a block (dropped).
        let n = segments(&m, &[(0, 16, 0), (9, 22, 0), (40, 3, 0)]);
        let p = parse(&m, &[rd(HDR, 16), rd(PAYLOAD, n), wr(STATUS, 1)]);
        let Ok(BlkOp::Discard(r)) = p.op else { panic!("{:?}", p.op) };
        assert_eq!(
            r,
            vec![ByteRange { offset: 0, len: 8192 }, ByteRange { offset: 16 * 512, len: 8 * 512 }]
        );

        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let n = segments(&m, &[(8, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), (64, 16, 0)]);
        let p = parse(&m, &[rd(HDR, 16), rd(PAYLOAD, n), wr(STATUS, 1)]);
        let Ok(BlkOp::WriteZeroes(r)) = p.op else { panic!("{:?}", p.op) };
        assert_eq!(r, vec![ByteRange { offset: 4096, len: 4096 }, ByteRange { offset: 64 * 512, len: 8192 }]);
    }

    #[test]
    fn discard_flags_and_limits() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        // Unmap on a discard: UNSUPP.
        let n = segments(&m, &[(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]);
        let p = parse(&m, &[rd(HDR, 16), rd(PAYLOAD, n), wr(STATUS, 1)]);
        assert_eq!(p.op.as_ref().unwrap_err(), &RequestError::BadFlags(1));
        assert_eq!(status(&p), STATUS_UNSUPP);
        // Unknown flag on write-zeroes: UNSUPP.
        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let n = segments(&m, &[(0, 8, 2)]);
        let p = parse(&m, &[rd(HDR, 16), rd(PAYLOAD, n), wr(STATUS, 1)]);
        assert_eq!(status(&p), STATUS_UNSUPP);
        // Too many segments: UNSUPP.
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        let segs: Vec<(u64, u32, u32)> = (0..17).map(|i| (i * 8, 8, 0)).collect();
        let n = segments(&m, &segs);
        let p = parse(&m, &[rd(HDR, 16), rd(PAYLOAD, n), wr(STATUS, 1)]);
        assert_eq!(p.op.as_ref().unwrap_err(), &RequestError::TooManyDiscardSegments { count: 17, max: 16 });
        assert_eq!(status(&p), STATUS_UNSUPP);
        // Too many sectors in a segment, out of range, payload not a multiple of 16: IOERR.
        let n = segments(&m, &[(0, MAX_DISCARD_SECTORS_FOR_TEST + 8, 0)]);
        let p = parse(&m, &[rd(HDR, 16), rd(PAYLOAD, n), wr(STATUS, 1)]);
        assert!(matches!(p.op, Err(RequestError::DiscardTooLarge { .. })));
        assert_eq!(status(&p), STATUS_IOERR);
        let n = segments(&m, &[((64 << 20) / 512 - 8, 16, 0)]);
        let p = parse(&m, &[rd(HDR, 16), rd(PAYLOAD, n), wr(STATUS, 1)]);
        assert!(matches!(p.op, Err(RequestError::OutOfRange { .. })));
        let p = parse(&m, &[rd(HDR, 16), rd(PAYLOAD, 15), wr(STATUS, 1)]);
        assert!(matches!(p.op, Err(RequestError::BadSegmentPayload(15))));
        let p = parse(&m, &[rd(HDR, 16), wr(STATUS, 1)]);
        assert!(matches!(p.op, Err(RequestError::BadSegmentPayload(0))));
        // Sector-granular write-zeroes is valid (the engine zeroes partial blocks).
        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let n = segments(&m, &[(1, 8, 0)]);
        let p = parse(&m, &[rd(HDR, 16), rd(PAYLOAD, n), wr(STATUS, 1)]);
        match &p.op {
            Ok(BlkOp::WriteZeroes(r)) => assert_eq!(r, &vec![ByteRange { offset: 512, len: 4096 }]),
            other => panic!("{other:?}"),
        }
        // Device-writable data on a discard.
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        let n = segments(&m, &[(0, 8, 0)]);
        let p = parse(&m, &[rd(HDR, 16), rd(PAYLOAD, n), wr(DATA, 512), wr(STATUS, 1)]);
        assert!(matches!(p.op, Err(RequestError::WrongDirection(_))));
    }

    const MAX_DISCARD_SECTORS_FOR_TEST: u32 = crate::config::MAX_DISCARD_SECTORS;

    #[test]
    fn no_status_descriptor() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let p = parse(&m, &[rd(HDR, 16), rd(DATA, 4096)]);
        assert_eq!(p.status_addr, None);
        assert_eq!(p.op.as_ref().unwrap_err(), &RequestError::NoStatus);
        // A status descriptor outside guest memory is as good as none.
        let p = parse(&m, &[rd(HDR, 16), wr(MEM_SIZE + 0x1000, 1)]);
        assert_eq!(p.status_addr, None);
        // Zero-length writable descriptors do not count.
        let p = parse(&m, &[rd(HDR, 16), wr(STATUS, 0)]);
        assert_eq!(p.status_addr, None);
    }

    #[test]
    fn short_header() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let p = parse(&m, &[rd(HDR, 8), wr(DATA, 4096), wr(STATUS, 1)]);
        assert_eq!(p.op.as_ref().unwrap_err(), &RequestError::ShortHeader(8));
        assert_eq!(status(&p), STATUS_IOERR);
        assert_eq!(p.status_addr, Some(GuestAddress(STATUS)));
        // No readable part at all.
        let p = parse(&m, &[wr(STATUS, 1)]);
        assert_eq!(p.op.as_ref().unwrap_err(), &RequestError::ShortHeader(0));
        // Header outside guest memory.
        let p = parse(&m, &[rd(MEM_SIZE - 8, 16), wr(STATUS, 1)]);
        assert!(matches!(p.op, Err(RequestError::BadAddress { .. })));
    }

    #[test]
    fn out_of_range_sector() {
        let m = mem();
        let cap = (64u64 << 20) / 512;
        header(&m, VIRTIO_BLK_T_IN, cap - 8);
        let p = parse(&m, &[rd(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)]);
        assert_eq!(status(&p), STATUS_OK);
        header(&m, VIRTIO_BLK_T_IN, cap);
        let p = parse(&m, &[rd(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)]);
        assert!(matches!(p.op, Err(RequestError::OutOfRange { .. })));
        assert_eq!(status(&p), STATUS_IOERR);
        header(&m, VIRTIO_BLK_T_OUT, u64::MAX - 1);
        let p = parse(&m, &[rd(HDR, 16), rd(DATA, 4096), wr(STATUS, 1)]);
        assert!(matches!(p.op, Err(RequestError::OutOfRange { .. })));
    }

    #[test]
    fn wrong_direction() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let p = parse(&m, &[rd(HDR, 16), rd(DATA, 4096), wr(STATUS, 1)]);
        assert_eq!(p.op.as_ref().unwrap_err(), &RequestError::WrongDirection(VIRTIO_BLK_T_IN));
        assert_eq!(status(&p), STATUS_IOERR);
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let p = parse(&m, &[rd(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)]);
        assert_eq!(p.op.as_ref().unwrap_err(), &RequestError::WrongDirection(VIRTIO_BLK_T_OUT));
        // Readable after writable.
        let p = parse(&m, &[rd(HDR, 16), wr(DATA, 4096), rd(DATA + 0x1000, 16), wr(STATUS, 1)]);
        assert_eq!(p.op.as_ref().unwrap_err(), &RequestError::BadLayout);
    }

    #[test]
    fn bad_lengths_alignment_and_segments() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let p = parse(&m, &[rd(HDR, 16), wr(DATA, 100), wr(STATUS, 1)]);
        assert_eq!(p.op.as_ref().unwrap_err(), &RequestError::BadLength(100));
        // Sector granularity is valid: 512 bytes, and 4 KiB at sector 1.
        let p = parse(&m, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
        assert!(p.op.is_ok(), "{:?}", p.op);
        header(&m, VIRTIO_BLK_T_IN, 1);
        let p = parse(&m, &[rd(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)]);
        assert!(p.op.is_ok(), "{:?}", p.op);
        // Data outside guest memory.
        header(&m, VIRTIO_BLK_T_IN, 0);
        let p = parse(&m, &[rd(HDR, 16), wr(MEM_SIZE - 2048, 4096), wr(STATUS, 1)]);
        assert!(matches!(p.op, Err(RequestError::BadAddress { .. })));
        assert_eq!(status(&p), STATUS_IOERR);
        // Segment larger than size_max, more segments than seg_max.
        let mut l = limits();
        l.size_max = 4096;
        let p = parse_with(&m, &[rd(HDR, 16), wr(DATA, 8192), wr(STATUS, 1)], &l);
        assert_eq!(p.op.as_ref().unwrap_err(), &RequestError::SegmentTooLarge(8192));
        l = limits();
        l.seg_max = 2;
        let d: Vec<RawDescriptor> = std::iter::once(rd(HDR, 16))
            .chain((0..3).map(|i| wr(DATA + i * 4096, 4096)))
            .chain(std::iter::once(wr(STATUS, 1)))
            .collect();
        let p = parse_with(&m, &d, &l);
        assert_eq!(p.op.as_ref().unwrap_err(), &RequestError::TooManySegments(3));
        // Without SIZE_MAX and SEG_MAX negotiated (OVMF) neither binds: one segment larger
        // than size_max, and more segments than seg_max, are taken.
        let mut l = limits();
        l.size_max = 4096;
        l.seg_max = 2;
        let n = l.negotiated(0);
        assert_eq!(n.max_bytes, 254 << 20, "seg_max × size_max of a 256-entry queue");
        let p = parse_with(&m, &[rd(HDR, 16), wr(DATA, 8192), wr(STATUS, 1)], &n);
        assert!(p.op.is_ok(), "{:?}", p.op);
        let p = parse_with(&m, &d, &n);
        assert!(p.op.is_ok(), "{:?}", p.op);
        // ... but they do when negotiated, and nothing else changes.
        use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX};
        assert_eq!(l.negotiated((1 << VIRTIO_BLK_F_SIZE_MAX) | (1 << VIRTIO_BLK_F_SEG_MAX)), l);
        assert_eq!(n, RequestLimits { size_max: 1 << 30, seg_max: MAX_IOVECS as u32, ..l });
        // A request over seg_max × size_max is refused whatever was negotiated (checked before
        // its buffers are: these segments are not guest memory).
        let mut big = limits().negotiated(0);
        big.capacity_sectors = 4 << 21;
        let p = parse_with(&m, &[rd(HDR, 16), wr(DATA, 254 << 20), wr(DATA, 4096), wr(STATUS, 1)], &big);
        assert_eq!(p.op.as_ref().unwrap_err(), &RequestError::TooLong((254 << 20) + 4096));
        assert_eq!(status(&p), STATUS_IOERR);
        let p = parse_with(&m, &[rd(HDR, 16), wr(DATA, 254 << 20), wr(STATUS, 1)], &big);
        assert!(matches!(p.op, Err(RequestError::BadAddress { .. })), "{:?}", p.op);
        big.max_bytes = u64::MAX;
        let p = parse_with(&m, &[rd(HDR, 16), wr(DATA, 1 << 30), wr(DATA, 4096), wr(STATUS, 1)], &big);
        assert_eq!(p.op.as_ref().unwrap_err(), &RequestError::TooLong((1 << 30) + 4096), "1 GiB at most, always");
        // Far more descriptors than seg_max: refused, but the status is still found.
        let d: Vec<RawDescriptor> = std::iter::once(rd(HDR, 16))
            .chain((0..20).map(|i| wr(DATA + i * 512, 512)))
            .chain(std::iter::once(wr(STATUS, 1)))
            .collect();
        let p = parse_with(&m, &d, &l);
        assert!(matches!(p.op, Err(RequestError::TooManyDescriptors(_))));
        assert_eq!(p.status_addr, Some(GuestAddress(STATUS)));
    }

    #[test]
    fn unsupported_and_read_only() {
        let m = mem();
        for t in [2u32, 10, 14, 15, 16, 0x8000_0000] {
            header(&m, t, 0);
            let p = parse(&m, &[rd(HDR, 16), wr(STATUS, 1)]);
            assert_eq!(p.op.as_ref().unwrap_err(), &RequestError::Unsupported(t));
            assert_eq!(status(&p), STATUS_UNSUPP);
        }
        let mut l = limits();
        l.read_only = true;
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let p = parse_with(&m, &[rd(HDR, 16), rd(DATA, 4096), wr(STATUS, 1)], &l);
        assert_eq!(p.op.as_ref().unwrap_err(), &RequestError::ReadOnly);
        assert_eq!(status(&p), STATUS_IOERR);
        header(&m, VIRTIO_BLK_T_IN, 0);
        let p = parse_with(&m, &[rd(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)], &l);
        assert!(p.op.is_ok());
    }

    #[test]
    fn zero_length_read_is_valid() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let p = parse(&m, &[rd(HDR, 16), wr(STATUS, 1)]);
        let Ok(BlkOp::Read { buf, .. }) = p.op else { panic!("{:?}", p.op) };
        assert_eq!(buf.len, 0);
    }

    #[test]
    fn parse_descriptors_without_a_queue() {
        // The fuzzing entry point: arbitrary descriptors, including overflowing addresses.
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let descs = [
            Descriptor::new(HDR, 16, 0, 0),
            Descriptor::new(u64::MAX - 10, u32::MAX, VRING_DESC_F_WRITE as u16, 0),
            Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        let p = parse_descriptors(&m, 7, descs, &limits());
        assert_eq!(p.head, 7);
        assert!(p.op.is_err());
        let descs = [Descriptor::new(u64::MAX, u32::MAX, VRING_DESC_F_WRITE as u16, 0)];
        let p = parse_descriptors(&m, 0, descs, &limits());
        assert_eq!(p.status_addr, None);
    }
}
