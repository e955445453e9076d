//! Content-defined chunking of a module's Wasm for chunked delivery (`edgectl` only: the device
//! never cuts, it fetches the chunks a signed manifest lists).
//!
//! FastCDC (v2020) puts the cut points where the content says, not at fixed offsets: a change to
//! one function moves the cut points around it only, so an upgrade shares most chunks with the
//! version before it and a device downloads the few that changed.

use super::manifest::{CHUNK_MAX_BYTES, ChunkRef, Sha256};
use super::topics::{DEFAULT_MAX_PACKET_BYTES, PUBLISH_OVERHEAD};

/// The average chunk size `edgectl sign` aims for by default.
pub const DEFAULT_AVG_BYTES: usize = 16 << 10;
/// The smallest average FastCDC accepts (its minimum chunk is a quarter of it, at least 64).
pub const MIN_AVG_BYTES: usize = 256;
/// The largest chunk cut: one chunk and its PUBLISH header fit the default packet limit
/// (AWS IoT Core's 128 KiB).
pub const MAX_CHUNK_BYTES: usize = DEFAULT_MAX_PACKET_BYTES - PUBLISH_OVERHEAD;
/// The largest average: the maximum chunk (four times the average, capped) is not below it.
pub const MAX_AVG_BYTES: usize = MAX_CHUNK_BYTES;

const _: () = assert!(MAX_CHUNK_BYTES as u64 <= CHUNK_MAX_BYTES);

/// An average chunk size outside what the cutter works with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "an average chunk size of {0} bytes is outside {MIN_AVG_BYTES}..={MAX_AVG_BYTES} \
     (chunks are cut between a quarter of it and four times it, at most {MAX_CHUNK_BYTES} bytes \
     so that one fits a {DEFAULT_MAX_PACKET_BYTES}-byte MQTT packet)"
)]
pub struct BadAverage(pub usize);

/// The FastCDC bounds for an average: (min, avg, max).
pub fn bounds(avg: usize) -> Result<(usize, usize, usize), BadAverage> {
    if !(MIN_AVG_BYTES..=MAX_AVG_BYTES).contains(&avg) {
        return Err(BadAverage(avg));
    }
    Ok((avg / 4, avg, (avg * 4).min(MAX_CHUNK_BYTES)))
}

/// Cuts `wasm` into content-defined chunks of about `avg` bytes (FastCDC v2020, minimum a quarter
/// of `avg`, maximum four times it but at most [`MAX_CHUNK_BYTES`]). Returns the lengths in
/// order; they add up to `wasm.len()` (none for empty input). Deterministic.
pub fn cut(wasm: &[u8], avg: usize) -> Result<Vec<usize>, BadAverage> {
    let (min, avg, max) = bounds(avg)?;
    // The bounds are at most MAX_CHUNK_BYTES (< 2^32).
    #[allow(clippy::cast_possible_truncation)]
    let chunker = fastcdc::v2020::FastCDC::new(wasm, min as u32, avg as u32, max as u32);
    Ok(chunker.map(|c| c.length).collect())
}

/// The digests and lengths of the chunks `lengths` cut from `wasm`, in order; `None` when the
/// lengths do not add up to the Wasm's.
pub fn refs(wasm: &[u8], lengths: &[usize]) -> Option<Vec<ChunkRef>> {
    let mut at = 0usize;
    let mut out = Vec::with_capacity(lengths.len());
    for &len in lengths {
        let piece = wasm.get(at..at.checked_add(len)?)?;
        out.push(ChunkRef(Sha256::of(piece), len as u64));
        at += len;
    }
    (at == wasm.len()).then_some(out)
}

