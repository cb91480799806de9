#!/usr/bin/env bash
# Build apache/tvm with Vulkan (and LLVM) from a source checkout into wheels cached under the user's cache
# folder, and install them into a virtual environment of their own, so that the PyPI TVM of the main
# install is untouched:
#
#   tools/build_tvm_vulkan.sh /path/to/tvm          # a `git clone --recursive` of apache/tvm
#   ~/.cache/mlc_spec/tvm-vulkan/venv/bin/python -m pytest tests/test_cross_backend.py
#
# The pinned TVM is 0.27: check out its release commit (tag v0.27.0) if the checkout has it; otherwise the
# nearest commit on main is built, and the wheel's version names the commit either way
# (0.27.dev0+vulkan.g<commit>). The CMake build folder is kept in the cache, so an interrupted build
# resumes where it stopped. Debian packages it needs: libvulkan-dev spirv-headers spirv-tools llvm-15-dev
# cmake ninja-build (and mesa-vulkan-drivers for lavapipe, the CPU Vulkan device the tests run on).
# Environment: LLVM_CONFIG (default llvm-config-15, else llvm-config), JOBS (default: all cores),
# NICE (default 0; 19 to build beside other work).
set -euo pipefail

SRC=$(cd "${1:?usage: tools/build_tvm_vulkan.sh TVM_SOURCE_CHECKOUT}" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/mlc_spec/tvm-vulkan"
LLVM_CONFIG=${LLVM_CONFIG:-$(command -v llvm-config-15 || command -v llvm-config || true)}
JOBS=${JOBS:-$(nproc)}
NICE=${NICE:-0}

fail() { echo "error: $*" >&2; exit 2; }
[ -f "$SRC/CMakeLists.txt" ] && [ -f "$SRC/pyproject.toml" ] || fail "$SRC is not an apache/tvm checkout"
[ -f "$SRC/3rdparty/tvm-ffi/CMakeLists.txt" ] || fail "$SRC has no 3rdparty/tvm-ffi; clone with --recursive (or git submodule update --init --recursive)"
[ -n "$LLVM_CONFIG" ] || fail "no llvm-config found; install llvm-15-dev or set LLVM_CONFIG"
[ -f /usr/include/vulkan/vulkan.h ] || fail "no Vulkan headers; install libvulkan-dev"
command -v spirv-opt >/dev/null || fail "no SPIR-V tools; install spirv-tools and spirv-headers"

commit=$(git -C "$SRC" rev-parse --short=10 HEAD 2>/dev/null || echo unknown)
if git -C "$SRC" rev-parse -q --verify v0.27.0 >/dev/null 2>&1; then
  [ "$(git -C "$SRC" rev-parse HEAD)" = "$(git -C "$SRC" rev-parse v0.27.0^{commit})" ] \
    || echo "note: $SRC has tag v0.27.0 but is at $commit; building $commit"
else
  echo "note: $SRC has no v0.27.0 tag; building the nearest commit on main, $commit"
fi
version="0.27.dev0+vulkan.g$commit"
mkdir -p "$CACHE/wheels"
start=$(date +%s)

# tvm-ffi from the same checkout, so its C++ ABI is the one TVM is compiled against
ls "$CACHE"/wheels/apache_tvm_ffi-*"$commit"*.whl >/dev/null 2>&1 \
  || SETUPTOOLS_SCM_PRETEND_VERSION="0.1.dev0+tvm.g$commit" nice -n "$NICE" \
       python -m pip wheel --no-deps -w "$CACHE/wheels" "$SRC/3rdparty/tvm-ffi" \
       --config-settings=build-dir="$CACHE/build-ffi-$commit"
SETUPTOOLS_SCM_PRETEND_VERSION="$version" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" nice -n "$NICE" \
  python -m pip wheel --no-deps -w "$CACHE/wheels" "$SRC" \
  --config-settings=build-dir="$CACHE/build-$commit" \
  --config-settings=cmake.version=">=3.26" \
  --config-settings=cmake.define.USE_LLVM="$LLVM_CONFIG" \
  --config-settings=cmake.define.USE_VULKAN=ON \
  --config-settings=cmake.define.USE_CUDA=OFF

# The venv sees the main install's packages (torch, transformers, ...) but its own TVM shadows the PyPI one.
python -m venv --system-site-packages "$CACHE/venv"
"$CACHE/venv/bin/pip" install --quiet --force-reinstall --no-deps "$CACHE"/wheels/apache_tvm_ffi-*"$commit"*.whl \
  "$CACHE"/wheels/apache_tvm-*"$commit"*.whl
"$CACHE/venv/bin/pip" install --quiet --no-deps -e "$REPO"
"$CACHE/venv/bin/python" -c "import tvm; assert tvm.support.libinfo()['USE_VULKAN'] == 'ON'; print('TVM', tvm.__version__, 'with Vulkan')"
echo "built TVM $version with Vulkan in $(( ($(date +%s) - start) / 60 )) min; use $CACHE/venv/bin/python"
