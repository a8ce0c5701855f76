//! The pool's master key (FORMAT.md §11.1): from a file, an environment variable or a
//! command's output, so that a KMS client can supply it.

use anyhow::{bail, Context, Result};
use vblk_engine::crypt::{Key, KEY_LEN};

use crate::cli_args::MasterKeyArgs;

/// Parse key material: exactly 32 raw bytes, or 64 hex digits (surrounding whitespace ignored).
pub fn parse_key(b: &[u8]) -> Result<Key> {
    let t = std::str::from_utf8(b).ok().map(str::trim);
    if let Some(hex) = t.filter(|h| h.len() == 2 * KEY_LEN && h.bytes().all(|c| c.is_ascii_hexdigit())) {
        let mut k = [0u8; KEY_LEN];
        for (i, out) in k.iter_mut().enumerate() {
            *out = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).context("hex digit")?;
        }
        return Ok(Key(k));
    }
    if b.len() == KEY_LEN {
        let mut k = [0u8; KEY_LEN];
        k.copy_from_slice(b);
        return Ok(Key(k));
    }
    bail!("a master key is 32 bytes: 32 raw bytes or 64 hex digits (got {} bytes)", b.len())
}

/// The master key the arguments name, if any.
pub fn master_key(a: &MasterKeyArgs) -> Result<Option<Key>> {
    if let Some(p) = &a.master_key_file {
        use std::os::unix::fs::PermissionsExt;
        let b = std::fs::read(p).with_context(|| format!("reading the master key file {}", p.display()))?;
        if let Ok(m) = std::fs::metadata(p) {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %p.display(), mode = format!("{:o}", m.permissions().mode() & 0o777), "the master key file is readable by other users; chmod 600 it");
            }
        }
        return parse_key(&b).with_context(|| format!("master key file {}", p.display())).map(Some);
    }
    if let Some(var) = &a.master_key_env {
        let v = std::env::var(var).with_context(|| format!("environment variable {var} (the master key)"))?;
        return parse_key(v.as_bytes()).with_context(|| format!("master key in ${var}")).map(Some);
    }
    if let Some(cmd) = &a.master_key_cmd {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running the master key command {cmd:?}"))?;
        if !out.status.success() {
            bail!("the master key command {cmd:?} failed ({})", out.status);
        }
        return parse_key(&out.stdout).with_context(|| format!("output of the master key command {cmd:?}")).map(Some);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_from_hex_or_raw_bytes_only() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF\n";
        let k = parse_key(hex.as_bytes()).unwrap();
        assert_eq!(k.0[1], 0x11);
        assert_eq!(k.0[31], 0xff);
        assert_eq!(parse_key(&[7u8; 32]).unwrap().0, [7u8; 32]);
        assert!(parse_key(b"short").is_err());
        assert!(parse_key(&[7u8; 33]).is_err());
        assert!(parse_key(&hex.as_bytes()[..62]).is_err());
    }

    #[test]
    fn key_sources() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("k");
        std::fs::write(&f, [3u8; 32]).unwrap();
        let a = MasterKeyArgs { master_key_file: Some(f), ..Default::default() };
        assert_eq!(master_key(&a).unwrap().unwrap().0, [3u8; 32]);
        let a = MasterKeyArgs { master_key_cmd: Some("printf '%064d' 0".into()), ..Default::default() };
        assert_eq!(master_key(&a).unwrap().unwrap().0, [0u8; 32]);
        let a = MasterKeyArgs { master_key_cmd: Some("exit 3".into()), ..Default::default() };
        assert!(master_key(&a).is_err());
        assert!(master_key(&MasterKeyArgs::default()).unwrap().is_none());
    }
}
