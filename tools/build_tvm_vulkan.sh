#!/usr/bin/env bash
# Build apache/tvm with Vulkan (and LLVM) from a source checkout into wheels cached under the user's cache
# folder, and install them into a virtual environment of their own, so that the PyPI TVM of the main
# install is untouched:
#
#   tools/build_tvm_vulkan.sh /path/to/tvm          # a `git clone --recursive` of apache/tvm
#   ~/.cache/mlc_spec/tvm-vulkan/venv/bin/python -m pytest tests/test_cross_backend.py
#
# It builds the commit of the TVM this project's install has (`tvm._version.commit_id`: 7b5acb32b for
# apache-tvm 0.27.0.post1) and refuses any other: the project speaks that TVM's Python API, and other
# commits differ (main before September 2026 has tvm.arith where 0.27 has tvm.sym, tirx.BufferLoad where
# it has ir.TensorLoad), so a TVM built from them cannot compile this project's models. The wheel's
# version names the commit (<version>+vulkan.g<commit>). The build tools live in a virtual environment of
# their own in the cache and pip builds without isolation, so every compile command names the same paths
# from one run to the next and an interrupted build resumes where it stopped in the kept CMake build folder
# (an isolated build names a fresh temporary folder each time, and ninja then recompiles all ~600 files,
# about 75 minutes on 2 cores). Debian packages it needs: libvulkan-dev spirv-headers spirv-tools llvm-15-dev
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

read -r pinned_version pinned_commit < <(python -c "import tvm._version as v; print(v.version, v.commit_id.lstrip('g'))") \
  || fail "no TVM in $(command -v python); install this project first (pip install -e .)"
git -C "$SRC" cat-file -e "$pinned_commit^{commit}" 2>/dev/null \
  || fail "$SRC lacks commit $pinned_commit, the source of the installed apache-tvm $pinned_version; fetch it (git -C $SRC fetch origin $pinned_commit, or a fresh git clone --recursive) and check it out"
commit=$(git -C "$SRC" rev-parse --short=10 HEAD)
[ "$(git -C "$SRC" rev-parse HEAD)" = "$(git -C "$SRC" rev-parse "$pinned_commit^{commit}")" ] \
  || fail "$SRC is at $commit, not $pinned_commit (apache-tvm $pinned_version); git -C $SRC checkout $pinned_commit && git -C $SRC submodule update --init --recursive"
version="$pinned_version+vulkan.g$commit"
mkdir -p "$CACHE/wheels"
start=$(date +%s)

TOOLS="$CACHE/build-tools"
[ -x "$TOOLS/bin/python" ] || python -m venv "$TOOLS"
"$TOOLS/bin/pip" install --quiet "scikit-build-core>=0.11" "setuptools-scm>=8" "cython>=3.2.8" "cmake>=3.26" ninja

# tvm-ffi from the same checkout, so its C++ ABI is the one TVM is compiled against
ls "$CACHE"/wheels/apache_tvm_ffi-*"$commit"*.whl >/dev/null 2>&1 \
  || SETUPTOOLS_SCM_PRETEND_VERSION="0.1.dev0+tvm.g$commit" nice -n "$NICE" \
       "$TOOLS/bin/python" -m pip wheel --no-deps --no-build-isolation -w "$CACHE/wheels" "$SRC/3rdparty/tvm-ffi" \
       --config-settings=build-dir="$CACHE/build-ffi-$commit"
# No Z3: the static libz3 of mlc-z3-static is built with a newer libstdc++ than Debian 12's GCC 12 and does not
# link (undefined _M_replace_cold, __cxa_call_terminate); TVM's Z3 prover is optional and falls back to a stub.
SETUPTOOLS_SCM_PRETEND_VERSION="$version" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" nice -n "$NICE" \
  "$TOOLS/bin/python" -m pip wheel --no-deps --no-build-isolation -w "$CACHE/wheels" "$SRC" \
  --config-settings=build-dir="$CACHE/build-$commit" \
  --config-settings=cmake.version=">=3.26" \
  --config-settings=cmake.define.USE_LLVM="$LLVM_CONFIG" \
  --config-settings=cmake.define.USE_VULKAN=ON \
  --config-settings=cmake.define.USE_CUDA=OFF \
  --config-settings=cmake.define.USE_Z3=OFF

# The venv sees the main install's packages (torch, transformers, ...) but its own TVM shadows the PyPI one.
python -m venv --system-site-packages "$CACHE/venv"
"$CACHE/venv/bin/pip" install --quiet --force-reinstall --no-deps "$CACHE"/wheels/apache_tvm_ffi-*"$commit"*.whl \
  "$CACHE"/wheels/apache_tvm-*"$commit"*.whl
"$CACHE/venv/bin/pip" install --quiet --no-deps -e "$REPO"
"$CACHE/venv/bin/python" -c "import tvm; assert tvm.support.libinfo()['USE_VULKAN'] == 'ON'; print('TVM', tvm.__version__, 'with Vulkan')"
echo "built TVM $version with Vulkan in $(( ($(date +%s) - start) / 60 )) min; use $CACHE/venv/bin/python"
