//! Minimal JSON writing for hot paths that assemble JSON from pre-serialised pieces.

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `s` as a JSON string literal.
pub fn push_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // Fast path: most strings need no escaping. This fold has no early exit, so it vectorises.
    let needs = bytes.iter().fold(false, |acc, &b| {
        acc | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !needs {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xf) as usize],
            ]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Appends `bytes` as a JSON string literal if they are valid UTF-8. The common case (ASCII
/// with nothing to escape) costs one vectorised pass and a copy, instead of a UTF-8 validation
/// pass plus an escaping pass.
pub fn push_utf8(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), std::str::Utf8Error> {
    if has_special(bytes) {
        push_str(out, std::str::from_utf8(bytes)?);
    } else {
        out.reserve(bytes.len() + 2);
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
    }
    Ok(())
}

/// Whether `bytes` hold a byte that is not plain printable ASCII for JSON: a control
/// character, `"`, `\\`, or a byte of a multi-byte UTF-8 sequence. Eight bytes at a time
/// (strings in logs are mostly short, too short for the compiler's vector loop to engage).
fn has_special(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // The high bit of a byte of the result is set where that byte is special; borrows may set
    // it in bytes above a special one too, which does not change "any".
    let word = |x: u64| {
        let below_space = x.wrapping_sub(ONES * 0x20);
        let q = x ^ (ONES * u64::from(b'"'));
        let quote = q.wrapping_sub(ONES) & !q;
        let b = x ^ (ONES * u64::from(b'\\'));
        let backslash = b.wrapping_sub(ONES) & !b;
        ((below_space & !x) | quote | backslash | x) & HIGH
    };
    let mut chunks = bytes.chunks_exact(8);
    let mut acc = 0;
    for c in &mut chunks {
        acc |= word(u64::from_le_bytes(c.try_into().expect("8 bytes")));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut last = [b'a'; 8];
        last[..rest.len()].copy_from_slice(rest);
        acc |= word(u64::from_le_bytes(last));
    }
    acc != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_string_escaping() {
        let mut out = Vec::new();
        push_str(&mut out, "q\"\\\u{7}é");
        assert_eq!(String::from_utf8(out).unwrap(), r#""q\"\\\u0007é""#);
    }

    #[test]
    fn special_bytes_are_found_anywhere() {
        let reference = |b: &[u8]| {
            b.iter()
                .any(|&c| c < 0x20 || c == b'"' || c == b'\\' || c >= 0x80)
        };
        // Every byte value at every position of strings of 0..=20 bytes.
        for len in 0..=20usize {
            for at in 0..len {
                for v in 0..=255u8 {
                    let mut s = vec![b'x'; len];
                    s[at] = v;
                    assert_eq!(has_special(&s), reference(&s), "{s:?}");
                }
            }
        }
        assert!(!has_special(b""));
        // Mixed strings from an alphabet of neighbours of the special bytes (a tiny LCG, so the
        // test needs no dependency).
        let alphabet = [
            0x00, 0x1f, 0x20, 0x21, b'"', 0x23, b'[', b'\\', b']', 0x7f, 0x80, 0xff, b'a',
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let len = (seed >> 59) as usize;
            let s: Vec<u8> = (0..len)
                .map(|i| {
                    let r = seed.rotate_left(i as u32 * 7) ^ (i as u64 * 0x5851_f42d);
                    // Mostly plain letters, sometimes a special neighbour.
                    if r.is_multiple_of(5) {
                        alphabet[(r >> 8) as usize % alphabet.len()]
                    } else {
                        b'a' + (r % 26) as u8
                    }
                })
                .collect();
            assert_eq!(has_special(&s), reference(&s), "{s:?}");
        }
    }

    #[test]
    fn utf8_bytes_are_validated_and_escaped() {
        for s in ["", "plain ascii", "q\"\\\u{7}é", "日本語\n", "\u{1f600}"] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            push_utf8(&mut a, s.as_bytes()).unwrap();
            push_str(&mut b, s);
            assert_eq!(a, b, "{s:?}");
        }
        for bad in [&b"\xc3\x28"[..], b"ok\xff", b"\xe2\x82"] {
            assert!(push_utf8(&mut Vec::new(), bad).is_err(), "{bad:?}");
        }
    }
}
