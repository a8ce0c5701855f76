//! Feature bits and the virtio-blk configuration space (virtio 1.2 §5.2.4), as pure functions
//! so they can be unit-tested without a connection.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// virtio-blk addresses the disk in 512-byte sectors whatever the block size.
pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// The engine's block size (allocation unit). Advertised as the *physical* block size.
pub const BLOCK_SIZE: u32 = 4096;
/// The logical block size advertised in `blk_size`: 512, so that firmware that only knows
/// 512-byte sectors (SeaBIOS refuses other virtio-blk block sizes) can boot from a volume. The
/// topology fields tell the guest that 4 KiB is the physical block and the minimum efficient
/// I/O, so file systems and partitioning align to it; sub-4 KiB I/O works, just slower.
pub const LOGICAL_BLOCK_SIZE: u32 = 512;
/// `physical_block_exp`: physical block = logical block << 3 = 4096.
pub const PHYSICAL_BLOCK_EXP: u8 = 3;
/// `min_io_size`, in logical blocks (4096 bytes).
pub const MIN_IO_SIZE: u16 = 8;
/// Sectors per engine block.
pub const SECTORS_PER_BLOCK: u64 = BLOCK_SIZE as u64 / SECTOR_SIZE;
/// Largest single data segment (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest number of data segments the parser accepts whatever the queue size: keeps one
/// request within the kernel's IOV_MAX for readv/writev.
pub const SEG_MAX_CAP: u32 = 1022;
/// `max_discard_sectors` / `max_write_zeroes_sectors`: 32 MiB per segment.
pub const MAX_DISCARD_SECTORS: u32 = 65536;
pub const MAX_DISCARD_SEG: u32 = 16;
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 65536;
pub const MAX_WRITE_ZEROES_SEG: u32 = 16;
/// `discard_sector_alignment`, in sectors (one 4 KiB block).
pub const DISCARD_SECTOR_ALIGNMENT: u32 = SECTORS_PER_BLOCK as u32;

/// vhost-user: the backend supports VHOST_USER_GET/SET_PROTOCOL_FEATURES.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// vhost: the backend logs the guest pages it writes to while the frontend asks it to (live
/// migration; with vhost-user the log is shared memory, protocol feature LOG_SHMFD). QEMU
/// refuses to migrate a VM with a vhost device that does not offer it.
pub const VHOST_F_LOG_ALL: u32 = 26;

/// Byte offset of `writeback` (the only writable field) in the configuration space.
pub const WCE_OFFSET: u32 = 32;
/// Length of `struct virtio_blk_config` (virtio 1.2+, including the zoned fields).
pub const CONFIG_LEN: usize = 96;

/// Virtio feature bits the device offers.
pub fn device_features(read_only: bool) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1)
        | (1u64 << VIRTIO_RING_F_EVENT_IDX)
        | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1u64 << VIRTIO_BLK_F_SIZE_MAX)
        | (1u64 << VIRTIO_BLK_F_SEG_MAX)
        | (1u64 << VIRTIO_BLK_F_BLK_SIZE)
        | (1u64 << VIRTIO_BLK_F_TOPOLOGY)
        | (1u64 << VIRTIO_BLK_F_FLUSH)
        | (1u64 << VIRTIO_BLK_F_MQ)
        | (1u64 << VIRTIO_BLK_F_CONFIG_WCE)
        | (1u64 << VHOST_USER_F_PROTOCOL_FEATURES)
        | (1u64 << VHOST_F_LOG_ALL);
    if read_only {
        f |= 1u64 << VIRTIO_BLK_F_RO;
    } else {
        f |= (1u64 << VIRTIO_BLK_F_DISCARD) | (1u64 << VIRTIO_BLK_F_WRITE_ZEROES);
    }
    f
}

/// `seg_max` for a queue of `queue_size` descriptors (as QEMU: two descriptors go to the
/// header and the status), capped by [`SEG_MAX_CAP`].
pub fn seg_max_for(queue_size: u16) -> u32 {
    (u32::from(queue_size).saturating_sub(2)).clamp(1, SEG_MAX_CAP)
}

/// The values of the configuration space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    /// In 512-byte sectors.
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub num_queues: u16,
    /// 1 = writeback, 0 = writethrough.
    pub writeback: u8,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    /// The configuration of a volume of `size_bytes` served with these queue parameters.
    pub fn new(size_bytes: u64, num_queues: u16, queue_size: u16, writeback: bool) -> BlkConfig {
        BlkConfig {
            capacity: size_bytes >> SECTOR_SHIFT,
            size_max: SIZE_MAX,
            seg_max: seg_max_for(queue_size),
            blk_size: LOGICAL_BLOCK_SIZE,
            num_queues,
            writeback: u8::from(writeback),
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEG,
            discard_sector_alignment: DISCARD_SECTOR_ALIGNMENT,
            max_write_zeroes_sectors: MAX_WRITE_ZEROES_SECTORS,
            max_write_zeroes_seg: MAX_WRITE_ZEROES_SEG,
            write_zeroes_may_unmap: 1,
        }
    }

    /// Advertise a logical block of `blk_size` bytes (512 or 4096; an encrypted volume takes
    /// whole 4 KiB blocks only). Physical block and minimum I/O size stay 4 KiB.
    pub fn with_blk_size(mut self, blk_size: u32) -> BlkConfig {
        if blk_size == 4096 {
            self.blk_size = blk_size;
        }
        self
    }

    /// The little-endian layout of `struct virtio_blk_config`.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // 16..20: geometry (not offered).
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        // Topology: physical_block_exp = 3 (4 KiB physical blocks), alignment_offset = 0,
        // min_io_size = 8 logical blocks (4 KiB), opt_io_size = 0 (no preference).
        let (exp, min_io) = if self.blk_size == 4096 { (0, 1u16) } else { (PHYSICAL_BLOCK_EXP, MIN_IO_SIZE) };
        b[24] = exp;
        b[25] = 0;
        b[26..28].copy_from_slice(&min_io.to_le_bytes());
        b[28..32].copy_from_slice(&0u32.to_le_bytes());
        b[32] = self.writeback;
        // 33: unused.
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap;
        // 57..96: unused1, secure erase and zoned fields (not offered): zero.
        b
    }
}

