"""mlc_spec.runtime: loads compiled model libraries and runs exact speculative decoding.

It imports only tvm.runtime, never the compiler or the model definitions."""
