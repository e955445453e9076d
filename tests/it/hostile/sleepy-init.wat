;; An init that sleeps ten times 100 ms, within the per-call delay cap of 1 s but past a shorter
;; deadline: the sleep that would cross the deadline is cut short and ends the call.
(module
  (import "edge" "delay_us" (func $delay (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "edge_abi_v1"))
  (func (export "init") (result i32) (local $i i32)
    (loop $l
      (if (call $delay (i32.const 100000)) (then unreachable))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 10))))
    i32.const 0))
