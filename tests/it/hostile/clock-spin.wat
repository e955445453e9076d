;; A tick that reads the clock forever.
(module
  (import "edge" "now_ms" (func $now (result i64)))
  (memory (export "memory") 1)
  (func (export "edge_abi_v1"))
  (func (export "tick") (result i32)
    (loop $l (drop (call $now)) (br $l))
    i32.const 0))
