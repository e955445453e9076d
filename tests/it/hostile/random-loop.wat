;; A tick that draws 1 KiB of randomness 100 000 times (100 MB), ignoring what it returns: each
;; call is a system call that cost one unit of fuel before host calls were priced.
(module
  (import "edge" "random" (func $random (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "edge_abi_v1"))
  (func (export "tick") (result i32) (local $i i32)
    (loop $l
      (drop (call $random (i32.const 1024) (i32.const 1024)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 100000))))
    i32.const 0))