/// The bytes of each chunk `chunks` lists, cut from `wasm` by their lengths and each checked
/// against its digest. `Err(i)`: chunk `i` is not the bytes at its place (or runs past the end,
/// or the chunks do not cover the Wasm exactly, `i` = the list's length).
pub fn pieces<'a>(wasm: &'a [u8], chunks: &[ChunkRef]) -> Result<Vec<&'a [u8]>, usize> {
    let mut at = 0usize;
    let mut out = Vec::with_capacity(chunks.len());
    for (i, c) in chunks.iter().enumerate() {
        let len = usize::try_from(c.size()).map_err(|_| i)?;
        let piece = at
            .checked_add(len)
            .and_then(|end| wasm.get(at..end))
            .ok_or(i)?;
        if Sha256::of(piece) != c.sha256() {
            return Err(i);
        }
        out.push(piece);
        at += len;
    }
    if at == wasm.len() {
        Ok(out)
    } else {
        Err(chunks.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes that look like code: no long runs, no period.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                s.to_be_bytes()[0]
            })
            .collect()
    }

    #[test]
    fn cutting_is_deterministic_and_the_lengths_add_up() {
        let data = noise(300_000, 1);
        for avg in [MIN_AVG_BYTES, 4096, DEFAULT_AVG_BYTES, 65536, MAX_AVG_BYTES] {
            let a = cut(&data, avg).unwrap();
            assert_eq!(a, cut(&data, avg).unwrap());
            assert_eq!(a.iter().sum::<usize>(), data.len(), "avg {avg}");
            let (min, _, max) = bounds(avg).unwrap();
            assert!(a.iter().all(|&l| l <= max), "avg {avg}: {a:?}");
            // Every chunk but the last is at least the minimum.
            assert!(a[..a.len() - 1].iter().all(|&l| l >= min), "avg {avg}");
            assert!(refs(&data, &a).is_some());
        }
        assert_eq!(cut(&[], 4096).unwrap(), Vec::<usize>::new());
        assert_eq!(cut(&[7; 10], 4096).unwrap(), vec![10]);
    }

    #[test]
    fn no_chunk_is_above_what_one_packet_carries() {
        // Long runs of one byte give FastCDC no cut point: only the maximum cuts.
        let data = vec![0u8; 1 << 20];
        let lengths = cut(&data, MAX_AVG_BYTES).unwrap();
        assert!(lengths.iter().all(|&l| l <= MAX_CHUNK_BYTES));
        assert!(
            lengths
                .iter()
                .all(|&l| l + PUBLISH_OVERHEAD <= DEFAULT_MAX_PACKET_BYTES)
        );
        assert_eq!(lengths.iter().sum::<usize>(), data.len());
    }

    #[test]
    fn averages_outside_the_cutters_range_are_refused() {
        for bad in [0, 1, 255, MAX_AVG_BYTES + 1, usize::MAX] {
            assert_eq!(cut(b"x", bad), Err(BadAverage(bad)));
        }
        assert!(BadAverage(3).to_string().contains("256"));
    }

    #[test]
    fn a_change_in_the_middle_shares_most_chunks() {
        let old = noise(1 << 20, 2);
        let mut new = old.clone();
        // Insert a few bytes in the middle: fixed-size blocks would all shift.
        new.splice(500_000..500_000, [1, 2, 3, 4, 5]);
        let a = refs(&old, &cut(&old, 16384).unwrap()).unwrap();
        let b = refs(&new, &cut(&new, 16384).unwrap()).unwrap();
        let known: std::collections::HashSet<_> = a.iter().collect();
        let changed: u64 = b.iter().filter(|c| !known.contains(c)).map(|c| c.1).sum();
        assert!(
            changed * 10 < new.len() as u64,
            "{changed} of {} bytes in new chunks",
            new.len()
        );
    }

    #[test]
    fn pieces_are_checked_against_the_list() {
        let data = noise(50_000, 3);
        let list = refs(&data, &cut(&data, 4096).unwrap()).unwrap();
        let p = pieces(&data, &list).unwrap();
        assert_eq!(p.concat(), data);
        let mut bad = data.clone();
        let second = usize::try_from(list[0].1).unwrap() + 1;
        bad[second] ^= 1;
        assert_eq!(pieces(&bad, &list), Err(1));
        assert_eq!(pieces(&data[..data.len() - 1], &list), Err(list.len() - 1));
        assert_eq!(pieces(&data, &list[..1]), Err(1));
        let mut longer = data.clone();
        longer.push(0);
        assert_eq!(pieces(&longer, &list), Err(list.len()));
    }
}
