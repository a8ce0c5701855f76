//! `config_space`: the virtio-blk configuration space as the vhost-user layer reaches it —
//! `read_config(space, offset, size)` for GET_CONFIG and `parse_config_write(offset, buf, wce)`
//! for SET_CONFIG — plus `BlkConfig::new(..).to_bytes()` and `device_features` for arbitrary
//! volume and queue parameters.
//!
//! Input format:
//! ```text
//! u8 kind       bit0: raw space (u8 length + bytes) instead of BlkConfig::new(u64 size,
//!               u16 num_queues, u16 queue_size, u8 writeback)
//! u32 offset, u32 size                      -> read_config
//! u32 offset, u8 wce, rest = buffer         -> parse_config_write
//! ```
//! Properties: `read_config` returns nothing exactly when the access is empty, overflows or ends
//! past `MAX_CONFIG_ACCESS`, and otherwise `size` bytes equal to the space where it exists and
//! zero past its end; `parse_config_write` accepts exactly a 1-byte write of 0 or 1 to the
//! writeback field with CONFIG_WCE negotiated, and returns that byte; the encoded space decodes
//! back to the values given (capacity = size / 512, seg_max within 1..=SEG_MAX_CAP, ...); the
//! feature bits follow read-only.

use vblk_vhost::config::{
    device_features, parse_config_write, read_config, seg_max_for, BlkConfig, CONFIG_LEN, MAX_CONFIG_ACCESS,
    SEG_MAX_CAP, WCE_OFFSET,
};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES};

use crate::cursor::{Cursor, Writer};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Space {
    Device { size_bytes: u64, num_queues: u16, queue_size: u16, writeback: bool },
    Raw(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub space: Space,
    pub read_offset: u32,
    pub read_size: u32,
    pub write_offset: u32,
    pub wce: bool,
    pub write_buf: Vec<u8>,
}

impl Input {
    pub fn decode(data: &[u8]) -> Input {
        let mut c = Cursor::new(data);
        let space = if c.u8() & 1 != 0 {
            Space::Raw(c.bytes8().to_vec())
        } else {
            Space::Device { size_bytes: c.u64(), num_queues: c.u16(), queue_size: c.u16(), writeback: c.bool() }
        };
        Input {
            space,
            read_offset: c.u32(),
            read_size: c.u32(),
            write_offset: c.u32(),
            wce: c.bool(),
            write_buf: c.rest().to_vec(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match &self.space {
            Space::Raw(b) => {
                w.u8(1).bytes8(b);
            }
            Space::Device { size_bytes, num_queues, queue_size, writeback } => {
                w.u8(0).u64(*size_bytes).u16(*num_queues).u16(*queue_size).u8(u8::from(*writeback));
            }
        }
        w.u32(self.read_offset).u32(self.read_size).u32(self.write_offset).u8(u8::from(self.wce));
        w.bytes(&self.write_buf);
        w.finish()
    }
}

pub fn run(data: &[u8]) {
    let inp = Input::decode(data);
    if crate::verbose() {
        eprintln!("{inp:#?}");
    }
    let space: Vec<u8> = match &inp.space {
        Space::Raw(b) => b.clone(),
        Space::Device { size_bytes, num_queues, queue_size, writeback } => {
            let cfg = BlkConfig::new(*size_bytes, *num_queues, *queue_size, *writeback);
            let b = cfg.to_bytes();
            assert_eq!(b.len(), CONFIG_LEN);
            let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
            let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
            assert_eq!(u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")), size_bytes >> 9, "capacity");
            let seg_max = u32_at(12);
            assert_eq!(seg_max, seg_max_for(*queue_size));
            assert!((1..=SEG_MAX_CAP).contains(&seg_max), "seg_max {seg_max}");
            assert!(
                u32::from(*queue_size) < 3 || seg_max <= u32::from(*queue_size) - 2,
                "seg_max leaves room for header and status"
            );
            assert_eq!(u32_at(20), 512, "blk_size");
            assert_eq!(b[WCE_OFFSET as usize], u8::from(*writeback));
            assert_eq!(u16_at(34), *num_queues);
            b.to_vec()
        }
    };

    let (off, size) = (inp.read_offset, inp.read_size);
    let out = read_config(&space, off, size);
    let refused = size == 0 || off.checked_add(size).is_none_or(|end| end > MAX_CONFIG_ACCESS);
    if refused {
        assert!(out.is_empty(), "read_config({off}, {size}) should be refused");
    } else {
        assert_eq!(out.len(), size as usize);
        for (i, &b) in out.iter().enumerate() {
            let want = space.get(off as usize + i).copied().unwrap_or(0);
            assert_eq!(b, want, "byte {} of read_config({off}, {size})", off as usize + i);
        }
    }

    let r = parse_config_write(inp.write_offset, &inp.write_buf, inp.wce);
    let valid = inp.write_offset == WCE_OFFSET && inp.write_buf.len() == 1 && inp.wce && inp.write_buf[0] <= 1;
    match r {
        Ok(v) => {
            assert!(valid, "accepted {inp:?}");
            assert_eq!(v, inp.write_buf[0]);
        }
        Err(e) => {
            assert!(!valid, "refused a valid writeback write: {e}");
            let _ = e.to_string();
        }
    }

    for ro in [false, true] {
        let f = device_features(ro);
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO) != 0, ro);
        assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD) != 0, !ro);
        assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0, !ro);
    }
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let dev = |size_bytes: u64| Space::Device { size_bytes, num_queues: 2, queue_size: 256, writeback: true };
    let inp = |space: Space, read_offset: u32, read_size: u32, write_offset: u32, wce: bool, buf: &[u8]| Input {
        space,
        read_offset,
        read_size,
        write_offset,
        wce,
        write_buf: buf.to_vec(),
    };
    vec![
        ("whole-space-set-wce", inp(dev(64 << 20), 0, CONFIG_LEN as u32, WCE_OFFSET, true, &[0])),
        ("field-num-queues", inp(dev(1 << 30), 34, 2, WCE_OFFSET, false, &[1])),
        ("straddle-end", inp(dev(4096), 90, 16, 0, true, &[0; 8])),
        ("at-limit", inp(dev(u64::MAX), MAX_CONFIG_ACCESS - 1, 1, WCE_OFFSET, true, &[2])),
        ("overflow", inp(Space::Raw(vec![0xaa; 40]), u32::MAX, 2, u32::MAX, true, &[1])),
    ]
    .into_iter()
    .map(|(n, i)| (n, i.encode()))
    .collect()
}
