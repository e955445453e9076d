;; Ten thousand now_ms calls, then four publishes of 60 000 bytes: the fuel a tick reports must
;; pay for the host's work, not one unit per call.
(module
  (import "edge" "now_ms" (func $now (result i64)))
  (import "edge" "publish" (func $publish (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "t/x")
  (func (export "edge_abi_v1"))
  (func (export "tick") (result i32) (local $i i32)
    (loop $l
      (drop (call $now))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 10000))))
    (local.set $i (i32.const 0))
    (loop $p
      (if (call $publish (i32.const 0) (i32.const 3) (i32.const 1024) (i32.const 60000))
        (then unreachable))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $p (i32.lt_u (local.get $i) (i32.const 4))))
    i32.const 0))
