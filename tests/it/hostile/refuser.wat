;; Every tick makes 50 host calls the manifest does not allow (a publish outside caps.publish):
;; each is refused, none ends the call.
(module
  (import "edge" "publish" (func $publish (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "elsewhere")
  (func (export "edge_abi_v1"))
  (func (export "tick") (result i32) (local $i i32)
    (loop $l
      (drop (call $publish (i32.const 0) (i32.const 9) (i32.const 0) (i32.const 0)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 50))))
    i32.const 0))
