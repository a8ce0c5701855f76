//! Encryption at rest (FORMAT.md §11): AES-256-GCM per 4 KiB block under a per-family data key,
//! data keys wrapped under the pool's master key, nonces from one pool-wide counter reserved
//! in chunks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use aes_gcm::aead::inout::InOutBuf;
use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};

use crate::error::{Error, Result};
use std::sync::Arc;

use rocksdb::WriteBatch;

use crate::format::{incompat, key_key, parse_key_key, KeyRecord, NonceRecord, Seal, NONCE_CHUNK, NONCE_KEY};

/// Length of the master key and of data keys.
pub const KEY_LEN: usize = 32;

/// A 256-bit key. Zeroed when dropped.
#[derive(Clone)]
pub struct Key(pub [u8; KEY_LEN]);

impl Drop for Key {
    fn drop(&mut self) {
        // SAFETY: writes KEY_LEN bytes inside our own array; volatile so it is not elided.
        unsafe { std::ptr::write_volatile(&mut self.0, [0u8; KEY_LEN]) };
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Random bytes from the kernel.
pub(crate) fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    let mut got = 0;
    while got < N {
        // SAFETY: writes at most N - got bytes into the rest of our buffer.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().add(got) as *mut libc::c_void, N - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Crypto(format!("getrandom: {e}")));
        }
        got += n as usize;
    }
    Ok(b)
}

fn wrap_aad(uuid: &[u8; 16], id: u64, family: u64) -> [u8; 40] {
    let mut a = [0u8; 40];
    a[..8].copy_from_slice(b"vblk-key");
    a[8..24].copy_from_slice(uuid);
    a[24..32].copy_from_slice(&id.to_le_bytes());
    a[32..].copy_from_slice(&family.to_le_bytes());
    a
}

/// Wrap `dek` under `master` for key record `id` of `family` (FORMAT.md §11.1).
pub(crate) fn wrap(master: &Key, uuid: &[u8; 16], id: u64, family: u64, dek: &Key) -> Result<KeyRecord> {
    let c = Aes256Gcm::new_from_slice(&master.0).map_err(|_| Error::Crypto("master key length".into()))?;
    let nonce = random::<12>()?;
    let mut wrapped = dek.0;
    let tag = c
        .encrypt_inout_detached(&Nonce::from(nonce), &wrap_aad(uuid, id, family), InOutBuf::from(&mut wrapped[..]))
        .map_err(|_| Error::Crypto("key wrap failed".into()))?;
    Ok(KeyRecord { family, nonce, wrapped, tag: tag.into() })
}

/// Unwrap key record `id`; `None` if the master key does not authenticate it.
pub(crate) fn unwrap(master: &Key, uuid: &[u8; 16], id: u64, r: &KeyRecord) -> Option<Key> {
    let c = Aes256Gcm::new_from_slice(&master.0).ok()?;
    let mut k = Key(r.wrapped);
    c.decrypt_inout_detached(&Nonce::from(r.nonce), &wrap_aad(uuid, id, r.family), InOutBuf::from(&mut k.0[..]), &Tag::from(r.tag))
        .ok()?;
    Some(k)
}

/// The cipher of one volume family.
pub struct VolCrypt {
    pub(crate) family: u64,
    cipher: Aes256Gcm,
    /// The data key itself, to wrap it for clones.
    pub(crate) dek: Option<Key>,
}

impl std::fmt::Debug for VolCrypt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VolCrypt {{ family: {} }}", self.family)
    }
}

fn block_aad(family: u64, lba: u64) -> [u8; 24] {
    let mut a = [0u8; 24];
    a[..8].copy_from_slice(b"vblk-blk");
    a[8..16].copy_from_slice(&family.to_le_bytes());
    a[16..].copy_from_slice(&lba.to_le_bytes());
    a
}

impl VolCrypt {
    pub fn new(family: u64, dek: &Key) -> Result<VolCrypt> {
        let cipher = Aes256Gcm::new_from_slice(&dek.0).map_err(|_| Error::Crypto("data key length".into()))?;
        Ok(VolCrypt { family, cipher, dek: None })
    }

    pub(crate) fn with_key(mut self, dek: Key) -> VolCrypt {
        self.dek = Some(dek);
        self
    }