/// Largest configuration-space access vhost-user allows (VHOST_USER_CONFIG_SIZE).
pub const MAX_CONFIG_ACCESS: u32 = 0x1000;

/// `size` bytes of the configuration space from `offset`: bytes past the structure read as
/// zero. An access that overflows or exceeds the vhost-user limit returns an empty vector (which
/// the vhost-user layer reports as a failed GET_CONFIG).
pub fn read_config(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let Some(end) = offset.checked_add(size) else { return Vec::new() };
    if size == 0 || end > MAX_CONFIG_ACCESS {
        return Vec::new();
    }
    let mut out = vec![0u8; size as usize];
    let start = offset as usize;
    if start < space.len() {
        let n = (space.len() - start).min(out.len());
        out[..n].copy_from_slice(&space[start..start + n]);
    }
    out
}

/// Why a configuration-space write was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigWriteError {
    #[error("only the 1-byte writeback field at offset 32 is writable (got offset {offset}, {len} bytes)")]
    ReadOnlyField { offset: u32, len: usize },
    #[error("writeback must be 0 or 1 (got {0})")]
    BadValue(u8),
    #[error("VIRTIO_BLK_F_CONFIG_WCE was not negotiated")]
    NotNegotiated,
}

/// Validate a configuration-space write: returns the new writeback value.
pub fn parse_config_write(offset: u32, buf: &[u8], wce_negotiated: bool) -> Result<u8, ConfigWriteError> {
    if offset != WCE_OFFSET || buf.len() != 1 {
        return Err(ConfigWriteError::ReadOnlyField { offset, len: buf.len() });
    }
    if !wce_negotiated {
        return Err(ConfigWriteError::NotNegotiated);
    }
    match buf[0] {
        v @ (0 | 1) => Ok(v),
        v => Err(ConfigWriteError::BadValue(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use virtio_bindings::virtio_blk::virtio_blk_config;

    fn cfg() -> BlkConfig {
        BlkConfig::new(64 << 20, 4, 256, true)
    }

    #[test]
    fn layout_matches_the_bindings() {
        assert_eq!(std::mem::size_of::<virtio_blk_config>(), CONFIG_LEN);
        assert_eq!(offset_of!(virtio_blk_config, wce), WCE_OFFSET as usize);
        assert_eq!(offset_of!(virtio_blk_config, num_queues), 34);
        assert_eq!(offset_of!(virtio_blk_config, max_discard_sectors), 36);
        assert_eq!(offset_of!(virtio_blk_config, write_zeroes_may_unmap), 56);
        let b = cfg().to_bytes();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), (64 << 20) / 512);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 512);
        assert_eq!(b[24], 3, "physical block 4096");
        assert_eq!(u16::from_le_bytes(b[26..28].try_into().unwrap()), 8);
        assert_eq!(b[32], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 8);
    }

    #[test]
    fn get_config_bounds() {
        let space = cfg().to_bytes();
        // Whole structure, and QEMU's usual request.
        assert_eq!(read_config(&space, 0, CONFIG_LEN as u32), space.to_vec());
        // A field.
        assert_eq!(read_config(&space, 34, 2), vec![4, 0]);
        // Straddling the end: the tail reads as zero.
        let v = read_config(&space, 90, 16);
        assert_eq!(v.len(), 16);
        assert!(v.iter().all(|&x| x == 0));
        // Entirely past the structure but within the vhost-user limit: zeros.
        assert_eq!(read_config(&space, 200, 4), vec![0; 4]);
        // Zero size, overflow, beyond the limit: empty (an error reply), never a panic.
        assert!(read_config(&space, 0, 0).is_empty());
        assert!(read_config(&space, u32::MAX, 2).is_empty());
        assert!(read_config(&space, 1, u32::MAX).is_empty());
        assert!(read_config(&space, 0, MAX_CONFIG_ACCESS + 1).is_empty());
        assert!(read_config(&space, MAX_CONFIG_ACCESS, 1).is_empty());
        assert_eq!(read_config(&space, MAX_CONFIG_ACCESS - 1, 1), vec![0]);
    }

    #[test]
    fn set_config_only_writeback() {
        assert_eq!(parse_config_write(WCE_OFFSET, &[0], true), Ok(0));
        assert_eq!(parse_config_write(WCE_OFFSET, &[1], true), Ok(1));
        assert!(parse_config_write(WCE_OFFSET, &[2], true).is_err());
        assert!(parse_config_write(WCE_OFFSET, &[1], false).is_err());
        assert!(parse_config_write(0, &[0; 8], true).is_err());
        assert!(parse_config_write(WCE_OFFSET, &[0, 0], true).is_err());
        assert!(parse_config_write(WCE_OFFSET, &[], true).is_err());
        assert!(parse_config_write(u32::MAX, &[0], true).is_err());
    }

    #[test]
    fn features() {
        let rw = device_features(false);
        let ro = device_features(true);
        assert_ne!(rw & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_ne!(rw & (1 << VIRTIO_F_VERSION_1), 0);
        assert_eq!(seg_max_for(2), 1);
        assert_eq!(seg_max_for(256), 254);
        assert_eq!(seg_max_for(32768), SEG_MAX_CAP);
    }
}
