;; A tick that never returns and makes no host call: only fuel, or the deadline between fuel
;; slices, can end it.
(module
  (memory (export "memory") 1)
  (func (export "edge_abi_v1"))
  (func (export "tick") (result i32)
    (loop $l (br $l))
    i32.const 0))