    /// Encrypt one block of `lba` in place under `nonce`; the seal to store with it.
    pub fn encrypt_block(&self, nonce: [u8; 12], lba: u64, buf: &mut [u8]) -> Seal {
        let tag = self
            .cipher
            .encrypt_inout_detached(&Nonce::from(nonce), &block_aad(self.family, lba), InOutBuf::from(buf))
            // Fails only for a buffer over GCM's 64 GiB limit; blocks are 4 KiB.
            .unwrap_or_default();
        Seal { nonce, tag: tag.into() }
    }

    /// Decrypt one block of `lba` in place; false (and `buf` unspecified) if it does not
    /// authenticate.
    pub fn decrypt_block(&self, seal: &Seal, lba: u64, buf: &mut [u8]) -> bool {
        self.cipher
            .decrypt_inout_detached(&Nonce::from(seal.nonce), &block_aad(self.family, lba), InOutBuf::from(buf), &Tag::from(seal.tag))
            .is_ok()
    }
}

/// The pool-wide nonce counter (FORMAT.md §11.2).
pub(crate) struct Nonces {
    salt: u32,
    next: AtomicU64,
    /// Values below this are reserved durably.
    limit: AtomicU64,
    extend: Mutex<()>,
}

impl Nonces {
    pub(crate) fn new(r: NonceRecord) -> Nonces {
        Nonces { salt: r.salt, next: AtomicU64::new(r.limit), limit: AtomicU64::new(r.limit), extend: Mutex::new(()) }
    }

    /// The next nonce; `persist` makes a new limit durable before values below it are used.
    pub(crate) fn next(&self, persist: impl Fn(NonceRecord) -> Result<()>) -> Result<[u8; 12]> {
        let v = self.next.fetch_add(1, Ordering::Relaxed);
        if v == u64::MAX {
            return Err(Error::Crypto("nonce counter exhausted".into()));
        }
        if v >= self.limit.load(Ordering::Acquire) {
            let _g = crate::pool::lock(&self.extend);
            let cur = self.limit.load(Ordering::Acquire);
            if v >= cur {
                let new = v.saturating_add(NONCE_CHUNK);
                persist(NonceRecord { salt: self.salt, limit: new })?;
                self.limit.store(new, Ordering::Release);
            }
        }
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.salt.to_le_bytes());
        n[4..].copy_from_slice(&v.to_le_bytes());
        Ok(n)
    }
}

impl crate::pool::Shared {
    /// The pool's current master key; `None` if it was opened without one (locked).
    fn master_key(&self) -> Option<Key> {
        crate::pool::lock(&self.master).clone()
    }

    /// The master key, for an operation that cannot do without it.
    fn need_master_key(&self) -> Result<Key> {
        self.master_key().ok_or_else(no_master_key)
    }

