;; Writes 16 KiB under one of 48 keys on every tick, round robin: within a 1 MiB quota, and
;; sled's log grows with every write until its segments are cleaned.
(module
  (import "edge" "kv_set" (func $set (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $n (mut i32) (i32.const 0))
  (func (export "edge_abi_v1"))
  (func (export "tick") (result i32)
    (i32.store (i32.const 0) (i32.rem_u (global.get $n) (i32.const 48)))
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (drop (call $set (i32.const 0) (i32.const 4) (i32.const 1024) (i32.const 16384)))
    i32.const 0))
