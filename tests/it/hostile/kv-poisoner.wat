;; A bad version of kv-counter: its init overwrites the counter with three bytes kv-counter
;; cannot read, and its first tick traps. Its probation fails; the rollback must take its
;; key-value writes back with it.
(module
  (import "edge" "kv_set" (func $set (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "count")
  (data (i32.const 16) "xyz")
  (func (export "edge_abi_v1"))
  (func (export "init") (result i32)
    (call $set (i32.const 0) (i32.const 5) (i32.const 16) (i32.const 3)))
  (func (export "tick") (result i32) unreachable))
