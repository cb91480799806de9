"""Cross-backend consistency: the same tokens and the same accept/reject decisions on every backend.

Whole model: three CPU code generators that really differ (baseline x86-64 LLVM, LLVM for this CPU's
vector ISA with FMA, and TVM's C source built by the system C compiler) give identical greedy and
sampled tokens, identical verify decisions, and logits within 1e-4.

Kernels: the GPU schedules of compile/kernels/, in the OpenCL C and WGSL that TVM generates, run on
pocl and on Mesa's lavapipe (through pyopencl and wgpu-py), launched here the way TVM's host code
would; every kernel call that tests/test_kernels.py makes must decide as the LLVM build does.

Vulkan, Metal and CUDA run where the installed TVM and the machine have them; elsewhere they skip
with the reason. Every comparison's figures (largest logit or probability difference, number of
differing decisions) are printed in a table at the end of the session.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir.instrument import pass_instrument
from tvm.sym import Analyzer

import test_kernels  # its cases, replayed on the GPU-style runtimes
from helpers import VOCAB, CpuKernels, prompts
from mlc_spec import Engine
from mlc_spec.compile import kernels
from mlc_spec.compile.config import CompileError
from mlc_spec.compile.targets import host_target
from mlc_spec.consistency import differing, forward_logits, generate_with_decisions
from mlc_spec.runtime.library import tvm_device

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------
# Figures: one row per pair of backends, printed when the session ends

FIGURES: dict[str, dict] = {}


def record(pair: str, difference: float = 0.0, decisions: int = 0) -> None:
    row = FIGURES.setdefault(pair, {"difference": 0.0, "decisions": 0})
    row["difference"] = max(row["difference"], float(difference))
    row["decisions"] += int(decisions)


def record_not_run(pair: str, reason: str) -> None:
    FIGURES[pair] = {"not run": reason}


class _FigureTable:
    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_sep("-", "cross-backend figures")
        for pair, row in FIGURES.items():
            if "not run" in row:
                terminalreporter.write_line(f"{pair:<30} not run: {row['not run']}")
            else:
                terminalreporter.write_line(f"{pair:<30} largest difference {row['difference']:.3g}, "
                                            f"differing decisions {row['decisions']}")


@pytest.fixture(scope="module", autouse=True)
def figure_table(request):
    if not request.config.pluginmanager.has_plugin("cross-backend-figures"):
        request.config.pluginmanager.register(_FigureTable(), "cross-backend-figures")


# ---------------------------------------------------------------------------------------------------
# Whole model on three CPU code generators

CODEGENS = {
    "llvm-generic": {"kind": "llvm"},  # baseline x86-64: SSE2, no FMA
    "llvm-host": host_target(),  # this CPU's vector ISA; LLVM contracts into FMA
    "c": {"kind": "c"},  # TVM's C source, compiled by the system C compiler
}
REFERENCE = "llvm-generic"
OTHERS = [name for name in CODEGENS if name != REFERENCE]
NUM_PROMPTS = 50
MODES = {
    "greedy speculative": dict(draft_length=4),
    "greedy target-only": dict(speculative=False),
    "sampled speculative": dict(draft_length=4, temperature=0.8, top_p=0.9, seed=3),
    "greedy tree": dict(speculative="tree", tree_width=2, tree_depth=3),
    "sampled tree": dict(speculative="tree", tree_width=2, tree_depth=3, temperature=0.8, top_p=0.9, seed=3),
}
LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def codegen_artifacts(artifacts):
    # The same checkpoints as test_speculative's target and partially agreeing draft.
    target = artifacts.checkpoint("llama-gqa2-untied", arch="llama", vocab_size=VOCAB)
    draft = artifacts.checkpoint("perturbed", arch="llama", vocab_size=VOCAB, perturb_from=target, noise=0.1)
    return {name: artifacts.compile(f"codegen-{name}", target, draft, max_seq_len=128, cpu_target=codegen)
            for name, codegen in CODEGENS.items()}


@pytest.fixture(scope="module")
def codegen_outputs(codegen_artifacts):
    batch = prompts(NUM_PROMPTS)
    return {name: {mode: generate_with_decisions(Engine(folder, max_batch_size=8), batch, max_tokens=40,
                                                 stop_at_eos=False, **opts)
                   for mode, opts in MODES.items()}
            for name, folder in codegen_artifacts.items()}


def test_c_artifact_is_c_source_built_for_the_cpu(codegen_artifacts):
    config = json.loads((codegen_artifacts["c"] / "mlc_spec_config.json").read_text())
    assert config["device"] == "cpu" and config["target"] == {"kind": "c"}
    generic = json.loads((codegen_artifacts[REFERENCE] / "mlc_spec_config.json").read_text())
    assert generic["target"] == {"kind": "llvm"}


@pytest.mark.parametrize("name", OTHERS)
def test_logits_agree_across_codegens(codegen_artifacts, name):
    rng = np.random.default_rng(11)
    for ids in (rng.integers(2, VOCAB, 40).tolist() for _ in range(4)):
        want = forward_logits(codegen_artifacts[REFERENCE], "cpu", ids, (30, 35))
        got = forward_logits(codegen_artifacts[name], "cpu", ids, (30, 35))
        record(f"{REFERENCE} vs {name}", difference=max(np.abs(got[k] - want[k]).max() for k in want))
    assert FIGURES[f"{REFERENCE} vs {name}"]["difference"] < LOGIT_TOLERANCE


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", OTHERS)
def test_same_tokens_and_decisions_across_codegens(codegen_outputs, name, mode):
    want_tokens, want_decisions = codegen_outputs[REFERENCE][mode]
    tokens, decisions = codegen_outputs[name][mode]
    record(f"{REFERENCE} vs {name}", decisions=differing(want_decisions, decisions))
    assert len(tokens) == NUM_PROMPTS
    assert tokens == want_tokens, f"{differing(want_tokens, tokens)} of {NUM_PROMPTS} prompts differ"
    assert decisions == want_decisions


@pytest.mark.parametrize("name", CODEGENS)
@pytest.mark.parametrize("mode", ["greedy speculative", "greedy tree"])
def test_greedy_speculative_is_exact_on_each_codegen(codegen_outputs, name, mode):
    assert codegen_outputs[name][mode][0] == codegen_outputs[name]["greedy target-only"][0]


# ---------------------------------------------------------------------------------------------------
# The GPU schedules of the kernels, on OpenCL (pocl) and WebGPU (lavapipe)

# Statistical tests (tens of thousands of sequences, far too many workgroups for a CPU-emulated GPU); its decisions
# are covered by the ragged and edge cases.
_STATISTICAL_KERNEL_TESTS = {"test_first_emitted_token_follows_the_target",
                             "test_tree_first_emitted_token_follows_the_target"}


class _Recorder:
    """Stands in for test_kernels' `cpu` fixture: answers with the LLVM build, keeping every call."""

    def __init__(self, kernels_):
        self._kernels = kernels_
        self.calls = []

    def __getattr__(self, name):
        def call(*args):
            result = getattr(self._kernels, name)(*args)
            self.calls.append((name, args, result))
            return result

        return call


