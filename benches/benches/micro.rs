//! Criterion micro benchmarks of hot pieces: crc32c of a block, map entry and superblock
//! codecs, allocation, AES-256-GCM encryption and decryption of a block (encrypted volumes).

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use vblk_engine::alloc::Allocator;
use vblk_engine::crypt::{Key, VolCrypt};
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
