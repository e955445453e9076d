;; A table starting with more entries than the agent's table cap (10 000 by default).
(module
  (memory (export "memory") 1)
  (table 20000 funcref)
  (func (export "edge_abi_v1")))
