//! `virtio_request`: guest memory and a descriptor chain built from fuzz bytes, parsed by
//! `vblk_vhost::request` — either directly through `parse_descriptors` (any descriptor list,
//! flags and addresses as given) or through a real split virtqueue in guest memory, so that
//! virtio-queue's chain walker resolves NEXT links and INDIRECT tables (which the fuzzer writes
//! anywhere in guest memory) before `parse_request`.
//!
//! Input format (little-endian, see [`Input::decode`]):
//! ```text
//! u8 flags        bit0 queue mode, bit1 read-only, bit2 custom limits
//! u8 nregions     1 + n % 3 guest memory regions, each: u16 first page, u8 pages (1 + p % 16)
//! limits          custom: u64 capacity_sectors, u8 seg_max, u32 size_max,
//!                         u8 max_discard_seg, u32 max_discard_sectors, u8 max_wz_seg, u32 max_wz_sectors
//!                 else:   u64 volume size in bytes, u16 queue size (RequestLimits::new)
//! u16 head
//! u8 ndescs       each: u8 region, u64 addr, u32 len, u16 flags, u16 next
//! u8 nwrites      each: u8 region, u32 offset, u16 length + bytes   (guest memory contents)
//! ```
//! An address with `region < nregions` is relative to that region's start (wrapping), any other
//! region value means an absolute guest address. Writes outside guest memory are dropped.
//!
//! Properties checked on every input (besides "never panics"): the parser never writes guest
//! memory; `head` is passed through; `writable_len` is the saturated sum of the device-writable
//! lengths; `status_addr` is exactly the last byte of the last non-empty device-writable
//! descriptor when that byte is mapped and `None` otherwise (and then the request is refused with
//! `NoStatus`); layout, descriptor-count and header-length refusals happen exactly when they
//! should; the request type reported is the header's; and a valid request satisfies every limit:
//! sector-aligned, within capacity, seg_max/size_max, every data segment inside guest memory,
//! host iovecs inside the regions' mappings and covering exactly the data length, read data =
//! the writable stream minus the status byte, write data = the readable stream minus the header,
//! no writes, discards or write-zeroes on a read-only device, discard ranges whole 4 KiB blocks.
//! In queue mode the chain walked by virtio-queue must parse the same through `parse_request`
//! and `parse_descriptors`, and `request::chain_at` (the walker for chains resubmitted from the
//! inflight area) must yield the same descriptors.

use vblk_vhost::request::{
    self, parse_descriptors, parse_request, BlkOp, ParsedRequest, RequestError, RequestLimits, MAX_IOVECS,
    STATUS_IOERR, STATUS_UNSUPP,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::cursor::{Cursor, Writer};

type Mem = GuestMemoryMmap<()>;

const PAGE: u64 = 4096;
const MAX_REGIONS: usize = 3;
const MAX_REGION_PAGES: u64 = 16;
/// Queue mode needs the descriptor table, avail and used rings (queue size <= 256) in region 0.
const QUEUE_MIN_PAGES: u64 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub first_page: u16,
    pub pages: u8,
}

