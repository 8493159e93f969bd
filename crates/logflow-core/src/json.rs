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
    let special = bytes.iter().fold(false, |acc, &b| {
        acc | (b < 0x20) | (b == b'"') | (b == b'\\') | (b >= 0x80)
    });
    if special {
        push_str(out, std::str::from_utf8(bytes)?);
    } else {
        out.reserve(bytes.len() + 2);
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
    }
    Ok(())
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