def _parametrizations(test):
    marks = [m for m in getattr(test, "pytestmark", []) if m.name == "parametrize"]
    names = [m.args[0] for m in marks]
    for values in itertools.product(*(m.args[1] for m in marks)):
        yield dict(zip(names, values))


@pytest.fixture(scope="module")
def kernel_calls():
    """Every kernel call of tests/test_kernels.py's cases (whose own assertions run again here), with
    the LLVM build's answer."""
    recorder = _Recorder(CpuKernels())
    for name, test in inspect.getmembers(test_kernels, inspect.isfunction):
        if name.startswith("test_") and "cpu" in inspect.signature(test).parameters \
                and name not in _STATISTICAL_KERNEL_TESTS:
            for params in _parametrizations(test):
                test(cpu=recorder, **params)
    return recorder.calls


@pass_instrument
class _BeforeMakePackedAPI:
    """Keeps the module MakePackedAPI is given: host functions there still take buffers, and say in
    plain TIR which scratch buffers they allocate, which scalars they compute and what they launch."""

    def __init__(self):
        self.module = None

    def run_before_pass(self, mod, info):
        if info.name == "tirx.MakePackedAPI":
            self.module = mod


@functools.cache
def lower_gpu_schedules(kind: str):
    """TVM's device source for the GPU schedules, and the lowered module (host and device functions)."""
    target = tvm.target.Target({"kind": kind}, host={"kind": "llvm"})
    funcs = kernels.scheduled_kernels(target)
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    capture = _BeforeMakePackedAPI()
    with tvm.transform.PassContext(instruments=[capture]), target:
        lib = tvm.compile(mod, target=target)
    return lib.mod.imports[0].inspect_source(), capture.module


