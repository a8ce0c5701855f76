//! Criterion micro benchmarks of hot pieces: crc32c of a block, map entry and superblock
//! codecs, allocation, map-cache lookup, virtio-blk request parsing, AES-256-GCM encryption and
//! decryption of a block (encrypted volumes).

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use vblk_engine::alloc::Allocator;
use vblk_engine::bench_support::MapTable;
use vblk_engine::crypt::{Key, VolCrypt};
use vblk_vhost::request::{parse_descriptors, RequestLimits};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vblk_engine::format::{map_key, MapEntry, Superblock};

fn benches(c: &mut Criterion) {
    let block = vec![0x5au8; 4096];
    c.bench_function("crc32c 4 KiB", |b| b.iter(|| crc32c::crc32c(black_box(&block))));
    let vc = VolCrypt::new(5, &Key([7; 32])).unwrap();
    let mut buf = block.clone();
    c.bench_function("encrypt 4 KiB block (AES-256-GCM)", |b| {
        b.iter(|| vc.encrypt_block(black_box([1; 12]), black_box(42), black_box(&mut buf)))
    });
    let mut ct = block.clone();
    let seal = vc.encrypt_block([1; 12], 42, &mut ct);
    c.bench_function("decrypt+verify 4 KiB block (AES-256-GCM)", |b| {
        b.iter(|| {
            let mut x = ct.clone();
            assert!(vc.decrypt_block(black_box(&seal), 42, &mut x));
            x
        })
    });
    let k = map_key(7, 123_456);
    let e = MapEntry::new(987_654, 3);
    let v = e.encode(&k);
    c.bench_function("map entry encode", |b| b.iter(|| black_box(e).encode(black_box(&k))));
    c.bench_function("map entry decode", |b| b.iter(|| MapEntry::decode(black_box(&k), black_box(&v))));
    let sb = Superblock {
        version: 1,
        incompat: 0,
        compat: 0,
        autoclear: 0,
        uuid: [1; 16],
        block_size: 4096,
        data_start: 1 << 20,
        total_blocks: 1 << 20,
        created_ns: 0,
    };
    let sbb = sb.encode();
    // The map cache of a volume with 1M cached blocks (lbas 0, 3, 6, ...): lookups of random
    // lbas, half of them cached, as a random 4 KiB read does one.
    let table = MapTable::with_entries(1 << 20, 3);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    c.bench_function("map cache lookup (1M entries, random lba)", |b| {
        b.iter(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            table.get(black_box(x % (3 << 20)))
        })
    });
    // A 4 KiB read request as a driver lays it out: header, data, status.
    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mut hdr = [0u8; 16];
    hdr[8..16].copy_from_slice(&8u64.to_le_bytes());
    mem.write_slice(&hdr, GuestAddress(0x1000)).unwrap();
    let next = VRING_DESC_F_NEXT as u16;
    let wr = VRING_DESC_F_WRITE as u16;
    let descs = [Descriptor::new(0x1000, 16, next, 1), Descriptor::new(0x2000, 4096, wr | next, 2), Descriptor::new(0x3000, 1, wr, 0)];
    let limits = RequestLimits::new(1 << 30, false, 256);
    c.bench_function("virtio-blk request parse (4 KiB read, 3 descriptors)", |b| {
        b.iter(|| parse_descriptors(&mem, 0, black_box(descs), &limits))
    });
    c.bench_function("superblock decode", |b| b.iter(|| Superblock::decode(black_box(&sbb))));
    c.bench_function("allocate+release 1 block (1M-block pool, half full)", |b| {
        let mut a = Allocator::new(1 << 20);
        for i in 0..(1 << 19) {
            a.alloc_one(Some(i));
        }
        b.iter(|| {
            let p = a.alloc_one(None).unwrap();
            a.release(black_box(p));
        })
    });
}

criterion_group!(g, benches);
criterion_main!(g);
