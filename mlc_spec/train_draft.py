"""mlc_spec train-draft: train an EAGLE-style feature draft for a compiled target, on this CPU.

Stages, each resumable (a rerun picks up where the last one stopped):
  corpus    the compiled target's own replies (greedy and sampled) to the prompts of draft_prompts.py,
            generated with the batch API; written as JSON lines as batches finish.
  features  the compiled target's hidden states over every prompt + reply (its prefill: exactly the
            features the runtime's draft reads), from a copy of the target compiled with them exported.
  train     the draft of eagle.py in torch, with the target's embedding and head frozen and shared;
            held-out greedy acceptance per draft position as it goes; checkpoints to resume from.
  export    a draft folder for `mlc_spec compile --draft` (compile/eagle.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .draft_prompts import build_prompts

CORPUS_MODES = {"greedy": 0.0, "sampled": 0.7}  # reply temperature of each half of the corpus


def corpus_files(work: Path) -> dict[str, Path]:
    return {"train": work / "corpus-train.jsonl", "heldout": work / "corpus-heldout.jsonl"}


def read_corpus(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_corpus(engine, work: Path, *, n_train: int, n_heldout: int, max_tokens: int, batch: int, seed: int,
                 log=print) -> None:
    """Each prompt is answered once greedily and once sampled; a batch's rows are appended together,
    so a stopped run resumes at the first batch it had not written."""
    from .chat import ChatTemplate

    template = ChatTemplate.of(engine)
    train, heldout = build_prompts(seed, n_train, n_heldout)
    for split, prompts in (("heldout", heldout), ("train", train)):
        path = corpus_files(work)[split]
        done = len(read_corpus(path)) // len(CORPUS_MODES)
        start, tokens = time.perf_counter(), 0
        with open(path, "a") as out:
            for b in range(done, len(prompts), batch):
                ids = [template.encode(engine, [{"role": "user", "content": p}]) for p in prompts[b:b + batch]]
                rows = []
                for mode, temperature in CORPUS_MODES.items():
                    outs = engine.generate(token_ids=ids, max_tokens=max_tokens, temperature=temperature,
                                           seed=seed * 1_000_003 + b, speculative=False)
                    rows += [{"prompt": p, "reply": o.token_ids, "mode": mode} for p, o in zip(ids, outs)]
                out.write("".join(json.dumps(r) + "\n" for r in rows))
                out.flush()
                tokens += sum(len(r["reply"]) for r in rows)
                elapsed = time.perf_counter() - start
                log(f"[corpus {split}] {min(b + batch, len(prompts))}/{len(prompts)} prompts, {tokens} reply "
                    f"tokens this run, {elapsed:.0f}s, {tokens / elapsed:.0f} tok/s")


# -- features ---------------------------------------------------------------------------------------------
MAX_TRAIN_TOKENS = 320  # prompt + reply, per sequence


def sequences(rows: list[dict]) -> list[tuple[list[int], int]]:
    """(tokens, reply start) per corpus row, cut to MAX_TRAIN_TOKENS."""
    return [((r["prompt"] + r["reply"])[:MAX_TRAIN_TOKENS], len(r["prompt"])) for r in rows if r["reply"]]


FEATURE_SHARD = 500  # sequences per file of features


def extract_features(engine, seqs: list[tuple[list[int], int]], stem: Path, log=print):
    """The compiled target's features of every sequence (its prefill, exactly what the runtime's draft
    will read), float16, one row per token (the last row, which no training position reads, is zero).
    Stored in shards of FEATURE_SHARD sequences (stem-00000.pt, ...): a stopped run resumes at its first
    incomplete shard, a grown corpus extracts only its new sequences, and no save rewrites the others
    (one growing file cost a rewrite of everything every few hundred sequences)."""
    import torch
    from tqdm import tqdm

    done = []
    with tqdm(total=len(seqs), desc=f"features {stem.name}", unit="seq", mininterval=30) as bar:
        for first in range(0, len(seqs), FEATURE_SHARD):
            shard = stem.with_name(f"{stem.name}-{first // FEATURE_SHARD:05d}.pt")
            part = torch.load(shard) if shard.is_file() else []
            todo = seqs[first + len(part):first + FEATURE_SHARD]
            bar.update(len(part))
            for tokens, _ in todo:
                with engine.session() as session:
                    session.generate(token_ids=tokens, max_tokens=1, speculative=False)
                    rows = engine.target.features[session.seq_id].rows(0, len(tokens) - 1)
                    part.append(torch.from_numpy(np.concatenate([rows, np.zeros_like(rows[:1])])).half())
                bar.update()
            if todo:
                torch.save(part, shard)
            done += part
    return done


def feature_engine(engine, work: Path, layers: tuple[int, ...], log):
    """An engine whose target exports the features a draft of these feature layers reads: this one, or
    the target recompiled with them."""
    from .runtime.engine import Engine

    if engine.target.lib.exports_hidden and (engine.config.models["target"].feature_layers or ()) == layers:
        return engine
    folder = work / f"feature-target{_tag(layers)}"
    if not (folder / "mlc_spec_config.json").is_file():
        from .compile.build import CompileOptions, compile_artifact

        log(f"compiling the target with its features exported into {folder} (once)")
        source = engine.config.models["target"].source
        compile_artifact(source, None, folder, CompileOptions(device=engine.config.device, dtype=engine.config.dtype,
                                                              export_features=layers), log=log)
    return Engine(folder, device=engine.config.device, max_batch_size=1, max_seq_len=engine.max_seq_len)


def _tag(layers: tuple[int, ...]) -> str:
    """Names the files of features with these layers (none: the names of one-feature drafts)."""
    return "-layers" + "".join(f"-{i}" for i in layers) if layers else ""


# -- training -------------------------------------------------------------------------------------------
def frequent_tokens(rows: list[dict], n: int, always: tuple[int, ...]) -> np.ndarray:
    """The n most frequent reply tokens (the head's vocabulary), the always-kept ones (EOS) among them."""
    counts = np.bincount([t for r in rows for t in r["reply"]], minlength=max(always) + 1)
    counts[list(always)] = counts.max() + 1
    top = np.argsort(-counts, kind="stable")[:n]
    return np.sort(top).astype(np.int64)


def batches(seqs, feats, size: int, rng):
    """Length-bucketed batches (less padding), shuffled: (ids [b, s], feats [b, s, h], reply start [b], lengths)."""
    import torch

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    chunks = [order[i:i + size] for i in range(0, len(order), size)]
    rng.shuffle(chunks)
    for chunk in chunks:
        width = max(len(seqs[i][0]) for i in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        f = torch.zeros((len(chunk), width, feats[0].shape[-1]))
        for j, i in enumerate(chunk):
            ids[j, :len(seqs[i][0])] = torch.tensor(seqs[i][0])
            f[j, :len(seqs[i][0])] = feats[i].float()
        yield ids, f, torch.tensor([seqs[i][1] for i in chunk]), torch.tensor([len(seqs[i][0]) for i in chunk])


def step_masks(starts, lengths, width: int, steps: int):
    """Per step r, [b, width-1] where g_r[:, i] (position p = i+1, predicting t_{p+1}) is trained and
    scored: t_{p+1} is a reply token inside the sequence, and the chain began at a position >= 1."""
    import torch

    i = torch.arange(width - 1)[None]
    predicted = i + 2  # the position of the token g_r[:, i] predicts
    inside = (predicted < lengths[:, None]) & (predicted >= starts[:, None])
    return [inside & (i >= r - 1) for r in range(1, steps + 1)]


def draft_loss(net, ids, feats, masks):
    """Sum over steps of the cross-entropy to the target's distribution over the head's tokens, plus
    the feature regression EAGLE uses (smooth L1 to the target's next feature)."""
    import torch
    import torch.nn.functional as F

    outs = net.unroll(ids, feats, len(masks))
    want = feats[:, 1:, -net.norm.weight.shape[0]:]  # f_p for g at position p: the last hidden state
    p = torch.softmax(net.logits(want), -1)
    total, parts = 0.0, []
    for r, (g, m) in enumerate(zip(outs, masks)):
        if not m.any():
            parts.append(0.0)
            continue
        ce = -(p[m] * torch.log_softmax(net.logits(g[m]), -1)).sum(-1).mean()
        reg = F.smooth_l1_loss(g[m], want[m])
        weight = 0.8 ** r  # EAGLE-3's decay over the unrolled steps
        total = total + weight * (ce + reg)
        parts.append(ce.item())
    return total, parts


def acceptance(net, seqs, feats, steps: int, batch: int = 8) -> list[float]:
    """Held-out greedy acceptance per draft position, as the runtime drafts: chains of `steps` tokens, the
    first from the first reply token on, each next one after the tokens the last accepted and the
    target's own. Counting every reply position as a chain start read 0.579 at position 1 where the
    runtime measured 0.534 on the same prompts (this count: 0.536): the runtime's chains mostly start
    right after a token the draft missed, and those positions are harder."""
    import random

    import torch

    hits, rounds = np.zeros(steps), 0
    with torch.inference_mode():
        for ids, f, starts, lengths in batches(seqs, feats, batch, random.Random(0)):
            outs = net.unroll(ids, f, steps)
            preds = torch.stack([net.token_ids[net.logits(g).argmax(-1)] for g in outs], 1)  # [b, steps, s-1]
            for b in range(len(ids)):
                accepted = _rounds(preds[b].numpy(), ids[b].numpy(), int(starts[b]), int(lengths[b]))
                rounds += len(accepted)
                for a in accepted:
                    hits[:a] += 1
    return (hits / max(rounds, 1)).tolist()


def _rounds(preds: np.ndarray, tokens: np.ndarray, start: int, length: int) -> list[int]:
    """Tokens accepted in each round of a greedy runtime over one sequence: preds[r, i] is the token that
    step r+1 of a chain, fed the token at position i+1, drafts for position i+2 (net.unroll's layout)."""
    accepted, p = [], start
    while p + 1 < length:
        a = 0
        while a < len(preds) and p + a + 1 < length and preds[a, p - 1 + a] == tokens[p + a + 1]:
            a += 1
        accepted.append(a)
        p += a + 1  # the accepted tokens and the target's own
    return accepted


def train(net, seqs, feats, held, held_feats, work: Path, *, minutes: float, steps: int, batch: int, lr: float,
          eval_every: int, bfloat16: bool, log=print) -> dict:
    """AdamW with warm-up and cosine decay over the time budget; a checkpoint (model, optimizer, step,
    seconds) after every evaluation, from which a rerun continues. With bfloat16 the forward and backward
    run under autocast (float32 master weights): about 3x the steps per minute on a CPU with bfloat16 dot
    products, AMX or AVX512-BF16; held-out acceptance is always measured in float32."""
    import math
    import random

    import torch
    from tqdm import tqdm

    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    ckpt = work / "checkpoint.pt"  # train_from_corpus reads its head's tokens too
    state = {"step": 0, "seconds": 0.0, "history": []}
    if ckpt.is_file():
        saved = torch.load(ckpt)
        if tuple(saved.get("feature_layers", ())) != net.feature_layers:
            raise ValueError(f"{ckpt} holds a draft of feature layers {list(saved.get('feature_layers', ()))}, not "
                             f"{list(net.feature_layers)}; pass --feature-layers to match it, or a new --work to start over")
        # a one-layer draft's checkpoint from before --layers named its layer "layer"
        saved["model"] = {("layers.0." + k[6:] if k.startswith("layer.") else k): v for k, v in saved["model"].items()}
        layers = 1 + max(int(k.split(".")[1]) for k in saved["model"] if k.startswith("layers."))
        if layers != len(net.layers):
            raise ValueError(f"{ckpt} holds a draft of {layers} layer(s), not {len(net.layers)}; pass --layers {layers} "
                             "to resume it, or a new --work to start over")
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]
        log(f"[train] resuming at step {state['step']}, {state['seconds'] / 60:.1f} min trained")
    if state["step"] == 0:  # where it starts: chance, or the acceptance of the draft it starts from
        record(net, held, held_feats, steps, state, log)
    budget, rng = minutes * 60, random.Random(state["step"])
    bar = tqdm(desc="train", unit="step", initial=state["step"], mininterval=30)
    ema = None
    while state["seconds"] < budget:
        for ids, f, starts, lengths in batches(seqs, feats, batch, rng):
            if state["seconds"] >= budget:
                break
            t0 = time.perf_counter()
            frac = state["seconds"] / budget
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (state["step"] + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
                loss, parts = draft_loss(net, ids, f, step_masks(starts, lengths, ids.shape[1], steps))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            state["step"] += 1
            state["seconds"] += time.perf_counter() - t0
            ema = parts[0] if ema is None else 0.98 * ema + 0.02 * parts[0]
            bar.update()
            bar.set_postfix(ce1=f"{ema:.3f}", min=f"{state['seconds'] / 60:.1f}")
            if state["step"] % eval_every == 0:
                record(net, held, held_feats, steps, state, log)
                _save(net, opt, state, ckpt)
    bar.close()
    record(net, held, held_feats, steps, state, log)
    _save(net, opt, state, ckpt)
    return state


def _save(net, opt, state: dict, ckpt: Path) -> None:
    import torch

    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "state": state,
                "feature_layers": list(net.feature_layers)}, ckpt)