impl Region {
    pub fn base(&self) -> u64 {
        u64::from(self.first_page) * PAGE
    }
    pub fn len(&self, queue_mode: bool, index: usize) -> u64 {
        let p = 1 + u64::from(self.pages) % MAX_REGION_PAGES;
        if queue_mode && index == 0 {
            p.max(QUEUE_MIN_PAGES) * PAGE
        } else {
            p * PAGE
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limits {
    /// `RequestLimits::new(size_bytes, read_only, queue_size)`, as the device uses.
    Device { size_bytes: u64, queue_size: u16 },
    Custom {
        capacity_sectors: u64,
        seg_max: u8,
        size_max: u32,
        max_discard_seg: u8,
        max_discard_sectors: u32,
        max_wz_seg: u8,
        max_wz_sectors: u32,
    },
}

/// A descriptor as encoded in the input: `region` selects the base its address is relative to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub region: u8,
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemWrite {
    pub region: u8,
    pub offset: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub queue_mode: bool,
    pub read_only: bool,
    pub regions: Vec<Region>,
    pub limits: Limits,
    pub head: u16,
    pub descs: Vec<Desc>,
    pub writes: Vec<MemWrite>,
}

impl Input {
    pub fn decode(data: &[u8]) -> Input {
        let mut c = Cursor::new(data);
        let flags = c.u8();
        let nregions = 1 + c.u8() as usize % MAX_REGIONS;
        let regions = (0..nregions).map(|_| Region { first_page: c.u16(), pages: c.u8() }).collect();
        let limits = if flags & 4 != 0 {
            Limits::Custom {
                capacity_sectors: c.u64(),
                seg_max: c.u8(),
                size_max: c.u32(),
                max_discard_seg: c.u8(),
                max_discard_sectors: c.u32(),
                max_wz_seg: c.u8(),
                max_wz_sectors: c.u32(),
            }
        } else {
            Limits::Device { size_bytes: c.u64(), queue_size: c.u16() }
        };
        let head = c.u16();
        let ndescs = c.u8();
        let descs = (0..ndescs)
            .map(|_| Desc { region: c.u8(), addr: c.u64(), len: c.u32(), flags: c.u16(), next: c.u16() })
            .collect();
        let nwrites = c.u8();
        let writes =
            (0..nwrites).map(|_| MemWrite { region: c.u8(), offset: c.u32(), data: c.bytes16().to_vec() }).collect();
        Input { queue_mode: flags & 1 != 0, read_only: flags & 2 != 0, regions, limits, head, descs, writes }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        let custom = matches!(self.limits, Limits::Custom { .. });
        w.u8(u8::from(self.queue_mode) | u8::from(self.read_only) << 1 | u8::from(custom) << 2);
        assert!((1..=MAX_REGIONS).contains(&self.regions.len()));
        w.u8(self.regions.len() as u8 - 1);
        for r in &self.regions {
            w.u16(r.first_page).u8(r.pages);
        }
        match self.limits {
            Limits::Custom {
                capacity_sectors,
                seg_max,
                size_max,
                max_discard_seg,
                max_discard_sectors,
                max_wz_seg,
                max_wz_sectors,
            } => {
                w.u64(capacity_sectors)
                    .u8(seg_max)
                    .u32(size_max)
                    .u8(max_discard_seg)
                    .u32(max_discard_sectors)
                    .u8(max_wz_seg)
                    .u32(max_wz_sectors);
            }
            Limits::Device { size_bytes, queue_size } => {
                w.u64(size_bytes).u16(queue_size);
            }
        }
        w.u16(self.head);
        w.u8(u8::try_from(self.descs.len()).expect("at most 255 descriptors"));
        for d in &self.descs {
            w.u8(d.region).u64(d.addr).u32(d.len).u16(d.flags).u16(d.next);
        }
        w.u8(u8::try_from(self.writes.len()).expect("at most 255 writes"));
        for m in &self.writes {
            w.u8(m.region).u32(m.offset).bytes16(&m.data);
        }
        w.finish()
    }

    fn request_limits(&self) -> RequestLimits {
        match self.limits {
            Limits::Device { size_bytes, queue_size } => RequestLimits::new(size_bytes, self.read_only, queue_size),
            Limits::Custom {
                capacity_sectors,
                seg_max,
                size_max,
                max_discard_seg,
                max_discard_sectors,
                max_wz_seg,
                max_wz_sectors,
            } => RequestLimits {
                capacity_sectors,
                read_only: self.read_only,
                seg_max: u32::from(seg_max),
                size_max,
                max_discard_seg: u32::from(max_discard_seg),
                max_discard_sectors,
                max_write_zeroes_seg: u32::from(max_wz_seg),
                max_write_zeroes_sectors: max_wz_sectors,
                max_bytes: request::MAX_REQUEST_BYTES,
            },
        }
    }

    fn addr(&self, region: u8, v: u64) -> u64 {
        match self.regions.get(region as usize) {
            Some(r) => r.base().wrapping_add(v),
            None => v,
        }
    }

    fn descriptor(&self, d: &Desc) -> Descriptor {
        Descriptor::new(self.addr(d.region, d.addr), d.len, d.flags, d.next)
    }
}

/// Guest memory with the input's regions, or None if they overlap or do not fit.
fn build_memory(inp: &Input) -> Option<Mem> {
    let mut ranges: Vec<(GuestAddress, usize)> = inp
        .regions
        .iter()
        .enumerate()
        .map(|(i, r)| (GuestAddress(r.base()), r.len(inp.queue_mode, i) as usize))
        .collect();
    ranges.sort_by_key(|r| r.0);
    // Mem::from_ranges refuses overlapping regions itself; sorting is our job.
    let mem = Mem::from_ranges(&ranges).ok()?;
    for w in &inp.writes {
        let a = inp.addr(w.region, u64::from(w.offset));
        let _ = mem.write_slice(&w.data, GuestAddress(a));
    }
    Some(mem)
}

/// Every region's bytes (the parser must not change any of them).
fn snapshot(mem: &Mem) -> Vec<Vec<u8>> {
    mem.iter()
        .map(|r| {
            let mut v = vec![0u8; r.len() as usize];
            mem.read_slice(&mut v, r.start_addr()).expect("a region reads whole");
            v
        })
        .collect()
}

pub fn run(data: &[u8]) {
    let inp = Input::decode(data);
    if crate::verbose() {
        eprintln!("{inp:#?}");
    }
    let Some(mem) = build_memory(&inp) else { return };
    let limits = inp.request_limits();
    if inp.queue_mode {
        run_queue(&inp, &mem, &limits);
    } else {
        let descs: Vec<Descriptor> = inp.descs.iter().map(|d| inp.descriptor(d)).collect();
        let before = snapshot(&mem);
        let p = parse_descriptors(&mem, inp.head, descs.iter().copied(), &limits);
        assert!(snapshot(&mem) == before, "the parser wrote guest memory");
        check(&mem, inp.head, &descs, &limits, &p);
        answer_get_id(&mem, &p);
    }
}

/// Queue mode: the input's descriptors are the queue's descriptor table (at the start of
/// region 0, followed by the avail and used rings); the avail ring offers `head`.
fn run_queue(inp: &Input, mem: &Mem, limits: &RequestLimits) {
    let Some(r0) = inp.regions.first() else { return };
    let qsize = (inp.descs.len().max(1)).next_power_of_two().min(256) as u16;
    let table = r0.base();
    let avail = table + 16 * u64::from(qsize);
    let used = (avail + 6 + 2 * u64::from(qsize)).next_multiple_of(4);
    for (i, d) in inp.descs.iter().enumerate().take(qsize as usize) {
        let raw = inp.descriptor(d);
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&raw.addr().raw_value().to_le_bytes());
        b[8..12].copy_from_slice(&raw.len().to_le_bytes());
        b[12..14].copy_from_slice(&raw.flags().to_le_bytes());
        b[14..16].copy_from_slice(&raw.next().to_le_bytes());
        mem.write_slice(&b, GuestAddress(table + 16 * i as u64)).expect("table fits in region 0");
    }
    // avail: flags 0, idx 1, ring[0] = head. used: zero.
    let mut a = vec![0u8; 6 + 2 * qsize as usize];
    a[2..4].copy_from_slice(&1u16.to_le_bytes());
    a[4..6].copy_from_slice(&(inp.head % qsize).to_le_bytes());
    mem.write_slice(&a, GuestAddress(avail)).expect("avail ring fits in region 0");
    mem.write_slice(&vec![0u8; 6 + 8 * qsize as usize], GuestAddress(used)).expect("used ring fits in region 0");

    let Ok(mut q) = Queue::new(qsize) else { return };
    q.set_size(qsize);
    q.set_desc_table_address(Some(table as u32), Some((table >> 32) as u32));
    q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    q.set_ready(true);
    assert!(q.is_valid(mem), "queue at {table:#x} size {qsize} should be valid");
    let Some(chain) = q.pop_descriptor_chain(mem) else { return };
    let head = chain.head_index();
    assert_eq!(head, inp.head % qsize);
    let descs: Vec<Descriptor> = chain.clone().collect();
    // The walker for chains resubmitted from the inflight area must walk exactly as
    // virtio-queue's does.
    let key = |d: &Descriptor| (d.addr().raw_value(), d.len(), d.flags(), d.next());
    let walked: Vec<_> = request::chain_at(mem, GuestAddress(table), qsize, head).iter().map(key).collect();
    assert_eq!(walked, descs.iter().map(key).collect::<Vec<_>>(), "chain_at and virtio-queue walk differently");
    let before = snapshot(mem);
    let p = parse_request(chain, limits);
    assert!(snapshot(mem) == before, "the parser wrote guest memory");
    let direct = parse_descriptors(mem, head, descs.iter().copied(), limits);
    assert_eq!(format!("{p:?}"), format!("{direct:?}"), "parse_request and parse_descriptors disagree");
    check(mem, head, &descs, limits, &p);
    answer_get_id(mem, &p);
}

/// What the device does with a GET_ID: write the 20-byte id into the data segments.
fn answer_get_id(mem: &Mem, p: &ParsedRequest) {
    if let Ok(BlkOp::GetId { segs }) = &p.op {
        let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
        if let Ok(n) = request::write_stream(mem, segs, &request::device_id("fuzz-volume-name")) {
            assert_eq!(n as u64, total.min(request::ID_BYTES as u64));
        }
    }
}

/// The first `n` bytes of a segment stream, read independently of the parser.
fn read_prefix(mem: &Mem, segs: &[(u64, u32)], n: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(n);
    for &(addr, len) in segs {
        if out.len() == n {
            break;
        }
        let k = (n - out.len()).min(len as usize);
        let mut b = vec![0u8; k];
        mem.read_slice(&mut b, GuestAddress(addr)).ok()?;
        out.extend_from_slice(&b);
    }
    (out.len() == n).then_some(out)
}

fn in_host_mappings(mem: &Mem, ptr: *mut u8, len: usize) -> bool {
    let p = ptr as usize;
    mem.iter().any(|r| {
        let Ok(base) = mem.get_host_address(r.start_addr()) else { return false };
        let b = base as usize;
        p >= b && p.checked_add(len).is_some_and(|e| e <= b + r.len() as usize)
    })
}

fn check(mem: &Mem, head: u16, descs: &[Descriptor], limits: &RequestLimits, p: &ParsedRequest) {
    assert_eq!(p.head, head);
    let nonempty: Vec<&Descriptor> = descs.iter().filter(|d| d.len() != 0).collect();
    let is_w = |d: &Descriptor| d.flags() & VRING_DESC_F_WRITE as u16 != 0;
    let writable_total: u64 = nonempty.iter().filter(|d| is_w(d)).map(|d| u64::from(d.len())).sum();
    let readable: Vec<(u64, u32)> =
        nonempty.iter().filter(|d| !is_w(d)).map(|d| (d.addr().raw_value(), d.len())).collect();
    let readable_total: u64 = readable.iter().map(|r| u64::from(r.1)).sum();
    assert_eq!(u64::from(p.writable_len), writable_total.min(u64::from(u32::MAX)), "writable_len");

    // The status byte: the last byte of the last non-empty writable descriptor, if mapped.
    let expect_status = nonempty
        .iter()
        .rev()
        .find(|d| is_w(d))
        .and_then(|d| d.addr().checked_add(u64::from(d.len()) - 1))
        .filter(|a| mem.address_in_range(*a));
    assert_eq!(p.status_addr, expect_status, "status address");
    if let Some(a) = p.status_addr {
        assert!(mem.address_in_range(a));
    }
    if let Err(e) = &p.op {
        let s = e.status();
        assert!(s == STATUS_IOERR || s == STATUS_UNSUPP, "status {s} for {e:?}");
    }
    if p.status_addr.is_none() {
        assert_eq!(p.op.as_ref().err(), Some(&RequestError::NoStatus));
        assert_eq!(p.req_type, None);
        return;
    }
    let bad_layout = {
        let mut seen_w = false;
        let mut bad = false;
        for d in &nonempty {
            if is_w(d) {
                seen_w = true;
            } else if seen_w {
                bad = true;
            }
        }
        bad
    };
    if bad_layout {
        assert_eq!(p.op.as_ref().err(), Some(&RequestError::BadLayout));
        return;
    }
    let max_descs = limits.seg_max as usize + 4;
    if nonempty.len() > max_descs {
        assert_eq!(p.op.as_ref().err(), Some(&RequestError::TooManyDescriptors(max_descs)));
        return;
    }
    assert_ne!(p.op.as_ref().err(), Some(&RequestError::TooManyDescriptors(max_descs)));
    if readable_total < request::HEADER_LEN {
        assert_eq!(p.op.as_ref().err(), Some(&RequestError::ShortHeader(readable_total)));
        return;
    }
    let Some(hdr) = read_prefix(mem, &readable, request::HEADER_LEN as usize) else {
        assert!(matches!(p.op, Err(RequestError::BadAddress { .. })), "unreadable header: {:?}", p.op);
        assert_eq!(p.req_type, None);
        return;
    };
    let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
    assert_eq!(p.req_type, Some(req_type));
    let cap_bytes = u128::from(limits.capacity_sectors) * 512;
    let Ok(op) = &p.op else { return };
    match op {
        BlkOp::Read { offset, buf } | BlkOp::Write { offset, buf } => {
            let write = matches!(op, BlkOp::Write { .. });
            assert_eq!(req_type, if write { VIRTIO_BLK_T_OUT } else { VIRTIO_BLK_T_IN });
            assert!(!(write && limits.read_only), "write accepted on a read-only device");
            assert_eq!(*offset, sector * 512, "offset");
            let seg_sum: u64 = buf.segs.iter().map(|s| u64::from(s.len)).sum();
            assert_eq!(seg_sum, buf.len);
            if write {
                assert_eq!(buf.len, readable_total - request::HEADER_LEN, "write data = readable stream - header");
            } else {
                assert_eq!(buf.len, writable_total - 1, "read data = writable stream - status");
            }
            assert_eq!(buf.len % 512, 0);
            assert!(u128::from(*offset) + u128::from(buf.len) <= cap_bytes, "beyond capacity");
            assert!(buf.segs.len() <= limits.seg_max as usize, "seg_max");
            assert!(buf.segs.iter().all(|s| s.len <= limits.size_max), "size_max");
            assert!(buf.len <= request::MAX_REQUEST_BYTES && buf.len <= limits.max_bytes, "request over the device's limit");
            for s in &buf.segs {
                assert!(s.len > 0, "empty data segment");
                assert!(
                    GuestMemoryBackend::check_range(mem, s.addr, s.len as usize),
                    "segment {s:?} outside guest memory"
                );
            }
            assert!(buf.iov.len() <= MAX_IOVECS);
            let iov_sum: u64 = buf.iov.iter().map(|v| v.len as u64).sum();
            assert_eq!(iov_sum, buf.len, "iovecs cover the data exactly");
            for v in &buf.iov {
                assert!(in_host_mappings(mem, v.ptr, v.len), "iovec outside the guest memory mappings");
            }
        }
        BlkOp::Flush => assert_eq!(req_type, VIRTIO_BLK_T_FLUSH),
        BlkOp::GetId { segs } => {
            assert_eq!(req_type, VIRTIO_BLK_T_GET_ID);
            let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
            assert_eq!(total, writable_total - 1, "GET_ID data = writable stream - status");
        }
        BlkOp::Discard(ranges) | BlkOp::WriteZeroes(ranges) => {
            let discard = matches!(op, BlkOp::Discard(_));
            assert_eq!(req_type, if discard { VIRTIO_BLK_T_DISCARD } else { VIRTIO_BLK_T_WRITE_ZEROES });
            assert!(!limits.read_only, "discard/write-zeroes accepted on a read-only device");
            let (max_seg, max_sectors) = if discard {
                (limits.max_discard_seg, limits.max_discard_sectors)
            } else {
                (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
            };
            assert!(ranges.len() as u64 <= u64::from(max_seg));
            assert_eq!((readable_total - request::HEADER_LEN) % request::DWZ_SEGMENT_LEN, 0);
            for r in ranges {
                assert!(r.len > 0, "empty range kept");
                assert_eq!(r.offset % 512, 0);
                assert_eq!(r.len % 512, 0);
                assert!(u128::from(r.offset) + u128::from(r.len) <= cap_bytes, "range beyond capacity");
                assert!(r.len <= u64::from(max_sectors) * 512, "range longer than the maximum");
                if discard {
                    assert_eq!(r.offset % 4096, 0, "discard trimmed to whole blocks");
                    assert_eq!(r.len % 4096, 0, "discard trimmed to whole blocks");
                }
            }
        }
    }
}

/// Seeds: well-formed requests of every type, direct and through a queue (one with an indirect
/// table), and a few malformed ones.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    const HDR: u64 = 0x100;
    const DATA: u64 = 0x1000;
    const STATUS: u64 = 0x800;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;
    let header = |t: u32, sector: u64| {
        let mut h = vec![0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        MemWrite { region: 1, offset: HDR as u32, data: h }
    };
    // Region 0 (queue area) at 0, 2 pages; region 1 (requests) at 64 KiB, 16 pages
    // (1 + 15); region 2 right after it, so that a segment can span two regions.
    let regions = vec![
        Region { first_page: 0, pages: 1 },
        Region { first_page: 16, pages: 15 },
        Region { first_page: 32, pages: 3 },
    ];
    let d = |addr: u64, len: u32, flags: u16, next: u16| Desc { region: 1, addr, len, flags, next };
    let base = |descs: Vec<Desc>, writes: Vec<MemWrite>| Input {
        queue_mode: false,
        read_only: false,
        regions: regions.clone(),
        limits: Limits::Device { size_bytes: 64 << 20, queue_size: 256 },
        head: 0,
        descs,
        writes,
    };
    let seg = |sector: u64, num: u32, flags: u32| {
        let mut b = sector.to_le_bytes().to_vec();
        b.extend_from_slice(&num.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b
    };
    let mut out = vec![(
        "in-2seg",
        base(
            vec![d(HDR, 16, N, 1), d(DATA, 4096, W | N, 2), d(DATA + 4096, 4096, W | N, 3), d(STATUS, 1, W, 0)],
            vec![header(VIRTIO_BLK_T_IN, 8)],
        ),
    )];
    out.push((
        "out",
        base(vec![d(HDR, 16, N, 1), d(DATA, 8192, N, 2), d(STATUS, 1, W, 0)], vec![header(VIRTIO_BLK_T_OUT, 16)]),
    ));
    out.push(("flush", base(vec![d(HDR, 16, N, 1), d(STATUS, 1, W, 0)], vec![header(VIRTIO_BLK_T_FLUSH, 0)])));
    out.push((
        "get-id",
        base(vec![d(HDR, 16, N, 1), d(DATA, 20, W | N, 2), d(STATUS, 1, W, 0)], vec![header(VIRTIO_BLK_T_GET_ID, 0)]),
    ));
    let mut payload = seg(0, 16, 0);
    payload.extend(seg(9, 22, 0));
    let mut disc = base(
        vec![d(HDR, 16, N, 1), d(0x400, 32, N, 2), d(STATUS, 1, W, 0)],
        vec![header(VIRTIO_BLK_T_DISCARD, 0), MemWrite { region: 1, offset: 0x400, data: payload }],
    );
    out.push(("discard", disc.clone()));
    disc.writes = vec![header(VIRTIO_BLK_T_WRITE_ZEROES, 0), MemWrite { region: 1, offset: 0x400, data: seg(8, 8, 1) }];
    disc.descs[1].len = 16;
    out.push(("write-zeroes", disc));
    // Header split across descriptors, data and status sharing one.
    out.push((
        "any-layout",
        base(vec![d(HDR, 8, N, 1), d(HDR + 8, 8, N, 2), d(DATA, 4097, W, 0)], vec![header(VIRTIO_BLK_T_IN, 0)]),
    ));
    // A read whose buffer spans the boundary between regions 1 and 2.
    let span = base(
        vec![d(HDR, 16, N, 1), d(15 * 4096, 8192, W | N, 2), d(STATUS, 1, W, 0)],
        vec![header(VIRTIO_BLK_T_IN, 0)],
    );
    out.push(("span-regions", span));
    // Malformed: no status, status outside memory, readable after writable, short header.
    out.push(("no-status", base(vec![d(HDR, 16, N, 1), d(DATA, 4096, N, 0)], vec![header(VIRTIO_BLK_T_IN, 0)])));
    out.push((
        "status-unmapped",
        base(
            vec![d(HDR, 16, N, 1), Desc { region: 9, addr: 1 << 40, len: 1, flags: W, next: 0 }],
            vec![header(VIRTIO_BLK_T_IN, 0)],
        ),
    ));
    out.push((
        "bad-layout",
        base(
            vec![d(HDR, 16, N, 1), d(DATA, 512, W | N, 2), d(DATA + 4096, 16, N, 3), d(STATUS, 1, W, 0)],
            vec![header(VIRTIO_BLK_T_IN, 0)],
        ),
    ));
    out.push(("short-header", base(vec![d(HDR, 8, N, 1), d(STATUS, 1, W, 0)], vec![header(VIRTIO_BLK_T_IN, 0)])));
    let mut ro =
        base(vec![d(HDR, 16, N, 1), d(DATA, 4096, N, 2), d(STATUS, 1, W, 0)], vec![header(VIRTIO_BLK_T_OUT, 0)]);
    ro.read_only = true;
    out.push(("read-only-write", ro));
    let mut custom = base(
        vec![d(HDR, 16, N, 1), d(DATA, 512, W | N, 2), d(DATA + 512, 512, W | N, 3), d(STATUS, 1, W, 0)],
        vec![header(VIRTIO_BLK_T_IN, 1)],
    );
    custom.limits = Limits::Custom {
        capacity_sectors: 4,
        seg_max: 1,
        size_max: 512,
        max_discard_seg: 1,
        max_discard_sectors: 8,
        max_wz_seg: 1,
        max_wz_sectors: 8,
    };
    out.push(("custom-limits", custom));
    // Queue mode: a NEXT chain in the queue's own table, and an indirect table in region 1.
    let mut q =
        base(vec![d(HDR, 16, N, 1), d(DATA, 4096, W | N, 2), d(STATUS, 1, W, 0)], vec![header(VIRTIO_BLK_T_IN, 0)]);
    q.queue_mode = true;
    q.regions[0].pages = 1;
    out.push(("queue-chain", q.clone()));
    let table: Vec<u8> = [(HDR, 16u32, N, 1u16), (DATA, 4096, W | N, 2), (STATUS, 1, W, 0)]
        .iter()
        .flat_map(|&(a, l, f, n)| {
            let mut b = (regions[1].base() + a).to_le_bytes().to_vec();
            b.extend_from_slice(&l.to_le_bytes());
            b.extend_from_slice(&f.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
            b
        })
        .collect();
    q.descs = vec![d(0x3000, 48, VRING_DESC_F_INDIRECT as u16, 0)];
    q.writes.push(MemWrite { region: 1, offset: 0x3000, data: table });
    out.push(("queue-indirect", q));
    out.into_iter().map(|(n, i)| (n, i.encode())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_decode_to_what_was_encoded_and_parse_as_intended() {
        for (name, bytes) in seeds() {
            let inp = Input::decode(&bytes);
            assert_eq!(inp.encode(), bytes, "{name}");
            let mem = build_memory(&inp).unwrap_or_else(|| panic!("{name}: memory"));
            let limits = inp.request_limits();
            let descs: Vec<Descriptor> = inp.descs.iter().map(|d| inp.descriptor(d)).collect();
            if !inp.queue_mode {
                let p = parse_descriptors(&mem, inp.head, descs, &limits);
                let ok = p.op.is_ok();
                let want_ok = !matches!(
                    name,
                    "no-status"
                        | "status-unmapped"
                        | "bad-layout"
                        | "short-header"
                        | "read-only-write"
                        | "custom-limits"
                );
                assert_eq!(ok, want_ok, "{name}: {:?}", p.op);
            }
            run(&bytes);
        }
    }
}
