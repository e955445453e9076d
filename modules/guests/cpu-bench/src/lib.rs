//! Benchmark: a CoreMark-like workload inside the guest, for comparing interpreters
//! (`agent/benches/peers.rs`). Exports `bench_cpu(iterations) -> i32`; no tick.
//!
//! Each iteration runs small versions of CoreMark's three kernels — a linked list (search,
//! reversal, merge sort), integer matrices (add, multiply, bit extraction) and a state machine
//! scanning number text — and folds their results into a CRC-16 whose value seeds the next
//! iteration. Integer only, no host calls, no allocation: every engine must return the same value.

#![no_std]
// `#[unsafe(no_mangle)]` on the benchmark's export.
#![allow(unsafe_code)]

use core::hint::black_box;
use edge_sdk::{Error, Module};

/// Nodes in the list.
const LIST_LEN: usize = 100;
/// Searches per list iteration.
const FINDS: i16 = 20;
/// Rows and columns of the matrices.
const MAT_N: usize = 12;
/// Bytes of number text the state machine scans.
const TEXT_LEN: usize = 420;

/// Runs `iterations` iterations (a negative count runs none) and returns the CRC-16 of their
/// results.
#[unsafe(no_mangle)]
pub extern "C" fn bench_cpu(iterations: i32) -> i32 {
    // `black_box`: the seeds are inputs, not constants the compiler could run ahead of time.
    let mut list = List::new(black_box(0x3415));
    let mut matrices = Matrices::new(black_box(0x66));
    let mut text = [0u8; TEXT_LEN];
    fill_text(&mut text, black_box(7));
    let mut crc = 0u16;
    for i in 0..iterations.max(0) {
        let seed = (crc ^ i as u16) as i16;
        crc = crc16(list.bench(seed), crc);
        crc = crc16(matrices.bench(seed), crc);
        crc = crc16(state_bench(&mut text, seed) as i16, crc);
    }
    i32::from(crc)
}

/// CoreMark's `crcu8`: one byte into a CRC-16 (polynomial 0xA001, bit by bit).
fn crc8(mut data: u8, mut crc: u16) -> u16 {
    for _ in 0..8 {
        let x16 = u16::from(data & 1) ^ (crc & 1);
        data >>= 1;
        if x16 == 1 {
            crc ^= 0x4002;
            crc = (crc >> 1) | 0x8000;
        } else {
            crc >>= 1;
        }
    }
    crc
}

fn crc16(value: i16, crc: u16) -> u16 {
    let [lo, hi] = value.to_le_bytes();
    crc8(hi, crc8(lo, crc))
}

/// A 16-bit linear congruential generator.
fn lcg(x: u16) -> u16 {
    x.wrapping_mul(25173).wrapping_add(13849)
}

/// No node.
const NIL: u8 = u8::MAX;

/// A singly linked list of nodes in fixed arrays (`next` holds node numbers).
struct List {
    head: u8,
    next: [u8; LIST_LEN],
    data: [i16; LIST_LEN],
    idx: [i16; LIST_LEN],
}

impl List {
    fn new(seed: u16) -> Self {
        let mut list = List {
            head: 0,
            next: [NIL; LIST_LEN],
            data: [0; LIST_LEN],
            idx: [0; LIST_LEN],
        };
        let mut x = seed;
        for i in 0..LIST_LEN {
            x = lcg(x);
            list.data[i] = (x >> 4) as i16 & 0x7ff;
            list.idx[i] = i as i16;
            if i + 1 < LIST_LEN {
                list.next[i] = (i + 1) as u8;
            }
        }
        list
    }

    /// The first node whose data's low byte is `key`, or [`NIL`].
    fn find(&self, key: i16) -> u8 {
        let mut p = self.head;
        while p != NIL && self.data[usize::from(p)] & 0xff != key {
            p = self.next[usize::from(p)];
        }
        p
    }

    fn reverse(&mut self) {
        let mut prev = NIL;
        let mut p = self.head;
        while p != NIL {
            let next = self.next[usize::from(p)];
            self.next[usize::from(p)] = prev;
            prev = p;
            p = next;
        }
        self.head = prev;
    }