def record(net, held, held_feats, steps: int, state: dict, log) -> None:
    acc = acceptance(net, held, held_feats, steps)
    state["history"].append({"step": state["step"], "minutes": round(state["seconds"] / 60, 2),
                             "acceptance": [round(a, 4) for a in acc]})
    log(f"[eval] step {state['step']} ({state['seconds'] / 60:.1f} min): held-out greedy acceptance per position "
        + " ".join(f"{a:.3f}" for a in acc) + f", {1 + sum(acc):.2f} tokens per target call, in rounds of k={steps}")


# -- export ---------------------------------------------------------------------------------------------
def export(net, target_config: dict, out: Path, note: str) -> None:
    """A draft folder `mlc_spec compile --draft` takes: config.json (draft_kind "eagle"), float16 weights
    with Hugging Face layer names and the head's target token ids; the head itself is the target's."""
    import torch
    from safetensors.torch import save_file

    from .eagle import target_config as layer_config

    c = layer_config(target_config)
    config = {"draft_kind": "eagle", "architectures": ["LlamaForCausalLM"], "model_type": "llama",
              **{k: v for k, v in c.items() if k != "num_hidden_layers"}, "num_hidden_layers": len(net.layers),
              "vocab_size": target_config["vocab_size"], "draft_vocab_size": int(net.token_ids.numel()),
              "tie_word_embeddings": False, "hidden_act": "silu",
              "max_position_embeddings": target_config.get("max_position_embeddings", 4096),
              "bos_token_id": target_config.get("bos_token_id"), "eos_token_id": target_config.get("eos_token_id")}
    if net.feature_layers:
        config["feature_layers"] = list(net.feature_layers)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in folder_tensors(net).items()}
    tensors["token_ids"] = net.token_ids.to(torch.int32).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "LICENSE-NOTE.md").write_text(note)


