//! Zarr v3 `vlen-utf8` chunks (numcodecs' layout: a u32 item count, then per item a u32 byte length and
//! its UTF-8 bytes, all little endian): pick a few strings out of a decoded chunk without building the
//! others. Naming a top-k needs k ids out of chunks of 2^14: building all of them as Python strings is
//! what made naming cost more than scoring.

use std::fmt;

#[derive(Debug, PartialEq, Eq)]
pub enum VlenError {
    /// The chunk ends inside the header or inside item `i`.
    Truncated(usize),
    /// Item `i` is not valid UTF-8.
    NotUtf8(usize),
    /// A wanted position is past the chunk's item count.
    OutOfRange(usize, usize),
}

impl fmt::Display for VlenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VlenError::Truncated(i) => write!(f, "the vlen-utf8 chunk ends inside item {i}"),
            VlenError::NotUtf8(i) => write!(f, "item {i} of the vlen-utf8 chunk is not UTF-8"),
            VlenError::OutOfRange(p, n) => write!(f, "position {p} is past the chunk's {n} items"),
        }
    }
}

fn read_u32(data: &[u8], at: usize) -> Option<usize> {
    data.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// The strings at `wanted` (any order, repeats allowed) of a decoded vlen-utf8 chunk.
pub fn take<'a>(data: &'a [u8], wanted: &[usize]) -> Result<Vec<&'a str>, VlenError> {
    let n = read_u32(data, 0).ok_or(VlenError::Truncated(0))?;
    if let Some(&p) = wanted.iter().find(|&&p| p >= n) {
        return Err(VlenError::OutOfRange(p, n));
    }
    let last = wanted.iter().copied().max().map_or(0, |m| m + 1);
    // Item offsets up to the last wanted one: one pass over the length prefixes.
    let mut spans = Vec::with_capacity(last);
    let mut at = 4;
    for i in 0..last {
        let len = read_u32(data, at).ok_or(VlenError::Truncated(i))?;
        if at + 4 + len > data.len() {
            return Err(VlenError::Truncated(i));
        }
        spans.push((at + 4, at + 4 + len));
        at += 4 + len;
    }
    wanted
        .iter()
        .map(|&p| {
            let (a, b) = spans[p];
            std::str::from_utf8(&data[a..b]).map_err(|_| VlenError::NotUtf8(p))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(items: &[&str]) -> Vec<u8> {
        let mut out = (items.len() as u32).to_le_bytes().to_vec();
        for s in items {
            out.extend((s.len() as u32).to_le_bytes());
            out.extend(s.as_bytes());
        }
        out
    }

    #[test]
    fn picks_in_any_order_with_repeats() {
        let data = encode(&["a", "", "t279", "é-ü", "last"]);
        assert_eq!(take(&data, &[4, 2, 2, 0, 1, 3]).unwrap(), vec!["last", "t279", "t279", "a", "", "é-ü"]);
        assert_eq!(take(&data, &[]).unwrap(), Vec::<&str>::new());
    }

    #[test]
    fn damage_is_an_error() {
        let data = encode(&["abc", "def"]);
        assert_eq!(take(&data, &[2]), Err(VlenError::OutOfRange(2, 2)));
        assert_eq!(take(&data[..9], &[1]), Err(VlenError::Truncated(0)));
        assert_eq!(take(&data[..13], &[1]), Err(VlenError::Truncated(1)));
        assert_eq!(take(&data[..2], &[0]), Err(VlenError::Truncated(0)));
        let mut bad = data.clone();
        bad[8] = 0xff;
        assert_eq!(take(&bad, &[0]), Err(VlenError::NotUtf8(0)));
    }
}
