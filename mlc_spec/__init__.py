"""mlc_spec: exact speculative decoding over TVM-compiled Llama-family models."""