def folder_tensors(net) -> dict:
    """The draft's trained parameters by their names in a draft folder (Hugging Face layer names)."""
    tensors = {"fc.weight": net.fc.weight, "model.norm.weight": net.norm.weight,
               **{f"model.layers.{i}.{k}": v for i, layer in enumerate(net.layers) for k, v in layer.named_parameters()}}
    if net.feature_layers:
        tensors["fuse.weight"] = net.fuse.weight
        tensors.update({f"feature_norms.{i}.weight": norm.weight for i, norm in enumerate(net.feature_norms)})
    return tensors


LICENSE_NOTE = """# EAGLE-style draft for {target}: licence and provenance

Trained by `mlc_spec train-draft` on the target's own replies (self-distillation) and its features;
the weights derive from the target and share its licence (SmolLM2-135M-Instruct: Apache License 2.0,
https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct). The head is the target's own output head
restricted to the {vocab} tokens listed in `token_ids`; it is not stored here.

## Recipe
{recipe}
"""


# -- the command ----------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    p = sub.add_parser("train-draft", help="train an EAGLE-style feature draft for a compiled target (CPU, torch)")
    p.add_argument("artifact", nargs="?", help="artifact folder of the target (default: the embedded default pair)")
    p.add_argument("--work", default="draft-work", help="corpus, features, checkpoints and log (resumable)")
    p.add_argument("--out", default="draft-eagle", help="the draft folder to write, for `mlc_spec compile --draft`")
    p.add_argument("--prompts", type=int, default=4000, help="training prompts, each answered greedily and sampled")
    p.add_argument("--heldout", type=int, default=32, help="held-out prompts (unseen topics), for acceptance")
    p.add_argument("--max-tokens", type=int, default=128, help="reply length cap")
    p.add_argument("--gen-batch", type=int, default=16, help="prompts per batch API call")
    p.add_argument("--stage", choices=("all", "corpus", "train"), default="all",
                   help="corpus: only generate it; train: train on the corpus generated so far (default all)")
    p.add_argument("--vocab", type=int, default=8192, help="the head's tokens: the corpus's most frequent")
    p.add_argument("--minutes", type=float, default=60.0, help="training time budget (a rerun continues)")
    p.add_argument("--layers", type=int, default=1, help="the draft's decoder layers (default 1, EAGLE's)")
    p.add_argument("--feature-layers", default="auto",
                   help="target layers whose outputs the draft fuses with the last hidden state, comma-separated "
                        "(EAGLE-3); auto: a low and a middle one; none: the last hidden state alone")
    p.add_argument("--init", help="a draft folder to start from (train-draft's output of the same target)")
    p.add_argument("--steps", type=int, default=3, help="chained draft steps trained and scored")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="training arithmetic; auto: bfloat16 where the CPU has bfloat16 dot products, else float32")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args) -> int:
    try:
        import torch
        import tqdm  # noqa: F401
    except ImportError:
        raise ValueError("train-draft needs torch and tqdm; install them with `pip install mlc_spec[train]`") from None
    from .runtime.engine import Engine

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    logfile = open(work / "log.txt", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logfile.write(msg + "\n")
        logfile.flush()

    artifact = Path(args.artifact) if args.artifact else _default_artifact()
    engine = Engine(artifact, max_batch_size=args.gen_batch, max_seq_len=512)
    target_layers = engine.config.models["target"].config["num_hidden_layers"]
    if not 1 <= args.layers <= target_layers:  # before the corpus: the draft starts from the target's last layers
        raise ValueError(f"--layers {args.layers}: give 1 to {target_layers}, the target's layer count")
    args.feature_layers = parse_feature_layers(args.feature_layers, target_layers)
    if args.stage != "train":
        build_corpus(engine, work, n_train=args.prompts, n_heldout=args.heldout, max_tokens=args.max_tokens,
                     batch=args.gen_batch, seed=args.seed, log=log)
    if args.stage == "corpus":
        return 0
    source = engine.config.models["target"].source
    net, target_cfg, recipe = train_from_corpus(engine, work, args, log)
    export(net, target_cfg, out, LICENSE_NOTE.format(target=Path(source).name, vocab=args.vocab, recipe=recipe))
    log(f"wrote {out}; compile it with: mlc_spec compile {source} --draft {out}")
    return 0


def parse_feature_layers(text: str, target_layers: int) -> tuple[int, ...]:
    """--feature-layers: auto is EAGLE-3's choice, a low layer and a middle one."""
    if text == "auto":
        return (min(2, target_layers - 2), target_layers // 2) if target_layers >= 4 else ()
    if text == "none":
        return ()
    try:
        layers = tuple(sorted({int(i) for i in text.split(",")}))
    except ValueError:
        layers = None
    if layers is None or not all(0 <= i < target_layers - 1 for i in layers):
        raise ValueError(f"--feature-layers {text}: give target layers from 0 to {target_layers - 2}, comma-separated, "
                         "or auto or none")
    return layers


def train_from_corpus(engine, work: Path, args, log):
    import torch

    from .compile.checkpoint import load_checkpoint
    from .eagle import DraftNet
    from .runtime.library import missing_cpu_features

    ck = load_checkpoint(engine.config.models["target"].source)
    files = corpus_files(work)
    train_rows, held_rows = read_corpus(files["train"]), read_corpus(files["heldout"])
    held_rows = [r for r in held_rows if r["mode"] == "greedy"]  # acceptance is measured on greedy replies
    train_seqs, held_seqs = sequences(train_rows), sequences(held_rows)
    tag = _tag(args.feature_layers)
    features = feature_engine(engine, work, args.feature_layers, log)
    held_feats = extract_features(features, held_seqs, work / f"features{tag}-heldout", log=log)
    train_feats = extract_features(features, train_seqs, work / f"features{tag}-train", log=log)
    checkpoint = work / "checkpoint.pt"
    init = _read_draft(Path(args.init)) if args.init and not checkpoint.is_file() else None
    if checkpoint.is_file():  # the head a resumed run trained (the corpus may have grown since)
        token_ids = torch.load(checkpoint)["model"]["token_ids"]
    elif init is not None:
        token_ids = init.pop("token_ids").long()
    else:
        token_ids = torch.from_numpy(frequent_tokens(train_rows, args.vocab, tuple(ck.config.eos_token_ids)))
    head = "model.embed_tokens.weight" if ck.config.tie_word_embeddings else "lm_head.weight"
    net = DraftNet(ck.hf_config, torch.from_numpy(np.asarray(ck.tensors["model.embed_tokens.weight"], np.float32)),
                   token_ids, torch.from_numpy(np.asarray(ck.tensors[head], np.float32)), layers=args.layers,
                   feature_layers=args.feature_layers)
    if init is not None:
        _start_from(net, init, args.init)
    else:
        _start_from_target(net, ck)
    n_tokens = sum(len(r["reply"]) for r in train_rows)
    log(f"[train] {len(train_seqs)} sequences, {n_tokens} reply tokens; head over {len(token_ids)} tokens "
        f"covering {coverage(train_rows, token_ids):.3f} of reply tokens")
    bfloat16 = args.precision == "bfloat16" or (args.precision == "auto" and not missing_cpu_features(["AVX512BF16"]))
    state = train(net, train_seqs, train_feats, held_seqs, held_feats, work, minutes=args.minutes, steps=args.steps,
                  batch=args.batch, lr=args.lr, eval_every=args.eval_every, bfloat16=bfloat16, log=log)
    acc = state["history"][-1]["acceptance"]
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    width = ck.config.hidden_size
    layers = "one Llama decoder layer" if args.layers == 1 else f"{args.layers} Llama decoder layers"
    fused = (f"features of target layers {', '.join(map(str, net.feature_layers))} and the last, fused by "
             f"fuse({len(net.feature_layers) + 1}x{width} -> {width}); " if net.feature_layers else "")
    start = f"started from {args.init}" if args.init else "initialised from the target's last"
    recipe = (f"- draft: {fused}fc(2x{width} -> {width}), {layers} ({start}), "
              f"final norm; {params / 1e6:.1f}M parameters; head over the {len(token_ids)} most frequent reply tokens\n"
              f"- corpus: {len(train_rows)} replies of the target to {len(train_rows) // 2} prompts (greedy and "
              f"sampled at {CORPUS_MODES['sampled']}), {n_tokens} reply tokens\n"
              f"- training: {state['step']} steps, batch {args.batch}, lr {args.lr}, {args.steps} chained steps, "
              f"{state['seconds'] / 60:.0f} min on {args.threads} CPU threads, {'bfloat16' if bfloat16 else 'float32'}\n"
              f"- held-out greedy acceptance per position: {' '.join(f'{a:.3f}' for a in acc)}\n")
    return net, ck.hf_config, recipe


def _start_from_target(net, ck) -> None:
    """Where the target ends: its final norm, its last layers."""
    import torch

    first = ck.config.num_hidden_layers - len(net.layers)
    with torch.no_grad():
        net.norm.weight.copy_(torch.from_numpy(np.asarray(ck.tensors["model.norm.weight"], np.float32)))
        for i, layer in enumerate(net.layers):
            prefix = f"model.layers.{first + i}."
            layer.load_state_dict({k.removeprefix(prefix): torch.from_numpy(np.asarray(ck.tensors[k], np.float32))
                                   for k in ck.tensors if k.startswith(prefix)})


def _read_draft(folder: Path) -> dict:
    from safetensors.torch import load_file

    if not (folder / "model.safetensors").is_file():
        raise ValueError(f"--init {folder}: no model.safetensors there; give a folder train-draft wrote")
    return load_file(str(folder / "model.safetensors"))


def _start_from(net, tensors: dict, where: str) -> None:
    """A trained draft's weights (its fc, layers and norm; a fusion it lacks starts as the last feature
    alone), so a draft with feature layers can start from one without."""
    import torch

    params = folder_tensors(net)
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name not in params or params[name].shape != tensor.shape:
                raise ValueError(f"--init {where}: its {name} does not fit this draft (--layers, --feature-layers)")
            params[name].copy_(tensor.float())


def coverage(rows: list[dict], token_ids) -> float:
    keep = set(token_ids.tolist())
    tokens = [t for r in rows for t in r["reply"]]
    return sum(t in keep for t in tokens) / max(len(tokens), 1)


def _default_artifact() -> Path:
    from .default_model import default_artifact

    return default_artifact()