    /// At open: check the master key, load the nonce counter and give every encrypted volume
    /// its family's cipher.
    pub(crate) fn load_keys(&self) -> Result<()> {
        if let Some(v) = self.db.get_pinned(NONCE_KEY).map_err(Error::meta("get nonce record"))? {
            let r = NonceRecord::decode(&v)?;
            let _ = self.nonces.set(Nonces::new(r));
        }
        let Some(master) = self.master_key() else { return Ok(()) };
        let check = key_key(0);
        if let Some(v) = self.db.get_pinned(&check).map_err(Error::meta("get key record"))? {
            let r = KeyRecord::decode(&check, &v)?;
            if unwrap(&master, &self.sb.uuid, 0, &r).is_none() {
                return Err(Error::WrongKey);
            }
        }
        let vols: Vec<Arc<crate::volume::VolumeState>> = self.vols.read().map(|v| v.values().cloned().collect()).unwrap_or_default();
        let mut any = false;
        for v in vols {
            if v.encrypted.load(Ordering::Relaxed) {
                match self.volume_cipher(v.id) {
                    Ok(c) => {
                        let _ = v.crypt.set(c);
                        any = true;
                    }
                    // The master key passed the check record, so this volume's key record is
                    // damaged or missing: that volume stays locked, the others open.
                    Err(e) => tracing::error!(volume = %v.name(), error = %e, "cannot unwrap the volume's data key; it stays locked (run `vblk check`)"),
                }
            }
        }
        if any {
            // Warm the seal cache as the open-time scan warms the map cache: one sequential
            // pass instead of a RocksDB lookup on each block's first read. Only blocks in use:
            // a freed block keeps its stale seal until it is sealed again (§11.3), and those
            // would fill the cache.
            let alloc = crate::pool::lock(&self.alloc);
            let mut c = crate::pool::lock(&self.seal_cache);
            let prefix = [crate::format::key::SEAL];
            for item in self.db.iterator(rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward)) {
                let (k, v) = item.map_err(Error::meta("scan seals"))?;
                let Some(pba) = crate::format::parse_seal_key(&k) else { break };
                if c.len() >= self.seal_cache_cap {
                    break;
                }
                if !alloc.is_used(pba) {
                    continue;
                }
                // A damaged record is reported by `check` and by the read that needs it.
                if let Ok(s) = Seal::decode(&k, &v) {
                    c.insert(pba, s);
                }
            }
        }
        Ok(())
    }

    /// Unwrap volume `id`'s key record.
    pub(crate) fn volume_cipher(&self, id: u64) -> Result<Arc<VolCrypt>> {
        let Some(master) = self.master_key() else { return Err(Error::Crypto("the pool is locked (no master key)".into())) };
        let k = key_key(id);
        let v = self.db.get_pinned(&k).map_err(Error::meta("get key record"))?.ok_or_else(|| Error::Corrupt {
            location: crate::error::Location::Record(k.clone()),
            what: format!("encrypted volume {id} has no key record"),
        })?;
        let r = KeyRecord::decode(&k, &v)?;
        let dek = unwrap(&master, &self.sb.uuid, id, &r).ok_or(Error::WrongKey)?;
        Ok(Arc::new(VolCrypt::new(r.family, &dek)?.with_key(dek)))
    }

    /// Before the first encrypted volume: set `incompat::ENCRYPTION` in the superblock
    /// (synced), and add the master-key check and the nonce record to `b` if missing.
    pub(crate) fn prepare_encryption(&self, b: &mut WriteBatch) -> Result<Option<NonceRecord>> {
        let master = self.need_master_key()?;
        if !self.encryption_on.load(Ordering::Acquire) {
            let mut sb = self.sb.clone();
            sb.incompat |= incompat::ENCRYPTION;
            crate::pool::write_sb(&self.data, &self.path, &sb)?;
            self.encryption_on.store(true, Ordering::Release);
        }
        // Key records already there without a check record or a nonce record mean damaged
        // metadata: a new check record would bless whatever key was given, a new nonce record
        // would restart the counter under existing keys.
        let has_keys = {
            let mut it = self.db.raw_iterator();
            it.seek(key_key(1));
            it.key().and_then(parse_key_key).is_some()
        };
        let check = key_key(0);
        if self.db.get_pinned(&check).map_err(Error::meta("get key record"))?.is_none() {
            if has_keys {
                return Err(Error::Corrupt {
                    location: crate::error::Location::Record(check),
                    what: "the master-key check record is missing while volume keys exist".into(),
                });
            }
            b.put(&check, wrap(&master, &self.sb.uuid, 0, 0, &Key([0; KEY_LEN]))?.encode(0));
        }
        if self.nonces.get().is_none() {
            if has_keys {
                return Err(Error::Corrupt {
                    location: crate::error::Location::Record(NONCE_KEY.to_vec()),
                    what: "the nonce record is missing while volume keys exist".into(),
                });
            }
            let r = NonceRecord { salt: u32::from_le_bytes(random::<4>()?), limit: 0 };
            b.put(NONCE_KEY, r.encode());
            return Ok(Some(r));
        }
        Ok(None)
    }

    /// After the batch of `prepare_encryption` is durable.
    pub(crate) fn encryption_prepared(&self, b_had_nonce: Option<NonceRecord>) {
        if let Some(r) = b_had_nonce {
            let _ = self.nonces.set(Nonces::new(r));
        }
    }

    /// A key record for volume `id` of `family` holding `dek`.
    pub(crate) fn wrap_for(&self, id: u64, family: u64, dek: &Key) -> Result<Vec<u8>> {
        Ok(wrap(&self.need_master_key()?, &self.sb.uuid, id, family, dek)?.encode(id))
    }
}

