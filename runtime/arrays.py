"""Small arrays between numpy and a device, without tvm.runtime's per-call overhead.

tvm.runtime.tensor(array) allocates a tensor and copies into it through several layers of Python:
26 us for five token ids, and Tensor.numpy() 10 us, a few dozen times per speculative round. On the
CPU both go through DLPack instead (1-2 us): an aligned copy of the array is shared with TVM, and a
tensor's values are copied out of a shared view.
"""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi

ALIGNMENT = 64  # bytes: TVM's compiled kernels assume their buffers start at this alignment
_CPU = 1  # DLPack's kDLCPU


def to_device(array, dev, dtype=None) -> tvm.runtime.Tensor:
    """A copy of array (as dtype, if given) in a tensor on dev."""
    array = np.asarray(array, dtype)
    if dev.dlpack_device_type() != _CPU:
        return tvm.runtime.tensor(np.ascontiguousarray(array), dev)
    buffer = np.empty(array.nbytes + ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % ALIGNMENT
    aligned = buffer[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    aligned[...] = array
    return tvm_ffi.from_dlpack(aligned)


def to_host(tensor: tvm.runtime.Tensor) -> np.ndarray:
    """A tensor's values in a numpy array of their own (TVM may reuse the tensor's memory)."""
    if tensor.device.dlpack_device_type() != _CPU:
        return tensor.numpy()
    return np.from_dlpack(tensor).copy()
