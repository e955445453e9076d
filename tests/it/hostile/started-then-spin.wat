;; Says it started (from init), then never returns from its ticks: only its deadline ends one.
(module
  (import "edge" "publish" (func $publish (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "started")
  (func (export "edge_abi_v1"))
  (func (export "init") (result i32)
    (drop (call $publish (i32.const 0) (i32.const 7) (i32.const 0) (i32.const 7)))
    i32.const 0)
  (func (export "tick") (result i32)
    (loop $l (br $l))
    i32.const 0))