    /// CoreMark's bottom-up merge sort of a linked list, stable, ascending by `key`.
    fn sort(&mut self, key: impl Fn(&Self, u8) -> i32) {
        let mut width = 1;
        loop {
            let mut p = self.head;
            self.head = NIL;
            let mut tail = NIL;
            let mut merges = 0;
            while p != NIL {
                merges += 1;
                let mut q = p;
                let mut p_len = 0;
                for _ in 0..width {
                    p_len += 1;
                    q = self.next[usize::from(q)];
                    if q == NIL {
                        break;
                    }
                }
                let mut q_len = width;
                while p_len > 0 || (q_len > 0 && q != NIL) {
                    let take_q =
                        p_len == 0 || (q_len > 0 && q != NIL && key(self, q) < key(self, p));
                    let e = if take_q {
                        let e = q;
                        q = self.next[usize::from(q)];
                        q_len -= 1;
                        e
                    } else {
                        let e = p;
                        p = self.next[usize::from(p)];
                        p_len -= 1;
                        e
                    };
                    if tail == NIL {
                        self.head = e;
                    } else {
                        self.next[usize::from(tail)] = e;
                    }
                    tail = e;
                }
                p = q;
            }
            if tail != NIL {
                self.next[usize::from(tail)] = NIL;
            }
            if merges <= 1 {
                return;
            }
            width *= 2;
        }
    }

    /// One iteration of CoreMark's list kernel: searches that reverse and reshuffle the list, a
    /// sort by data, a sort back by index, the CRC of what was found and of both orders.
    fn bench(&mut self, seed: i16) -> i16 {
        let (mut found, mut missed) = (0i16, 0i16);
        for i in 0..FINDS {
            let hit = self.find((i ^ seed) & 0xff);
            self.reverse();
            if hit == NIL {
                missed += 1;
                continue;
            }
            found += 1;
            // Move the node after the one found to second place.
            let after = self.next[usize::from(hit)];
            if after != NIL {
                self.next[usize::from(hit)] = self.next[usize::from(after)];
                self.next[usize::from(after)] = self.next[usize::from(self.head)];
                self.next[usize::from(self.head)] = after;
            }
        }
        let mut crc = crc16(found.wrapping_mul(4).wrapping_sub(missed), 0);
        self.sort(|l, n| i32::from((l.data[usize::from(n)] ^ seed) & 0x7ff));
        let mut p = self.head;
        while p != NIL {
            crc = crc16(self.data[usize::from(p)], crc);
            p = self.next[usize::from(p)];
        }
        self.sort(|l, n| i32::from(l.idx[usize::from(n)]));
        let mut p = self.head;
        while p != NIL {
            crc = crc16(self.idx[usize::from(p)], crc);
            p = self.next[usize::from(p)];
        }
        crc as i16
    }
}

type Mat<T> = [[T; MAT_N]; MAT_N];

/// CoreMark's matrix kernel's operands: two 16-bit matrices and a 32-bit result.
struct Matrices {
    a: Mat<i16>,
    b: Mat<i16>,
    c: Mat<i32>,
}

impl Matrices {
    fn new(seed: u16) -> Self {
        let mut m = Matrices {
            a: [[0; MAT_N]; MAT_N],
            b: [[0; MAT_N]; MAT_N],
            c: [[0; MAT_N]; MAT_N],
        };
        let mut x = seed;
        for i in 0..MAT_N {
            for j in 0..MAT_N {
                x = lcg(x);
                m.a[i][j] = (x >> 8) as i16;
                x = lcg(x);
                m.b[i][j] = ((x >> 8) as i16).wrapping_add((i + j) as i16);
            }
        }
        m
    }

    fn add_const(&mut self, val: i16) {
        for row in &mut self.a {
            for v in row {
                *v = v.wrapping_add(val);
            }
        }
    }

    /// CoreMark's `matrix_sum`: a running sum that scores when it passes `clip`, otherwise
    /// counts rises.
    fn sum(&self, clip: i32) -> i16 {
        let (mut total, mut prev, mut ret) = (0i32, 0i32, 0i16);
        for row in &self.c {
            for &cur in row {
                total = total.wrapping_add(cur);
                if total > clip {
                    ret = ret.wrapping_add(10);
                    total = 0;
                } else {
                    ret = ret.wrapping_add(i16::from(cur > prev));
                }
                prev = cur;
            }
        }
        ret
    }

    fn product(&self, i: usize, j: usize) -> i32 {
        (0..MAT_N).fold(0i32, |s, k| {
            s.wrapping_add(i32::from(self.a[i][k]) * i32::from(self.b[k][j]))
        })
    }

