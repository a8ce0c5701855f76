//! Criterion micro benchmarks of hot pieces: crc32c of a block, map entry and superblock
//! codecs, allocation.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use vblk_engine::alloc::Allocator;
use vblk_engine::format::{map_key, MapEntry, Superblock};

fn benches(c: &mut Criterion) {
    let block = vec![0x5au8; 4096];
    c.bench_function("crc32c 4 KiB", |b| b.iter(|| crc32c::crc32c(black_box(&block))));
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
