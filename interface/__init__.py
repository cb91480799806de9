"""What the compiler and the runtime agree on: the artifact folder's schema and the kernels' signatures.

Installed as mlc_spec.interface. It imports neither side (nor TVM), so the compiler can write what the
runtime reads without either importing the other.
"""
