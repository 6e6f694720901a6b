//! Kubernetes quantities (`100m`, `1.5`, `128Mi`, `1G`, `1e3`) as numbers the scheduler adds
//! up: CPU in millicores, everything else in units (bytes, pods).

/// The value of a quantity in thousandths of its unit (so `100m` is 100 and `1` is 1000), or
/// `None` if it does not parse.
pub fn parse_milli(text: &str) -> Option<i128> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    if number.is_empty() {
        return None;
    }
    // Keep the decimal exactly: digits and the position of the point.
    let negative = number.starts_with('-');
    let digits = number.trim_start_matches(['+', '-']);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let mut mantissa: i128 = 0;
    for c in whole.chars().chain(fraction.chars()) {
        mantissa = mantissa.checked_mul(10)?.checked_add(c.to_digit(10)? as i128)?;
    }
    // value = mantissa * 10^-len(fraction) * multiplier; we want value * 1000.
    let (base, exponent): (i128, i32) = match suffix {
        "" => (1, 0),
        "n" => (1, -9),
        "u" => (1, -6),
        "m" => (1, -3),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        exp if exp.starts_with(['e', 'E']) => (1, exp[1..].parse().ok()?),
        _ => return None,
    };
    let power = exponent + 3 - fraction.len() as i32;
    let mut value = mantissa.checked_mul(base)?;
    if power >= 0 {
        value = value.checked_mul(10i128.checked_pow(power as u32)?)?;
    } else {
        // Round up, as upstream does for a request that is not a whole milli-unit.
        let divisor = 10i128.checked_pow((-power) as u32)?;
        value = (value + divisor - 1) / divisor;
    }
    Some(if negative { -value } else { value })
}

/// CPU in millicores.
pub fn millicores(text: &str) -> i64 {
    parse_milli(text).unwrap_or(0).clamp(0, i64::MAX as i128) as i64
}

/// Anything else (bytes, counts) in whole units, rounded up.
pub fn units(text: &str) -> i64 {
    let milli = parse_milli(text).unwrap_or(0).max(0);
    ((milli + 999) / 1000).min(i64::MAX as i128) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_read_as_upstream_reads_them() {
        for (text, cpu, bytes) in [
            ("100m", 100, 1),
            ("1", 1000, 1),
            ("0.5", 500, 1),
            ("2.25", 2250, 3),
            ("128Mi", 128 * 1024 * 1024 * 1000, 128 * 1024 * 1024),
            ("1G", 1_000_000_000_000, 1_000_000_000),
            ("1e3", 1_000_000, 1000),
            ("110", 110_000, 110),
            ("1Ki", 1_024_000, 1024),
        ] {
            assert_eq!(millicores(text), cpu, "{text} as cpu");
            assert_eq!(units(text), bytes, "{text} as units");
        }
        assert_eq!(parse_milli("abc"), None);
        assert_eq!(parse_milli("1Xi"), None);
        assert_eq!(millicores(""), 0);
        assert_eq!(millicores("999999999999999999999999999999999999999E"), 0, "overflow reads as nothing");
    }
}
