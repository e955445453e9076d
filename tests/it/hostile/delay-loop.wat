;; A tick that calls delay_us(1) a million times and ignores what it returns. Each sleep of 1 us
;; really takes 60-160 us, so counting the microseconds asked for let this run for ~73 s.
(module
  (import "edge" "delay_us" (func $delay (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "edge_abi_v1"))
  (func (export "tick") (result i32) (local $i i32)
    (loop $l
      (drop (call $delay (i32.const 1)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 1000000))))
    i32.const 0))