def split_source(source: str) -> dict[str, str]:
    """One compilation unit per kernel: TVM heads each with '// Function: NAME' (WGSL repeats the
    head inside a banner, so the last chunk of a name is its code)."""
    parts = re.split(r"^// Function: (\w+)$", source, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


class HostProgram:
    """A kernel's host function, interpreted: shape variables bound from the arrays, scalars
    evaluated, scratch buffers allocated, device kernels launched in order with TVM's geometry."""

    def __init__(self, func: tirx.PrimFunc, device_funcs: dict[str, tirx.PrimFunc]):
        self.params = list(func.params)
        self.device_funcs = device_funcs
        self.steps = []
        statements = (tirx.Bind, tirx.AllocBuffer, tirx.DeclBuffer, tirx.Evaluate)
        tvm_ffi.structural_walk(func.body, (statements, self.steps.append), order="pre")

    def run(self, runtime, arrays: list[np.ndarray], num_outputs: int) -> list[np.ndarray]:
        analyzer, buffers = Analyzer(), {}
        for param, array in zip(self.params, arrays):
            for dim, size in zip(param.shape, array.shape):
                if isinstance(dim, tirx.Var):
                    analyzer.bind(dim, tirx.IntImm(str(dim.ty.dtype), size))
            buffers[param] = runtime.upload(array)
        for step in self.steps:
            if isinstance(step, tirx.Bind):
                analyzer.bind(step.var, analyzer.simplify(step.value))
            elif isinstance(step, tirx.AllocBuffer):
                size = int(analyzer.simplify(_product(step.buffer.shape)))
                buffers[step.buffer] = runtime.allocate(size * np.dtype(str(step.buffer.dtype)).itemsize)
            elif isinstance(step, tirx.DeclBuffer):
                buffers[step.buffer] = buffers[step.data.args[0]]
            elif step.value.op.name == "tirx.call_ffi_kernel":
                self._launch(runtime, step.value, analyzer, buffers)
        outputs = zip(self.params[-num_outputs:], arrays[-num_outputs:])
        return [runtime.download(buffers[param], like) for param, like in outputs]

    def _launch(self, runtime, call, analyzer: Analyzer, buffers: dict) -> None:
        name = call.args[0].value
        params = self.device_funcs[name].params
        args = []
        for param, arg in zip(params, call.args[1:]):
            if hasattr(param.ty, "dtype"):  # a scalar, in the dtype of the kernel's parameter
                args.append(np.dtype(str(param.ty.dtype)).type(int(analyzer.simplify(arg))))
            else:  # a buffer, passed as tirx.buffer_data(buffer)
                args.append(buffers[arg.args[0]])
        extents = [int(analyzer.simplify(e)) for e in call.args[1 + len(params):]]
        launch = dict(zip(call.attrs.launch_params, extents))
        grid = tuple(launch.get(f"blockIdx.{axis}", 1) for axis in "xyz")
        block = tuple(launch.get(f"threadIdx.{axis}", 1) for axis in "xyz")
        runtime.launch(name, args, grid, block)


def host_programs(module: tvm.IRModule) -> dict[str, HostProgram]:
    device_funcs = {gv.name_hint: f for gv, f in module.functions.items() if "tirx.kernel_launch_params" in f.attrs}
    return {name: HostProgram(module[name], device_funcs) for name in kernels.KERNEL_NAMES}


def _product(shape):
    total = tirx.IntImm("int64", 1)
    for dim in shape:
        total = total * dim
    return total


class OpenCLRuntime:
    """pocl (or any OpenCL platform) through pyopencl."""

    def __init__(self, sources: dict[str, str]):
        cl = pytest.importorskip("pyopencl", reason="pyopencl is not installed (pip install pyopencl)")
        devices = [d for p in _opencl_platforms(cl) for d in p.get_devices()]
        if not devices:
            pytest.skip("no OpenCL device (apt-get install pocl-opencl-icd ocl-icd-libopencl1)")
        self.cl = cl
        self.device = devices[0]
        self.context = cl.Context([self.device])
        self.queue = cl.CommandQueue(self.context)
        # pocl 3.1 at its default optimisation computes sampling_probs' top-p mass wrongly (too small),
        # for every work-group method; the same source is right unoptimised, and as WGSL on lavapipe.
        self.kernels = {name: getattr(cl.Program(self.context, code).build(options=["-cl-opt-disable"]), name)
                        for name, code in sources.items()}

    def upload(self, array: np.ndarray):
        buffer = self.allocate(array.nbytes)
        if array.nbytes:
            self.cl.enqueue_copy(self.queue, buffer, np.ascontiguousarray(array))
        return buffer

    def allocate(self, nbytes: int):
        return self.cl.Buffer(self.context, self.cl.mem_flags.READ_WRITE, max(nbytes, 4))

    def download(self, buffer, like: np.ndarray) -> np.ndarray:
        out = np.empty_like(like)
        self.cl.enqueue_copy(self.queue, out, buffer)
        return out

    def launch(self, name: str, args: list, grid: tuple, block: tuple) -> None:
        kernel = self.kernels[name]
        kernel.set_args(*args)
        global_size = tuple(g * b for g, b in zip(grid, block))
        self.cl.enqueue_nd_range_kernel(self.queue, kernel, global_size, block)


def _opencl_platforms(cl):
    try:
        return cl.get_platforms()
    except cl.LogicError:  # the ICD loader found no platform at all
        return []


class WebGPURuntime:
    """wgpu-py on its default adapter (Mesa's lavapipe here), binding arguments as TVM's WebGPU
    runtime (web/src/webgpu.ts) does: buffers at bindings 0.., then one uniform with the scalars as
    i32/u32/f32 followed by packGridDimX, the grid's x extent."""

    def __init__(self, sources: dict[str, str]):
        wgpu = pytest.importorskip("wgpu", reason="wgpu is not installed (pip install wgpu)")
        # Mesa's WSI layer complains on stderr when XDG_RUNTIME_DIR is unset; compute needs none.
        os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
        adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
        if adapter is None:
            pytest.skip("no WebGPU adapter (apt-get install mesa-vulkan-drivers for lavapipe)")
        self.wgpu = wgpu
        self.device = adapter.request_device_sync()
        self.pipelines = {name: self.device.create_compute_pipeline(
            layout="auto", compute={"module": self.device.create_shader_module(code=code), "entry_point": name})
            for name, code in sources.items()}

    def _usage(self):
        usage = self.wgpu.BufferUsage
        return usage.STORAGE | usage.COPY_SRC | usage.COPY_DST

    def upload(self, array: np.ndarray):
        if not array.nbytes:
            return self.allocate(0)
        return self.device.create_buffer_with_data(data=np.ascontiguousarray(array), usage=self._usage())

    def allocate(self, nbytes: int):
        return self.device.create_buffer(size=max(nbytes, 4), usage=self._usage())

    def download(self, buffer, like: np.ndarray) -> np.ndarray:
        data = np.frombuffer(self.device.queue.read_buffer(buffer), dtype=like.dtype)
        return data[:like.size].reshape(like.shape).copy()

    def launch(self, name: str, args: list, grid: tuple, block: tuple) -> None:
        pipeline = self.pipelines[name]
        buffers = [a for a in args if not isinstance(a, np.generic)]
        scalars = [a for a in args if isinstance(a, np.generic)]
        entries = [{"binding": i, "resource": {"buffer": b, "offset": 0, "size": b.size}} for i, b in enumerate(buffers)]
        uniform = self._uniform(scalars, grid[0])
        entries.append({"binding": len(buffers), "resource": {"buffer": uniform, "offset": 0, "size": uniform.size}})
        encoder = self.device.create_command_encoder()
        compute = encoder.begin_compute_pass()
        compute.set_pipeline(pipeline)
        compute.set_bind_group(0, self.device.create_bind_group(layout=pipeline.get_bind_group_layout(0), entries=entries))
        compute.dispatch_workgroups(*grid)
        compute.end()
        self.device.queue.submit([encoder.finish()])

    def _uniform(self, scalars: list, grid_x: int):
        words = [_pod_word(s) for s in scalars] + [np.uint32(grid_x).tobytes()]
        data = b"".join(words).ljust(-(-4 * len(words) // 16) * 16, b"\0")
        usage = self.wgpu.BufferUsage.UNIFORM | self.wgpu.BufferUsage.COPY_DST
        return self.device.create_buffer_with_data(data=data, usage=usage)


def _pod_word(value: np.generic) -> bytes:
    kind = {"i": np.int32, "u": np.uint32, "f": np.float32}[value.dtype.kind]
    return kind(value).tobytes()


GPU_RUNTIMES = {"opencl": OpenCLRuntime, "webgpu": WebGPURuntime}


class DeviceKernels(CpuKernels):
    """test_kernels' kernel API over TVM's GPU schedules and generated source on a GPU-style runtime."""

    def __init__(self, kind: str):
        source, module = lower_gpu_schedules(kind)
        self.runtime = GPU_RUNTIMES[kind](split_source(source))
        self.programs = host_programs(module)

    def _call(self, name, inputs, outputs):
        arrays = [np.ascontiguousarray(a) for a in inputs] + [np.zeros(shape, dtype) for shape, dtype in outputs]
        results = self.programs[name].run(self.runtime, arrays, len(outputs))
        return results[0] if len(results) == 1 else tuple(results)


def compare_kernel_results(name: str, want, got) -> tuple[float, int]:
    """(largest probability difference, differing decisions). sampling_probs decides which tokens are
    kept: a probability below float32's normal range is no decision, since GPUs may flush it to zero."""
    if name == "sampling_probs":
        decided = np.maximum(got, want) >= np.finfo(np.float32).tiny
        return float(np.abs(got - want).max()), int(((got > 0) != (want > 0))[decided].sum())
    pairs = zip(want, got) if isinstance(want, tuple) else [(want, got)]
    return 0.0, int(sum((w != g).sum() for w, g in pairs))


# WGSL's exp is accurate to 3 + 2|x| ulp (about 1e-5 relative at the softmax's range), LLVM's to 1 ulp.
PROBABILITY_TOLERANCE = 1e-5


# WGSL refuses identifiers that start with "__" and reserved words such as `target`; TVM 0.27's WebGPU
# code generator copies TIR names into the source unchanged.
_WGSL_REFUSED_NAME = re.compile(r"\b(?:let|var)\s+(__\w*|target)\b")


@pytest.mark.parametrize("kind", GPU_RUNTIMES)
def test_gpu_schedules_decide_like_llvm(kernel_calls, kind):
    pair = f"llvm vs {kind} kernels"
    refused = sorted(set(_WGSL_REFUSED_NAME.findall(lower_gpu_schedules(kind)[0]))) if kind == "webgpu" else []
    if refused:
        reason = f"TVM's WGSL declares names WGSL refuses ({', '.join(refused)}): rename them in compile/kernels/"
        record_not_run(pair, reason)
        pytest.xfail(reason)
    device = DeviceKernels(kind)
    record(pair)
    failures = []
    for name, args, want in kernel_calls:
        difference, decisions = compare_kernel_results(name, want, getattr(device, name)(*args))
        record(pair, difference, decisions)
        if decisions or difference > PROBABILITY_TOLERANCE:
            failures.append(f"{name}: {decisions} decisions differ, largest difference {difference:.3g}")
    assert len(kernel_calls) > 40
    assert not failures, failures


def test_launch_geometry_is_read_from_the_lowered_host_code():
    """verify_greedy's walk runs one thread per sequence in blocks of 256; its kernel is passed the
    batch size, and its grid is ceil(batch / 256): a batch of 300 needs two blocks."""
    launches = []

    class Launches:
        def upload(self, array):
            return array

        allocate = upload

        def download(self, buffer, like):
            return like

        def launch(self, name, args, grid, block):
            launches.append((name, [a for a in args if isinstance(a, np.generic)], grid, block))

    program = host_programs(lower_gpu_schedules("opencl")[1])["verify_greedy"]
    batch, rows, vocab = 300, 900, 33
    arrays = [np.zeros((rows, vocab), np.float32), np.zeros(rows - batch, np.int32), np.zeros(batch + 1, np.int32),
              np.zeros(batch, np.int32), np.zeros(batch, np.int32)]
    program.run(Launches(), arrays, 2)
    assert launches == [("verify_greedy_kernel", [rows, vocab], (rows, 1, 1), (256, 1, 1)),
                        ("verify_greedy_kernel_1", [batch], (2, 1, 1), (256, 1, 1))]


# ---------------------------------------------------------------------------------------------------
# Backends this TVM or this machine may lack: picked up when present, a clear error otherwise

def _libinfo_on(option: str) -> bool:
    return tvm.support.libinfo().get(option) == "ON"


def test_metal_matches_cpu(artifacts, codegen_outputs):
    if not _libinfo_on("USE_METAL"):
        record_not_run("cpu vs metal", "this TVM is built with USE_METAL=OFF")
        pytest.skip("this TVM is built with USE_METAL=OFF (README.md, 'Other backends')")
    target = artifacts.checkpoint("llama-gqa2-untied", arch="llama", vocab_size=VOCAB)
    draft = artifacts.checkpoint("perturbed", arch="llama", vocab_size=VOCAB, perturb_from=target, noise=0.1)
    folder = artifacts.compile("codegen-metal", target, draft, max_seq_len=128, device="metal")
    if not tvm.device("metal", 0).exist:
        record_not_run("cpu vs metal", "built, but no device on this machine")
        pytest.skip("metal artifact built; no metal device on this machine to run it")
    engine = Engine(folder, device="metal", max_batch_size=8)
    want_tokens, want_decisions = codegen_outputs[REFERENCE]["greedy speculative"]
    tokens, decisions = generate_with_decisions(engine, prompts(NUM_PROMPTS), max_tokens=40, stop_at_eos=False,
                                                **MODES["greedy speculative"])
    record("cpu vs metal", decisions=differing(want_decisions, decisions))
    assert tokens == want_tokens


# The Python of an environment whose TVM has Vulkan (tools/build_tvm_vulkan.sh makes one): this
# variable, else the script's own venv; the PyPI TVM the suite runs with has none.
VULKAN_PYTHON_ENV = "MLC_SPEC_VULKAN_PYTHON"


def vulkan_python() -> Path | None:
    if _libinfo_on("USE_VULKAN"):
        return Path(sys.executable)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    candidate = Path(os.environ.get(VULKAN_PYTHON_ENV) or cache / "mlc_spec" / "tvm-vulkan" / "venv" / "bin" / "python")
    return candidate if candidate.is_file() else None


def _default_pair() -> list[str]:
    from mlc_spec.default_model import default_sources

    gguf, draft = default_sources(log=lambda _m: None)
    return ["--checkpoint", str(gguf)] + (["--draft", str(draft)] if draft else [])


def _install_this_checkout(python: Path) -> None:
    """The Vulkan environment's mlc_spec is an editable install; point it at the checkout under test."""
    where = subprocess.run([str(python), "-c", "import mlc_spec, pathlib; print(pathlib.Path(mlc_spec.__file__).parents[1])"],
                           capture_output=True, text=True).stdout.strip()
    if where != str(REPO):
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                        "-e", str(REPO)], check=True, capture_output=True)


@pytest.mark.parametrize("pair", ["test pair", "default pair"])
def test_vulkan_matches_cpu(tmp_path, pair):
    """tools/device_check.sh with --device vulkan, on this machine's Vulkan device (lavapipe here): float32
    tokens and verify decisions equal to the CPU reference's in every mode, greedy and sampled, chains,
    trees and n-grams; float16 within a mismatch rate; the logits within LOGIT_TOLERANCE in float32."""
    python = vulkan_python()
    if python is None:
        record_not_run(f"cpu vs vulkan ({pair})", "no TVM with Vulkan")
        pytest.skip(f"no TVM with Vulkan: tools/build_tvm_vulkan.sh builds one into its venv, or set {VULKAN_PYTHON_ENV}")
    _install_this_checkout(python)
    checkpoints = [] if pair == "test pair" else _default_pair()
    work = tmp_path / "vulkan-check"
    result = subprocess.run(["bash", str(REPO / "tools" / "device_check.sh"), "both", "--device", "vulkan",
                             "--work", str(work), *checkpoints], env={**os.environ, "PYTHON": str(python)},
                            capture_output=True, text=True, timeout=3600, cwd=REPO)
    if "no vulkan device visible" in result.stdout + result.stderr:
        record_not_run(f"cpu vs vulkan ({pair})", "no Vulkan device (apt-get install mesa-vulkan-drivers)")
        pytest.skip("no Vulkan device on this machine (apt-get install mesa-vulkan-drivers for lavapipe)")
    report_file = work / "report.json"
    assert report_file.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    consistency = json.loads(report_file.read_text())["consistency"]
    for dtype, row in consistency.items():
        record(f"cpu vs vulkan {dtype} ({pair})", row["largest_logit_difference"], row["differing_decisions"])
    assert consistency["float32"]["most_mismatched_prompts"] == 0, consistency
    assert consistency["float32"]["differing_decisions"] == 0, consistency
    assert consistency["float32"]["largest_logit_difference"] < LOGIT_TOLERANCE, consistency
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("device", ["vulkan", "metal", "opencl", "webgpu", "cuda"])
def test_engine_device_this_machine_cannot_run_is_a_clear_error(device):
    if tvm.device(device, 0).exist:
        pytest.skip(f"this machine can run {device}")
    with pytest.raises(RuntimeError, match=f"device '{device}' is not available on this machine"):
        tvm_device(device)


def test_engine_on_an_artifact_for_a_missing_runtime_is_a_clear_error(artifacts):
    """An OpenCL library builds here (source only), but this TVM has no OpenCL runtime to run it."""
    if tvm.device("opencl", 0).exist:
        pytest.skip("this TVM and machine can run OpenCL")
    ckpt = artifacts.checkpoint("llama-gqa2-untied", arch="llama", vocab_size=VOCAB)
    folder = artifacts.compile("llama-opencl", ckpt, device="opencl")
    with pytest.raises(RuntimeError, match="no driver or no opencl runtime in this TVM"):
        Engine(folder, device="opencl")


@pytest.mark.skipif(_libinfo_on("USE_VULKAN"), reason="this TVM can build Vulkan")
def test_compiling_for_a_backend_this_tvm_cannot_build_is_a_clear_error(artifacts, tmp_path):
    from mlc_spec.compile.build import CompileOptions, compile_artifact

    ckpt = artifacts.checkpoint("llama-gqa2-untied", arch="llama", vocab_size=VOCAB)
    with pytest.raises(CompileError, match="cannot generate vulkan code.*USE_VULKAN=ON"):
        compile_artifact(ckpt, output=tmp_path / "a", options=CompileOptions(device="vulkan"), log=lambda _m: None)
    assert not (tmp_path / "a").exists()


def test_cpu_target_is_only_for_cpu_code_generators(artifacts, tmp_path):
    from mlc_spec.compile.build import CompileOptions, compile_artifact

    ckpt = artifacts.checkpoint("llama-gqa2-untied", arch="llama", vocab_size=VOCAB)
    for device, codegen in (("cpu", {"kind": "cuda"}), ("cuda", {"kind": "c"})):
        with pytest.raises(CompileError, match="cpu_target is for device cpu"):
            compile_artifact(ckpt, output=tmp_path / "a", options=CompileOptions(device=device, cpu_target=codegen),
                             log=lambda _m: None)


# ---------------------------------------------------------------------------------------------------
# CUDA against the CPU: tools/device_check.sh on a GPU machine; its CPU half here

def test_device_check_cpu_half(tmp_path):
    """The prepared GPU script end to end with the CPU standing in for CUDA: artifacts, a runtime-only
    TVM, the consistency run in a process that cannot import the compiler, and the benchmark."""
    work = tmp_path / "device-check"
    result = subprocess.run(["bash", str(REPO / "tools" / "device_check.sh"), "--cpu-only", "--work", str(work)],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((work / "report.json").read_text())
    assert report["devices"] == ["cpu"]
    assert report["consistency"]["float32"]["most_mismatched_prompts"] == 0
    assert report["consistency"]["float32"]["differing_decisions"] == 0
    assert report["bench"]["cpu"]["float32"]["speculative"] > 0
    if tvm.device("cuda", 0).exist:
        return
    record_not_run("cpu vs cuda", "no GPU here (run tools/device_check.sh on a GPU machine)")
