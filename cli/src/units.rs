//! Byte sizes as operators type and read them.
//!
//! Parsing follows qemu-img: units are binary (K = KiB = 1024), case-insensitive, with an optional
//! `iB`/`B` suffix; a bare number is bytes; a decimal fraction is accepted when the result is a
//! whole number of bytes ("1.5G", but not "0.1K").

/// Binary unit letters, in order: K = 2^10, M = 2^20, ...
const UNITS: [char; 6] = ['K', 'M', 'G', 'T', 'P', 'E'];

const HELP: &str = "use a number with an optional unit K, M, G, T or P (binary: 1K = 1024), \
                    optionally followed by iB or B, e.g. 512, 4K, 10G, 1.5TiB";

/// Parse a size such as `20G`, `512`, `4KiB`, `1.5T` into bytes.
pub fn parse_size(input: &str) -> Result<u64, String> {
    let s = input.trim();
    if s.is_empty() {
        return Err(format!("invalid size {input:?}: empty ({HELP})"));
    }
    let num_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = (&s[..num_end], s[num_end..].trim_start());
    if num.is_empty() {
        return Err(format!("invalid size {input:?}: no number ({HELP})"));
    }
    let shift = unit_shift(unit).ok_or_else(|| format!("invalid size {input:?}: unknown unit {unit:?} ({HELP})"))?;
    let (int_part, frac_part) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if frac_part.contains('.') || (int_part.is_empty() && frac_part.is_empty()) {
        return Err(format!("invalid size {input:?}: malformed number ({HELP})"));
    }
    let too_big = || format!("invalid size {input:?}: too large (at most 16 EiB - 1)");
    // Exact arithmetic in u128: value = (int + frac / 10^digits) * 2^shift.
    if int_part.len() > 30 {
        return Err(too_big());
    }
    if frac_part.len() > 18 {
        return Err(format!("invalid size {input:?}: too many decimal places"));
    }
    let int: u128 = if int_part.is_empty() { 0 } else { int_part.parse().map_err(|_| too_big())? };
    let mut bytes = int.checked_shl(shift).filter(|v| v >> shift == int).ok_or_else(too_big)?;
    if !frac_part.is_empty() {
        let frac: u128 = frac_part.parse().map_err(|_| too_big())?;
        let denom = 10u128.pow(frac_part.len() as u32);
        let scaled = frac << shift;
        let (whole, rest) = (scaled / denom, scaled % denom);
        if rest != 0 {
            return Err(format!("invalid size {input:?}: not a whole number of bytes"));
        }
        bytes += whole;
    }
    u64::try_from(bytes).map_err(|_| too_big())
}

/// The power of two for a unit suffix ("" and "B" are bytes).
fn unit_shift(unit: &str) -> Option<u32> {
    let u = unit.to_ascii_uppercase();
    if u.is_empty() || u == "B" {
        return Some(0);
    }
    let mut chars = u.chars();
    let letter = chars.next()?;
    let pos = UNITS.iter().position(|&c| c == letter)?;
    match chars.as_str() {
        "" | "B" | "IB" => Some(10 * (pos as u32 + 1)),
        _ => None,
    }
}

/// `clap` value parser for sizes.
pub fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s)
}

/// Human size with one decimal and a binary unit: "512 B", "4.0 KiB", "10.0 GiB".
pub fn format_size(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut unit = 0;
    let mut div = 1024u64;
    while unit + 1 < UNITS.len() && bytes / div >= 1024 {
        div *= 1024;
        unit += 1;
    }
    // Round to one decimal without going through floats for the integer part.
    let tenths = (bytes as u128 * 10 + div as u128 / 2) / div as u128;
    if tenths >= 10240 && unit + 1 < UNITS.len() {
        // Rounding carried into the next unit (e.g. 1023.96 KiB -> 1.0 MiB).
        let tenths = (bytes as u128 * 10 + (div as u128 * 1024) / 2) / (div as u128 * 1024);
        return format!("{}.{} {}iB", tenths / 10, tenths % 10, UNITS[unit + 1]);
    }
    format!("{}.{} {}iB", tenths / 10, tenths % 10, UNITS[unit])
}

/// Percentage `part / whole` with no decimals ("-" when whole is zero).
pub fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".into();
    }
    format!("{}%", (part as u128 * 100 + whole as u128 / 2) / whole as u128)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bare_numbers_as_bytes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size(" 4096 "), Ok(4096));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("512b"), Ok(512));
    }

    #[test]
    fn parses_binary_units_in_all_spellings() {
        for (s, v) in [
            ("4K", 4096u64),
            ("4k", 4096),
            ("4KB", 4096),
            ("4KiB", 4096),
            ("4kib", 4096),
            ("1M", 1 << 20),
            ("20G", 20 << 30),
            ("20 GiB", 20 << 30),
            ("2T", 2 << 40),
            ("1P", 1 << 50),
            ("1PiB", 1 << 50),
            ("15E", 15 << 60),
        ] {
            assert_eq!(parse_size(s), Ok(v), "{s}");
        }
    }

    #[test]
    fn parses_exact_fractions() {
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.5K"), Ok(512));
        assert_eq!(parse_size(".5M"), Ok(512 << 10));
        assert_eq!(parse_size("2."), Ok(2));
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        for (s, why) in [
            ("", "empty"),
            ("G", "no number"),
            ("-1G", "no number"),
            ("10X", "unknown unit"),
            ("10GG", "unknown unit"),
            ("10Gi", "unknown unit"),
            ("1.2.3", "malformed"),
            (".", "malformed"),
            ("0.1K", "whole number"),
            ("1.5", "whole number"),
            ("16E", "too large"),
            ("99999999999999999999999999999999999", "too large"),
            ("18446744073709551616", "too large"),
        ] {
            let e = parse_size(s).expect_err(s);
            assert!(e.contains(why), "{s:?}: {e}");
        }
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn formats_human_sizes() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1.0 KiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(10 << 30), "10.0 GiB");
        assert_eq!(format_size((1 << 20) - 1), "1.0 MiB");
        assert_eq!(format_size(1 << 50), "1.0 PiB");
        assert_eq!(format_size(u64::MAX), "16.0 EiB");
        assert_eq!(format_size(1288490189), "1.2 GiB");
    }

    #[test]
    fn round_trips_formatted_sizes() {
        for v in [4096u64, 1 << 20, 10 << 30, 3 << 29] {
            assert_eq!(parse_size(&format_size(v)), Ok(v));
        }
    }

    #[test]
    fn percentages() {
        assert_eq!(percent(1, 3), "33%");
        assert_eq!(percent(2, 3), "67%");
        assert_eq!(percent(0, 0), "-");
    }
}