    /// One iteration of CoreMark's matrix kernel.
    fn bench(&mut self, seed: i16) -> i16 {
        let val = seed & 0xff;
        let clip = 0xf000 | i32::from(val);
        let mut crc = 0;
        self.add_const(val);
        for i in 0..MAT_N {
            for j in 0..MAT_N {
                self.c[i][j] = i32::from(self.a[i][j]) * i32::from(val);
            }
        }
        crc = crc16(self.sum(clip), crc);
        for i in 0..MAT_N {
            self.c[i][0] = self.product(i, 0);
        }
        crc = crc16(self.sum(clip), crc);
        for i in 0..MAT_N {
            for j in 0..MAT_N {
                self.c[i][j] = self.product(i, j);
            }
        }
        crc = crc16(self.sum(clip), crc);
        for i in 0..MAT_N {
            for j in 0..MAT_N {
                self.c[i][j] = (0..MAT_N).fold(0i32, |s, k| {
                    let p = i32::from(self.a[i][k]) * i32::from(self.b[k][j]);
                    s.wrapping_add(((p >> 2) & 0xf) * ((p >> 5) & 0x7f))
                });
            }
        }
        crc = crc16(self.sum(clip), crc);
        self.add_const(val.wrapping_neg());
        crc as i16
    }
}

/// The number texts CoreMark's state machine scans: integers, decimals, scientific, invalid.
const NUMBERS: [&[u8]; 16] = [
    b"5012",
    b"1234",
    b"-874",
    b"+122",
    b"35.54400",
    b".1234500",
    b"-110.700",
    b"+0.64400",
    b"5.500e+3",
    b"-.123e-2",
    b"-87e+832",
    b"+0.6e-12",
    b"T0.3e-1F",
    b"-T.T++Tq",
    b"1T3.4e4z",
    b"34.0e-T^",
];

/// Fills `text` with comma-separated numbers picked by `seed`; what is left over is commas.
fn fill_text(text: &mut [u8], seed: u16) {
    text.fill(b',');
    let mut x = seed;
    let mut at = 0;
    loop {
        x = lcg(x);
        let number = NUMBERS[usize::from(x >> 8) % NUMBERS.len()];
        if at + number.len() + 1 > text.len() {
            return;
        }
        text[at..at + number.len()].copy_from_slice(number);
        at += number.len() + 1;
    }
}

const START: usize = 0;
const INVALID: usize = 1;
const SIGN: usize = 2;
const EXP_SIGN: usize = 3;
const INT: usize = 4;
const FLOAT: usize = 5;
const EXPONENT: usize = 6;
const SCIENTIFIC: usize = 7;
const STATES: usize = 8;

/// Scans one token from `*pos` to its comma (or to where it turns invalid): its final state.
fn token(text: &[u8], pos: &mut usize, transitions: &mut [u16; STATES]) -> usize {
    let mut state = START;
    while let Some(&c) = text.get(*pos) {
        *pos += 1;
        if c == b',' {
            break;
        }
        let digit = c.is_ascii_digit();
        let next = match state {
            START if digit => INT,
            START if c == b'+' || c == b'-' => SIGN,
            START | SIGN if c == b'.' => FLOAT,
            SIGN | INT if digit => INT,
            INT if c == b'.' => FLOAT,
            FLOAT if digit => FLOAT,
            FLOAT if c == b'e' || c == b'E' => EXP_SIGN,
            EXP_SIGN if c == b'+' || c == b'-' => EXPONENT,
            EXPONENT | SCIENTIFIC if digit => SCIENTIFIC,
            _ => INVALID,
        };
        if next != state {
            transitions[next] += 1;
        }
        state = next;
        if state == INVALID {
            break;
        }
    }
    state
}

fn scan(text: &[u8], finals: &mut [u16; STATES], transitions: &mut [u16; STATES]) {
    let mut pos = 0;
    while pos < text.len() {
        finals[token(text, &mut pos, transitions)] += 1;
    }
}

/// One iteration of CoreMark's state-machine kernel: a scan, a scan of the text with every
/// `step`-th byte corrupted, the corruption undone; the CRC of the counts.
fn state_bench(text: &mut [u8], seed: i16) -> u16 {
    let mut finals = [0u16; STATES];
    let mut transitions = [0u16; STATES];
    scan(text, &mut finals, &mut transitions);
    let step = 1 + usize::from(seed as u16 & 7);
    let flip = (seed as u16 >> 3) as u8 | 1;
    let corrupt = |text: &mut [u8]| {
        for b in text.iter_mut().step_by(step) {
            if *b != b',' {
                *b ^= flip;
            }
        }
    };
    corrupt(text);
    scan(text, &mut finals, &mut transitions);
    corrupt(text);
    let mut crc = 0;
    for (&f, &t) in finals.iter().zip(&transitions) {
        crc = crc16(f as i16, crc16(t as i16, crc));
    }
    crc
}

struct CpuBench;

impl Module for CpuBench {
    fn init() -> Result<Self, Error> {
        Ok(CpuBench)
    }
}

edge_sdk::module!(CpuBench);
