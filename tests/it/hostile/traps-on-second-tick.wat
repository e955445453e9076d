;; Passes its first tick, traps on its second: a version whose probation fails a moment later.
(module
  (memory (export "memory") 1)
  (global $ticks (mut i32) (i32.const 0))
  (func (export "edge_abi_v1"))
  (func (export "tick") (result i32)
    (global.set $ticks (i32.add (global.get $ticks) (i32.const 1)))
    (if (i32.ge_u (global.get $ticks) (i32.const 2)) (then unreachable))
    i32.const 0))
