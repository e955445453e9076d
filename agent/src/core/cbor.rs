//! A bounded walk over CBOR bytes, run before any decoder builds values from untrusted input: it
//! allocates nothing, and refuses input with more items, deeper nesting or other shapes than a
//! limit allows. A decoder that builds a value per item (ciborium, coset) then spends at most a
//! small multiple of the input: a 4 MiB bundle of four million empty arrays is refused here
//! instead of becoming 138 MB of values before its signature is checked.

/// Bounds on a CBOR item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Most data items in all (each array, map, key, value, tag and scalar counts one).
    pub max_items: u32,
    /// Deepest nesting of arrays, maps and tags.
    pub max_depth: u32,
}

/// The COSE_Sign1 envelope: a tag, an array of four, two headers, payload and signature.
pub const COSE_SIGN1: Bounds = Bounds {
    max_items: 64,
    max_depth: 4,
};

/// A manifest or a protocol message.
pub const DOCUMENT: Bounds = Bounds {
    max_items: 16_384,
    max_depth: 16,
};

/// Why bytes are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CborError {
    /// The input ends inside an item.
    #[error("CBOR truncated")]
    Truncated,
    /// More items than the bound.
    #[error("CBOR has more than {0} items")]
    TooManyItems(u32),
    /// Nested deeper than the bound.
    #[error("CBOR nested deeper than {0} levels")]
    TooDeep(u32),
    /// Indefinite lengths, reserved values or a break outside an indefinite item.
    #[error("CBOR not well formed: {0}")]
    Malformed(&'static str),
    /// Bytes follow the item.
    #[error("{0} bytes follow the CBOR item")]
    Trailing(usize),
}

struct Walker<'a> {
    buf: &'a [u8],
    pos: usize,
    items: u32,
    bounds: Bounds,
}

impl Walker<'_> {
    fn byte(&mut self) -> Result<u8, CborError> {
        let b = *self.buf.get(self.pos).ok_or(CborError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    fn skip(&mut self, n: u64) -> Result<(), CborError> {
        let n = usize::try_from(n).map_err(|_| CborError::Truncated)?;
        if n > self.buf.len() - self.pos {
            return Err(CborError::Truncated);
        }
        self.pos += n;
        Ok(())
    }

    fn arg(&mut self, info: u8) -> Result<u64, CborError> {
        let width = match info {
            0..=23 => return Ok(u64::from(info)),
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            31 => return Err(CborError::Malformed("indefinite length")),
            _ => return Err(CborError::Malformed("reserved additional information")),
        };
        let mut v = 0u64;
        for _ in 0..width {
            v = (v << 8) | u64::from(self.byte()?);
        }
        Ok(v)
    }

    /// Walks one item at nesting `depth`, counting every item inside it.
    fn item(&mut self, depth: u32) -> Result<(), CborError> {
        self.items += 1;
        if self.items > self.bounds.max_items {
            return Err(CborError::TooManyItems(self.bounds.max_items));
        }
        let first = self.byte()?;
        let (major, info) = (first >> 5, first & 0x1f);
        let arg = self.arg(info)?;
        let nested = |n: u64| -> Result<u64, CborError> {
            if depth + 1 > self.bounds.max_depth {
                return Err(CborError::TooDeep(self.bounds.max_depth));
            }
            // Every nested item takes at least one byte: a count beyond what is left cannot be.
            if n > (self.buf.len() - self.pos) as u64 {
                return Err(CborError::Truncated);
            }
            Ok(n)
        };
        match major {
            0 | 1 => Ok(()),
            2 | 3 => self.skip(arg),
            4 => {
                for _ in 0..nested(arg)? {
                    self.item(depth + 1)?;
                }
                Ok(())
            }
            5 => {
                for _ in 0..nested(arg)? {
                    self.item(depth + 1)?;
                    self.item(depth + 1)?;
                }
                Ok(())
            }
            6 => {
                nested(1)?;
                self.item(depth + 1)
            }
            _ => match info {
                // false, true, null, undefined, simple values, floats: scalars.
                0..=27 => Ok(()),
                _ => Err(CborError::Malformed("break outside an indefinite item")),
            },
        }
    }
}

/// Checks that `bytes` is exactly one well-formed, definite-length CBOR item within `bounds`.
pub fn check(bytes: &[u8], bounds: Bounds) -> Result<(), CborError> {
    let mut w = Walker {
        buf: bytes,
        pos: 0,
        items: 0,
        bounds,
    };
    w.item(0)?;
    match bytes.len() - w.pos {
        0 => Ok(()),
        n => Err(CborError::Trailing(n)),
    }
}

/// The offset of the first byte at which `a` and `b` differ, if they do (a canonical encoding
/// checked against the bytes received).
pub(crate) fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(at) => Some(at),
        None if a.len() != b.len() => Some(a.len().min(b.len())),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_documents_pass() {
        let mut bytes = Vec::new();
        let value = ciborium::Value::Map(vec![
            ("name".into(), "heartbeat".into()),
            (
                "caps".into(),
                ciborium::Value::Array(vec![1.into(), 2.5.into(), true.into()]),
            ),
            (
                "tagged".into(),
                ciborium::Value::Tag(18, Box::new(ciborium::Value::Null)),
            ),
        ]);
        ciborium::into_writer(&value, &mut bytes).unwrap();
        check(&bytes, DOCUMENT).unwrap();
    }

    #[test]
    fn many_small_items_are_refused_before_any_decoder_sees_them() {
        // tag 18, array of a million empty arrays.
        let mut bytes = vec![0xd2, 0x9a, 0x00, 0x0f, 0x42, 0x40];
        bytes.resize(bytes.len() + 1_000_000, 0x80);
        assert_eq!(check(&bytes, COSE_SIGN1), Err(CborError::TooManyItems(64)));
        assert_eq!(
            check(&bytes, DOCUMENT),
            Err(CborError::TooManyItems(16_384))
        );
    }

    #[test]
    fn deep_nesting_and_malformed_shapes_are_refused() {
        let deep = vec![0x81; 40].into_iter().chain([0x00]).collect::<Vec<_>>();
        assert_eq!(check(&deep, DOCUMENT), Err(CborError::TooDeep(16)));
        let tags = vec![0xd2; 40].into_iter().chain([0x00]).collect::<Vec<_>>();
        assert_eq!(check(&tags, DOCUMENT), Err(CborError::TooDeep(16)));
        assert!(matches!(
            check(&[0x9f, 0xff], DOCUMENT),
            Err(CborError::Malformed(_))
        ));
        assert!(matches!(
            check(&[0xff], DOCUMENT),
            Err(CborError::Malformed(_))
        ));
        assert_eq!(
            check(&[0x5a, 0xff, 0xff, 0xff, 0xff], DOCUMENT),
            Err(CborError::Truncated)
        );
        assert_eq!(
            check(&[0x9b, 0xff, 0, 0, 0, 0, 0, 0, 0], DOCUMENT),
            Err(CborError::Truncated)
        );
        assert_eq!(check(&[0x00, 0x00], DOCUMENT), Err(CborError::Trailing(1)));
    }
}
