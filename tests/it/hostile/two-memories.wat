;; Multi-memory: valid to a validator with the proposal on, refused by the runtime's limiter at
;; instantiation (one memory); must be refused at verification.
(module
  (memory (export "memory") 1)
  (memory 1)
  (func (export "edge_abi_v1")))
