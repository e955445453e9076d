//! The module's key-value store: small values that survive restarts and upgrades, within the
//! manifest's `caps.kv_quota_bytes` (keys of at most [`edge_abi::limits::KV_KEY_MAX`] bytes,
//! values of at most [`edge_abi::limits::KV_VALUE_MAX`]).

use alloc::vec::Vec;

use crate::{Error, sys};

/// Values up to this size are read with one host call; larger ones need a second.
const FIRST_READ: usize = 64;

/// The value under `key`, or `None` if there is none.
pub fn get(key: &str) -> Result<Option<Vec<u8>>, Error> {
    read_value(|buf| get_raw(key, buf))
}

/// Copies the value under `key` into `buf` and returns its length, or `None` if there is none.
/// Fails with [`Error::TOO_LARGE`], leaving `buf` untouched, when the value is longer than
/// `buf`; [`get`] reads values of any length.
pub fn get_into(key: &str, buf: &mut [u8]) -> Result<Option<usize>, Error> {
    match get_raw(key, buf)? {
        Some(len) if len > buf.len() => Err(Error::TOO_LARGE),
        found => Ok(found),
    }
}

/// Stores `value` under `key`, replacing any value there. Fails with [`Error::QUOTA_EXCEEDED`]
/// when the store would outgrow the module's quota.
pub fn set(key: &str, value: &[u8]) -> Result<(), Error> {
    // SAFETY: both pairs describe live slices the host only reads.
    let code = unsafe {
        sys::kv_set(
            sys::addr(key.as_ptr()),
            sys::len(key.len()),
            sys::addr(value.as_ptr()),
            sys::len(value.len()),
        )
    };
    Error::check(code).map(drop)
}

/// Deletes the value under `key`; deleting a key that has none succeeds.
pub fn delete(key: &str) -> Result<(), Error> {
    // SAFETY: the pair describes a live slice the host only reads.
    let code = unsafe { sys::kv_delete(sys::addr(key.as_ptr()), sys::len(key.len())) };
    match Error::check(code) {
        Err(Error::NOT_FOUND) => Ok(()),
        other => other.map(drop),
    }
}

/// One `kv_get`: the value's length, with the value in `buf` if it fits; `None` if there is none.
fn get_raw(key: &str, buf: &mut [u8]) -> Result<Option<usize>, Error> {
    // SAFETY: the key describes a live slice the host only reads; the buffer a live, exclusively
    // borrowed slice of initialised bytes the host writes only within.
    let code = unsafe {
        sys::kv_get(
            sys::addr(key.as_ptr()),
            sys::len(key.len()),
            sys::addr(buf.as_mut_ptr()),
            sys::len(buf.len()),
        )
    };
    match Error::check(code) {
        Ok(len) => Ok(Some(len as usize)),
        Err(Error::NOT_FOUND) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads a value with `get`, which returns the value's length and fills the buffer when the value
/// fits: first into a small buffer on the stack, then into one of the length `get` reported.
fn read_value(
    mut get: impl FnMut(&mut [u8]) -> Result<Option<usize>, Error>,
) -> Result<Option<Vec<u8>>, Error> {
    let mut first = [0; FIRST_READ];
    let Some(len) = get(&mut first)? else {
        return Ok(None);
    };
    if let Some(value) = first.get(..len) {
        return Ok(Some(value.to_vec()));
    }
    let mut value = alloc::vec![0; len];
    // Only the module changes its values, and it is not running now; but should the value have
    // changed in between, read again until it fits.
    while let Some(len) = get(&mut value)? {
        if len <= value.len() {
            value.truncate(len);
            return Ok(Some(value));
        }
        value.resize(len, 0);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for `kv_get` that serves `values` in turn, one per call, and counts the calls.
    fn host<'a>(
        values: &'a [Option<&'a [u8]>],
        calls: &'a mut usize,
    ) -> impl FnMut(&mut [u8]) -> Result<Option<usize>, Error> + 'a {
        move |buf| {
            let value = values[*calls];
            *calls += 1;
            Ok(value.map(|v| {
                if let Some(dst) = buf.get_mut(..v.len()) {
                    dst.copy_from_slice(v);
                }
                v.len()
            }))
        }
    }

    #[test]
    fn a_small_value_takes_one_call() {
        let mut calls = 0;
        let value = read_value(host(&[Some(b"42")], &mut calls));
        assert_eq!(value, Ok(Some(b"42".to_vec())));
        assert_eq!(calls, 1);
    }

    #[test]
    fn a_large_value_is_read_again_into_a_buffer_of_its_length() {
        let big = [7; 1000];
        let mut calls = 0;
        let value = read_value(host(&[Some(&big), Some(&big)], &mut calls));
        assert_eq!(value, Ok(Some(big.to_vec())));
        assert_eq!(calls, 2);
    }

    #[test]
    fn a_value_that_grew_in_between_is_read_until_it_fits() {
        let (big, bigger) = ([1; 100], [2; 300]);
        let mut calls = 0;
        let value = read_value(host(
            &[Some(&big), Some(&bigger), Some(&bigger)],
            &mut calls,
        ));
        assert_eq!(value, Ok(Some(bigger.to_vec())));
        assert_eq!(calls, 3);
    }

    #[test]
    fn a_value_that_shrank_or_vanished_in_between_is_read_as_it_is_now() {
        let (big, small) = ([1; 100], [2; 70]);
        let mut calls = 0;
        let value = read_value(host(&[Some(&big), Some(&small)], &mut calls));
        assert_eq!(value, Ok(Some(small.to_vec())));
        let mut calls = 0;
        assert_eq!(read_value(host(&[Some(&big), None], &mut calls)), Ok(None));
    }

    #[test]
    fn a_missing_key_is_none_and_errors_pass_through() {
        let mut calls = 0;
        assert_eq!(read_value(host(&[None], &mut calls)), Ok(None));
        assert_eq!(read_value(|_| Err(Error::DENIED)), Err(Error::DENIED));
    }

    #[test]
    fn host_calls_fail_off_wasm32() {
        assert_eq!(get("count"), Err(Error::UNAVAILABLE));
        assert_eq!(get_into("count", &mut [0; 8]), Err(Error::UNAVAILABLE));
        assert_eq!(set("count", b"1"), Err(Error::UNAVAILABLE));
        assert_eq!(delete("count"), Err(Error::UNAVAILABLE));
    }
}
