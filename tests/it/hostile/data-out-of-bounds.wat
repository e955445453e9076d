;; An active data segment past the end of its memory: it validates, and traps at instantiation.
(module
  (memory (export "memory") 1)
  (data (i32.const 65534) "abcd")
  (func (export "edge_abi_v1")))
