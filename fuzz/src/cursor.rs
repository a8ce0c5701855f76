//! Reading and writing the targets' input formats.

/// Reads little-endian integers and byte strings from fuzz input. Reads past the end return
/// zeros (or a shorter slice), so every input decodes to something.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Cursor<'a> {
        Cursor { data, pos: 0 }
    }

    /// True when every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    /// At most `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = end;
        &self.data[start..end]
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(usize::MAX)
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }
    /// A byte string prefixed by its u8 length.
    pub fn bytes8(&mut self) -> &'a [u8] {
        let n = self.u8() as usize;
        self.bytes(n)
    }
    /// A byte string prefixed by its u16 length.
    pub fn bytes16(&mut self) -> &'a [u8] {
        let n = self.u16() as usize;
        self.bytes(n)
    }
}

/// Builds inputs in the format [`Cursor`] reads (seed generation, tests).
#[derive(Debug, Clone, Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn new() -> Writer {
        Writer(Vec::new())
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn bytes8(&mut self, b: &[u8]) -> &mut Self {
        assert!(b.len() <= u8::MAX as usize);
        self.u8(b.len() as u8).bytes(b)
    }
    pub fn bytes16(&mut self, b: &[u8]) -> &mut Self {
        assert!(b.len() <= u16::MAX as usize);
        self.u16(b.len() as u16).bytes(b)
    }
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_zero_fill() {
        let mut w = Writer::new();
        w.u8(1).u16(0x0203).u32(0x0405_0607).u64(u64::MAX).bytes8(b"abc").bytes16(b"de");
        let v = w.finish();
        let mut c = Cursor::new(&v);
        assert_eq!(c.u8(), 1);
        assert_eq!(c.u16(), 0x0203);
        assert_eq!(c.u32(), 0x0405_0607);
        assert_eq!(c.u64(), u64::MAX);
        assert_eq!(c.bytes8(), b"abc");
        assert_eq!(c.bytes16(), b"de");
        assert!(c.is_empty());
        assert_eq!(c.u64(), 0);
        assert_eq!(c.bytes(10), b"");
        let mut c = Cursor::new(&[1]);
        assert_eq!(c.u32(), 1);
    }
}