fn no_master_key() -> Error {
    Error::Crypto("the pool was opened without a master key".into())
}

impl crate::pool::Pool {
    /// Re-wrap every key record under `new` in one synced batch (FORMAT.md §11.1); no data
    /// is rewritten. The pool must have been opened with the current master key. The caller
    /// opens the pool with `new` from then on.
    pub fn rotate_master_key(&self, new: &Key) -> Result<u64> {
        let sh = &self.shared;
        let mut held = crate::pool::lock(&sh.master);
        let master = held.clone().ok_or_else(no_master_key)?;
        let _c = self.control();
        let mut b = WriteBatch::default();
        let mut n = 0;
        for item in sh.db.iterator(rocksdb::IteratorMode::From(&[crate::format::key::KEY], rocksdb::Direction::Forward)) {
            let (k, v) = item.map_err(Error::meta("scan key records"))?;
            let Some(id) = parse_key_key(&k) else { break };
            let r = KeyRecord::decode(&k, &v)?;
            let dek = unwrap(&master, &sh.sb.uuid, id, &r).ok_or(Error::WrongKey)?;
            b.put(&k, wrap(new, &sh.sb.uuid, id, r.family, &dek)?.encode(id));
            n += 1;
        }
        let _m = crate::pool::lock(&sh.meta);
        sh.write_meta(b)?;
        // From now on new key records are wrapped under the new key.
        *held = Some(new.clone());
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_and_bind_family_lba_and_seal() {
        let k = Key([9u8; 32]);
        let c = VolCrypt::new(7, &k).unwrap();
        let plain: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let mut b = plain.clone();
        let s = c.encrypt_block([1; 12], 42, &mut b);
        assert_ne!(b, plain);
        let mut d = b.clone();
        assert!(c.decrypt_block(&s, 42, &mut d));
        assert_eq!(d, plain);
        // Another lba, another family, a flipped bit, another nonce: refused.
        assert!(!c.decrypt_block(&s, 43, &mut b.clone()));
        assert!(!VolCrypt::new(8, &k).unwrap().decrypt_block(&s, 42, &mut b.clone()));
        let mut f = b.clone();
        f[100] ^= 1;
        assert!(!c.decrypt_block(&s, 42, &mut f));
        assert!(!c.decrypt_block(&Seal { nonce: [2; 12], tag: s.tag }, 42, &mut b.clone()));
    }

    #[test]
    fn wrapped_keys_unwrap_only_with_their_master_pool_id_and_family() {
        let m = Key([1; 32]);
        let dek = Key([5; 32]);
        let u = [3u8; 16];
        let r = wrap(&m, &u, 10, 4, &dek).unwrap();
        assert_eq!(unwrap(&m, &u, 10, &r).unwrap().0, dek.0);
        assert!(unwrap(&Key([2; 32]), &u, 10, &r).is_none());
        assert!(unwrap(&m, &[4u8; 16], 10, &r).is_none());
        assert!(unwrap(&m, &u, 11, &r).is_none());
        assert!(unwrap(&m, &u, 10, &KeyRecord { family: 5, ..r.clone() }).is_none());
    }

    #[test]
    fn nonces_never_repeat_across_a_restart_and_reserve_before_use() {
        let stored = std::sync::Mutex::new(NonceRecord { salt: 77, limit: 0 });
        let persist = |r: NonceRecord| {
            *stored.lock().unwrap() = r;
            Ok(())
        };
        let n = Nonces::new(*stored.lock().unwrap());
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let x = n.next(persist).unwrap();
            assert_eq!(&x[..4], &77u32.to_le_bytes());
            let v = u64::from_le_bytes(x[4..].try_into().unwrap());
            assert!(v < stored.lock().unwrap().limit, "used {v} before reserving it");
            assert!(seen.insert(x));
        }
        // A crash: the next process starts from the stored limit.
        let n2 = Nonces::new(*stored.lock().unwrap());
        for _ in 0..10 {
            assert!(seen.insert(n2.next(persist).unwrap()));
        }
        // A failing reservation fails the nonce instead of using an unreserved value.
        let n3 = Nonces::new(NonceRecord { salt: 1, limit: 5 });
        assert!(n3.next(|_| Err(Error::Crypto("disk".into()))).is_err());
    }
}
