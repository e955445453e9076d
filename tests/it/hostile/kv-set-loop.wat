;; A tick that writes a 16 KiB value 10 000 times (160 MB through the store), ignoring what it
;; returns.
(module
  (import "edge" "kv_set" (func $set (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "key")
  (func (export "edge_abi_v1"))
  (func (export "tick") (result i32) (local $i i32)
    (loop $l
      (drop (call $set (i32.const 0) (i32.const 3) (i32.const 1024) (i32.const 16384)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 10000))))
    i32.const 0))
