"""Group-quantized weights: the same blocks as llama.cpp; compiled, llama.cpp's integer numerics on this
CPU (the same logits for a token in any forward) and the dequantized float model on a generic one; and
greedy speculative output equal to the same quantized target alone."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gguf_files import random_blocks, write_k_mix_gguf
from helpers import VOCAB, assert_empty, compile_error, generate_all, prompts, run_forwards
from mlc_spec.consistency import all_logits, target_library
from mlc_spec.compile.quantization import (FORMATS, HIGH_BITS, KEPT, code_offset, from_gguf_blocks, high_bit_offset,
                                           pack, quantize)

TYPES = {fmt: gguf.GGMLQuantizationType[fmt.upper()] for fmt in KEPT}
K_QUANTS = [fmt for fmt in KEPT if fmt not in FORMATS]


def weights(rows=6, cols=96, seed=0):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero group: scale 0, no division by it
    w[1, 32:64] = 3.0  # a constant group: max == min
    return w


@pytest.mark.parametrize("fmt", FORMATS)
def test_blocks_are_llama_cpp_blocks(fmt):
    """Our quantizer makes the bytes gguf's reference quantizer makes; decoding them gives gguf's dequantization."""
    w = weights()
    raw = gguf.quants.quantize(w, TYPES[fmt])
    theirs = from_gguf_blocks(raw, fmt.upper(), w.shape)
    ours = quantize(w, fmt)
    np.testing.assert_array_equal(ours.codes, theirs.codes)
    np.testing.assert_array_equal(ours.scale, theirs.scale)
    if ours.min is not None:
        np.testing.assert_array_equal(ours.min, theirs.min)
    np.testing.assert_array_equal(theirs.dequantize(), gguf.quants.dequantize(raw, TYPES[fmt]))


@pytest.mark.parametrize("fmt", K_QUANTS)
def test_k_quant_blocks_decode_to_gguf_dequantization(fmt):
    """A file's K-quant blocks, kept as codes and scales, are exactly the weights gguf-py dequantizes."""
    raw = random_blocks(TYPES[fmt], 6, 512)
    kept = from_gguf_blocks(raw, fmt.upper(), (6, 512))
    np.testing.assert_array_equal(kept.dequantize(), gguf.quants.dequantize(raw, TYPES[fmt]))


def quantized_weights(fmt: str, rows: int, cols: int, seed: int = 0):
    """Blocks of fmt: made by our quantizer, or (K-quants, which are only kept) random ones."""
    if fmt in FORMATS:
        return quantize(weights(rows, cols, seed), fmt)
    return from_gguf_blocks(random_blocks(TYPES[fmt], rows, cols, seed), fmt.upper(), (rows, cols))


@pytest.mark.parametrize("fmt", FORMATS)
def test_requantizing_dequantized_blocks_is_lossless(fmt):
    """A draft given the target's dequantized embedding gets the very same blocks back."""
    q = quantize(weights(seed=1), fmt)
    again = quantize(q.dequantize(), fmt)
    np.testing.assert_array_equal(again.codes, q.codes)
    np.testing.assert_array_equal(again.scale, q.scale)


