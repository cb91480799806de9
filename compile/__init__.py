"""mlc_spec.compile: checkpoints -> TVM model libraries (model definition, kernels, passes, build)."""