@pytest.mark.parametrize("fmt", KEPT)
def test_packed_layout_holds_every_code(fmt):
    """pack's arrays, read back the way model.Linear reads them, give w[out, in]."""
    q, tile = quantized_weights(fmt, 70, 512), 16
    p = pack(q, tile)
    out, k = q.shape
    j, t = np.arange(out) // tile, np.arange(out) % tile
    cols = np.arange(k)
    if q.bits < 8:
        words = p["weight"][j[:, None], cols[None] // 8, t[:, None]]
        codes = (words >> code_offset(4, cols[None]).astype(np.uint32)) & 15
        if q.bits in HIGH_BITS:
            high = p["high_bits"][j[:, None], cols[None] // HIGH_BITS[q.bits], t[:, None]]
            codes |= ((high >> high_bit_offset(q.bits, cols[None]).astype(np.uint32)) & ((1 << (q.bits - 4)) - 1)) << 4
    else:
        codes = p["weight"][j[:, None], cols[None] // 4, t[:, None], cols[None] % 4]
    layout = q.layout
    at = lambda a, size: a[j[:, None], cols[None] // size, :, t[:, None]].astype(np.float32)  # noqa: E731
    scales = at(p["scales"], layout.block)
    if layout.super_blocks:
        sub = at(p["sub_scales"], layout.group)
        scales = np.stack([scales[..., 0] * sub[..., 0], -(scales[..., 1] * sub[..., 1])], -1) if layout.has_min \
            else scales * sub
    got = (codes.astype(np.float32) - np.float32(layout.offset)) * scales[..., 0]
    if layout.has_min:
        got += scales[..., 1]
    np.testing.assert_array_equal(got, q.dequantize())
    assert not p["weight"][-1, :, out % tile:].any()  # padding columns are zero


# -- compiled models ----------------------------------------------------------------------------------
def dequantized_copy(src, dst, fmt):
    """The checkpoint with every linear (and the tied head) replaced by its dequantized weights."""
    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors"))
    for name, w in state.items():
        if w.ndim == 2:
            state[name] = torch.from_numpy(quantize(w.numpy(), fmt).dequantize())
    save_file(state, str(dst / "model.safetensors"))
    return dst


GENERIC_CPU = {"kind": "llvm"}  # no integer dot product: the float path


def quantized_pair(artifacts, tmp_path, fmt, **options):
    """A tiny tied model compiled with fmt, and the float model on its dequantized weights."""
    ckpt = artifacts.checkpoint("quant-tied", vocab_size=320, tie_word_embeddings=True)
    name = f"quant-{fmt}" + ("-float-path" if options else "")
    quantized = artifacts.compile(name, ckpt, quantization=fmt, **options)
    reference = artifacts.compile(f"quant-{fmt}-reference", dequantized_copy(ckpt, tmp_path / "deq", fmt),
                                  quantization="none")
    return quantized, reference


@pytest.mark.parametrize("fmt", FORMATS)
def test_float_path_equals_float_model_on_dequantized_weights(artifacts, tmp_path, fmt):
    """Without an integer dot product, the quantized matmul computes the float model on the dequantized
    weights (summed per group, scale * sum(x * code) + min * sum(x), so only float32 rounding differs),
    for prefill, decode and verify, and the tied head's embedding rows are the dequantized ones."""
    quantized, reference = quantized_pair(artifacts, tmp_path, fmt, cpu_target=GENERIC_CPU)
    ids = np.random.default_rng(2).integers(0, 320, 40).tolist()
    config = json.loads((quantized / "mlc_spec_config.json").read_text())["models"]["target"]
    assert config["verify_row_blocks"] == [2, 3, 4]
    for verified in (2, 3, 4, 5, 7):  # verify_2..verify_4, then blocks of 5 (the last one partial)
        split = (30, 31 + verified)
        got, want = run_forwards(quantized, ids, split), run_forwards(reference, ids, split)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=1e-5, err_msg=f"{name} {verified}")
    assert set(config["quantization"].values()) == {fmt} and "lm_head" in config["quantization"]
    reference_bytes = json.loads((reference / "mlc_spec_config.json").read_text())["models"]["target"]["param_bytes"]
    assert config["param_bytes"] < reference_bytes / (3 if fmt == "q8_0" else 5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_integer_path_is_the_float_model_up_to_8_bit_activations(artifacts, tmp_path, fmt):
    """On this CPU's target the matmuls multiply 8-bit activation blocks in integers (llama.cpp's
    numerics): close to the float model on the dequantized weights, with the same next tokens."""
    quantized, reference = quantized_pair(artifacts, tmp_path, fmt)
    ids = np.random.default_rng(2).integers(0, 320, 40).tolist()
    got, want = run_forwards(quantized, ids, (30, 37)), run_forwards(reference, ids, (30, 37))
    for name in want:
        assert np.abs(got[name] - want[name]).max() < 0.05 * np.abs(want[name]).max(), name
        assert (got[name].argmax(-1) == want[name].argmax(-1)).mean() >= 0.8, name


def logits_of(artifact, ids: list[int], prefix: int, how: str) -> np.ndarray:
    """Logits of ids[prefix:] after a prefill of ids[:prefix]: decoded one at a time, verified in one
    forward, or each decoded in a batch beside another sequence."""
    lib = target_library(artifact)
    kv = lib.create_kv_cache(max_batch_size=2, max_total_seq_len=256, prefill_chunk_size=64, page_size=16)
    for seq, prompt in enumerate((ids[:prefix], ids[:prefix][::-1])):  # the other sequence has its own context
        kv.add_sequence(seq)
        lib.forward_last(kv, [seq], [prompt])
    if how == "verify":
        return lib.forward_all(kv, [0], [ids[prefix:]]).numpy()
    seqs = [0] if how == "decode" else [0, 1]
    return np.stack([lib.forward_last(kv, seqs, [[t]] * len(seqs)).numpy()[0] for t in ids[prefix:]])


def assert_verify_and_batch_are_decode(artifact, vocab: int):
    ids = np.random.default_rng(3).integers(0, vocab, 48).tolist()
    for prefix, verified in [(20, 2), (20, 3), (20, 4), (20, 5), (20, 7), (29, 4), (30, 7), (31, 2)]:
        tokens = ids[:prefix + verified]  # the last three verifies end in the next page
        alone = logits_of(artifact, tokens, prefix, "decode")
        np.testing.assert_array_equal(logits_of(artifact, tokens, prefix, "verify"), alone,
                                      err_msg=f"verify {verified} after {prefix}")
    np.testing.assert_array_equal(logits_of(artifact, ids, 20, "batch"), logits_of(artifact, ids, 20, "decode"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_token_gets_the_same_logits_alone_in_a_verify_or_in_a_batch(artifacts, tmp_path, fmt):
    """FM 8. Integer sums are exact and each row sums its groups alike whatever the row block, and a
    verify's attention is one pass like a decode's (compile/cpu_attention.c), so decode, verify_2..
    verify_4, verify in blocks of 5 and batched decode give bit-identical logits: an 8-bit activation
    turns the smallest difference upstream into a different code now and then, and a different token."""
    quantized, _ = quantized_pair(artifacts, tmp_path, fmt)
    assert_verify_and_batch_are_decode(quantized, 320)


def test_quantized_speculation_equals_quantized_target(artifacts, good_checkpoint):
    """Greedy speculative decoding over a q4_1 pair emits exactly what the q4_1 target alone emits."""
    from mlc_spec import Engine

    draft = artifacts.checkpoint("perturbed", arch="llama", vocab_size=VOCAB, perturb_from=good_checkpoint, noise=0.1)
    engine = Engine(artifacts.compile("quant-pair", good_checkpoint, draft, quantization="q4_1", max_seq_len=128),
                    max_batch_size=8)
    batch = prompts(100, seed=5)
    alone = generate_all(engine, batch, max_tokens=24, stop_at_eos=False, speculative=False)
    spec = engine.generate(token_ids=batch[:8], max_tokens=24, stop_at_eos=False, draft_length=4)
    assert generate_all(engine, batch, max_tokens=24, stop_at_eos=False, draft_length=4) == alone
    rate = sum(o.stats["acceptance_rate"] for o in spec) / len(spec)
    assert 0.2 < rate < 1.0  # a draft that partly agrees: accepted and rejected drafts both occurred


# -- K-quants kept from a GGUF ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def q4_k_m(tmp_path_factory):
    """A tiny Q4_K_M-style file: Q4_K linears, Q6_K embedding, and a layer whose fused q/k/v mixes both."""
    return write_k_mix_gguf(tmp_path_factory.mktemp("q4_k_m") / "tiny-q4_k_m.gguf")


@pytest.fixture(scope="session", params=["q4_k_m", "q5_k_m"])
def k_mix(request, tmp_path_factory, q4_k_m):
    """(mix, file): the Q4_K_M-style file, and a Q5_K_M-style one (Q5_K where it has Q4_K)."""
    if request.param == "q4_k_m":
        return request.param, q4_k_m
    return request.param, write_k_mix_gguf(tmp_path_factory.mktemp(request.param) / "tiny.gguf", request.param)


def test_k_quant_float_path_equals_the_expanded_file(artifacts, k_mix):
    """Q4_K (Q5_K) and Q6_K blocks are kept (a mixed fused q/k/v as a run per format) and, without an
    integer dot product, compute the model on gguf's dequantization of them up to float32 rounding; the
    artifact's weights are about the file's size."""
    mix, path = k_mix
    kept = artifacts.compile(f"{mix}-float-path", path, cpu_target=GENERIC_CPU)
    expanded = artifacts.compile(f"{mix}-expanded", path, quantization="none")
    ids = np.random.default_rng(2).integers(0, 400, 40).tolist()
    got, want = run_forwards(kept, ids, (30, 37)), run_forwards(expanded, ids, (30, 37))
    for name in want:
        assert np.abs(got[name] - want[name]).max() < 1e-5 * np.abs(want[name]).max(), name
    config = json.loads((kept / "mlc_spec_config.json").read_text())["models"]["target"]
    formats, base = config["quantization"], mix[:4]
    assert formats["model.layers.0.self_attn.qkv_proj"] == [base, base, "q6_k"]
    assert formats["model.layers.1.self_attn.qkv_proj"] == base and formats["lm_head"] == "q6_k"
    file_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
    assert config["param_bytes"] <= 1.2 * file_bytes


def test_k_quant_float_path_equals_transformers_gguf_loader(artifacts, k_mix):
    """A reference no one here wrote: transformers' own GGUF loader (which dequantizes with gguf-py) on
    the same file, against the kept blocks computed in float on the generic CPU."""
    from transformers import AutoModelForCausalLM

    mix, path = k_mix
    kept = artifacts.compile(f"{mix}-float-path", path, cpu_target=GENERIC_CPU)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = np.random.default_rng(2).integers(0, 400, 40).tolist()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = all_logits(kept, ids)
    assert np.abs(got - want[:, :got.shape[1]]).max() < 1e-4 * np.abs(want).max()


def test_k_quant_integer_path_is_the_expanded_file_up_to_8_bit_activations(artifacts, k_mix):
    """On this CPU's target, Q8_K activations multiplied in integers: close to the expanded file's
    logits, with the same next tokens. (One scale per 256 inputs rounds coarsely: on the Q5_K_M file
    the largest difference is 5% of the largest logit, the 99th percentile 2%.)"""
    mix, path = k_mix
    kept = artifacts.compile(mix, path)
    expanded = artifacts.compile(f"{mix}-expanded", path, quantization="none")
    ids = np.random.default_rng(2).integers(0, 400, 40).tolist()
    got, want = run_forwards(kept, ids, (30, 37)), run_forwards(expanded, ids, (30, 37))
    for name in want:
        scale, difference = np.abs(want[name]).max(), np.abs(got[name] - want[name])
        assert difference.max() < 0.08 * scale and np.quantile(difference, 0.99) < 0.03 * scale, name
        assert (got[name].argmax(-1) == want[name].argmax(-1)).mean() >= 0.8, name


def test_k_quant_token_gets_the_same_logits_alone_in_a_verify_or_in_a_batch(artifacts, k_mix):
    mix, path = k_mix
    assert_verify_and_batch_are_decode(artifacts.compile(mix, path), 400)


def test_k_quant_speculation_equals_k_quant_target(artifacts, q4_k_m, tmp_path):
    """Greedy speculation over a Q4_K_M pair (the draft's layer 1 differs) emits what the target alone does."""
    from mlc_spec import Engine

    draft = write_k_mix_gguf(tmp_path / "draft.gguf", layer1_seed=2)
    engine = Engine(artifacts.compile("q4_k_m-pair", q4_k_m, draft, max_seq_len=128), max_batch_size=4)
    batch = [ids.tolist() for ids in np.random.default_rng(5).integers(0, 400, (4, 12))]
    alone = generate_all(engine, batch, max_tokens=24, stop_at_eos=False, speculative=False)
    spec = engine.generate(token_ids=batch, max_tokens=24, stop_at_eos=False, draft_length=4)
    assert [o.token_ids for o in spec] == alone
    rate = sum(o.stats["acceptance_rate"] for o in spec) / len(spec)
    assert 0.1 < rate < 1.0, rate  # a draft that partly agrees: accepted and rejected drafts both occurred


# -- bad options --------------------------------------------------------------------------------------
def test_unknown_quantization(tmp_path, capsys, good_checkpoint):
    err = compile_error(capsys, [str(good_checkpoint), "--quantization", "q3_k", "--output", str(tmp_path / "o" / "a")])
    assert "unknown --quantization 'q3_k'" in err and "q4_1" in err
    assert_empty(tmp_path / "o")


def test_quantization_needs_the_cpu_layout(tmp_path, capsys, good_checkpoint):
    err = compile_error(capsys, [str(good_checkpoint), "--device", "opencl", "--quantization", "q4_1",
                                 "--output", str(tmp_path / "o" / "a")])
    assert "--quantization none" in err
    assert_empty(tmp_path / "o")


def test_groups_must_divide_the_inputs(tmp_path, capsys):
    from checkpoints import write_checkpoint

    odd = write_checkpoint(tmp_path / "odd", hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    err = compile_error(capsys, [str(odd), "--quantization", "q8_0", "--output", str(tmp_path / "o" / "a")])
    assert "not a multiple of 32" in err and "--quantization none" in err
    assert_empty(tmp_path / "o")
