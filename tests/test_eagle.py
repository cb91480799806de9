"""The EAGLE-style feature draft: the target's exported features, the compiled draft against its torch
definition (mlc_spec/eagle.py), greedy exactness and the sampled distribution with a head over a subset
of the vocabulary (q zero outside it)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import VOCAB, exact_first, generate_all, prompts
from mlc_spec import Engine

torch = pytest.importorskip("torch")

HEAD_TOKENS = np.unique(np.r_[np.arange(0, VOCAB, 3), 1])  # a third of the vocabulary, EOS (1) among it


@pytest.fixture(scope="session")
def target_ckpt(artifacts):
    return artifacts.checkpoint("llama-gqa2-untied", arch="llama", vocab_size=VOCAB)


def draft_net(target_ckpt, layers: int = 1, feature_layers: tuple[int, ...] = ()):
    from safetensors.numpy import load_file

    from mlc_spec.eagle import DraftNet

    config = json.loads((target_ckpt / "config.json").read_text())
    tensors = load_file(str(target_ckpt / "model.safetensors"))
    torch.manual_seed(0)
    net = DraftNet(config, torch.from_numpy(tensors["model.embed_tokens.weight"]), torch.from_numpy(HEAD_TOKENS),
                   torch.from_numpy(tensors["lm_head.weight"]), layers=layers, feature_layers=feature_layers)
    with torch.no_grad():  # clear margins between the draft's choices, as in a trained draft
        net.fc.weight.mul_(4.0)
        if feature_layers:  # a fusion that reads every part, each norm its own
            net.fuse.weight.add_(0.2 * torch.randn_like(net.fuse.weight))
            for norm in net.feature_norms:
                norm.weight.uniform_(0.5, 1.5)
    return net, config


def compiled_draft(artifacts, target_ckpt, folder, layers: int = 1, feature_layers: tuple[int, ...] = ()):
    """(engine, the torch draft it was compiled from)."""
    from mlc_spec.train_draft import export

    net, config = draft_net(target_ckpt, layers, feature_layers)
    export(net, config, folder, "test draft")
    net.load_state_dict({k: v.half().float() for k, v in net.state_dict().items()})  # as shipped: float16
    name = f"eagle-{layers}" + "".join(f"-f{i}" for i in feature_layers)
    artifact = artifacts.compile(name, target_ckpt, folder, max_seq_len=128)
    return Engine(artifact, max_batch_size=16), net


@pytest.fixture(scope="session")
def eagle(artifacts, target_ckpt, tmp_path_factory):
    return compiled_draft(artifacts, target_ckpt, tmp_path_factory.mktemp("eagle-draft"))


@pytest.fixture(scope="session")
def fused_eagle(artifacts, target_ckpt, tmp_path_factory):
    """EAGLE-3's fusion: the output of the target's layer 0 beside its last hidden state."""
    return compiled_draft(artifacts, target_ckpt, tmp_path_factory.mktemp("fused-draft"), feature_layers=(0,))


@pytest.mark.parametrize("draft, layers", [("eagle", ()), ("fused_eagle", (0,))])
def test_target_exports_the_features_its_draft_reads(request, target_ckpt, draft, layers):
    """Per row, the outputs of the draft's feature layers, then the last hidden state (after the final
    norm), as transformers computes them."""
    from transformers import AutoModelForCausalLM

    engine, _ = request.getfixturevalue(draft)
    assert engine.config.models["target"].feature_layers == layers == engine.config.models["draft"].feature_layers
    ids = prompts(1, seed=3)[0][:40]
    with engine.session() as session:
        session.generate(token_ids=ids, max_tokens=1, speculative=False)
        ours = engine.target.features[session.seq_id].rows(0, len(ids) - 1)
    model = AutoModelForCausalLM.from_pretrained(target_ckpt, dtype=torch.float32)
    with torch.no_grad():
        states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    want = torch.cat([states[i + 1] for i in layers] + [states[-1]], -1)[0, :-1].numpy()
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4)


def test_a_fused_draft_chains_as_its_torch_definition(fused_eagle):
    """The compiled fusion (each feature layer's norm, then fuse) reads the target's features as
    DraftNet.target_feature does, and only them: chained steps read the draft's own."""
    assert_chains_as_torch(*fused_eagle)


def test_greedy_fused_draft_equals_target_alone(fused_eagle):
    engine, _ = fused_eagle
    reference = generate_all(engine, prompts(30), max_tokens=24, stop_at_eos=False, speculative=False)
    assert generate_all(engine, prompts(30), max_tokens=24, stop_at_eos=False, speculative="draft",
                        draft_length=3) == reference


def test_compiled_draft_chains_as_its_torch_definition(eagle):
    """The runtime's catch-up and chained proposals give the tokens DraftNet.unroll predicts: same fc
    input order, positions, norm, head rows and id map, and the draft's own features after step one."""
    assert_chains_as_torch(*eagle)


def test_a_draft_of_two_layers_chains_as_its_torch_definition(artifacts, target_ckpt, tmp_path):
    """A deeper draft (train-draft --layers 2) compiles its layers in order, each with its own cache."""
    engine, net = compiled_draft(artifacts, target_ckpt, tmp_path, layers=2)
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 2
    assert_chains_as_torch(engine, net)


def assert_chains_as_torch(engine, net):
    from mlc_spec.runtime.speculative import FeatureDraft, SamplingParams, Sequence

    k = 4
    for prompt in prompts(6, seed=5)[2:]:
        with engine.session() as session:
            session.generate(token_ids=prompt, max_tokens=1, speculative=False)
            seq = Sequence(session.seq_id, list(prompt), np.random.default_rng(0), SamplingParams())
            engine.target.keep(seq, len(prompt) - 1)
            feats = engine.target.features[session.seq_id].rows(0, len(prompt) - 1).copy()
            proposer = FeatureDraft(engine.draft, engine.target, engine.prefill_chunk)
            proposer.catch_up([seq])
            drafts, _ = proposer.propose([seq], k, SamplingParams(), None)
            proposer.sync(seq)
        ids = torch.tensor([prompt + drafts[0]])
        f = torch.zeros((1, ids.shape[1], feats.shape[1]))
        f[0, :len(prompt) - 1] = torch.from_numpy(feats)
        with torch.no_grad():
            outs = net.unroll(ids, f, k)
        start = len(prompt) - 2  # index of position len(prompt)-1, the chain's first step
        want = [int(net.token_ids[net.logits(g[0, start + r]).argmax()]) for r, g in enumerate(outs)]
        assert drafts[0] == want


@pytest.fixture(scope="session")
def reference(eagle):
    engine, _ = eagle
    return generate_all(engine, prompts(100), max_tokens=40, stop_at_eos=False, speculative=False)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_feature_draft_equals_target_alone(eagle, reference, k):
    engine, _ = eagle
    assert generate_all(engine, prompts(100), max_tokens=40, stop_at_eos=False, speculative="draft",
                        draft_length=k) == reference


def test_a_batch_of_prompts_longer_than_a_prefill_chunk_together(eagle):
    """The draft's first catch-up feeds every prompt at once: 16 x 48 rows exceed the 512-row chunk, which
    one forward may not (TVM refused it: a view of 768 rows on the 512-row workspace)."""
    engine, _ = eagle
    batch = np.random.default_rng(13).integers(2, VOCAB, (16, 48)).tolist()
    assert sum(map(len, batch)) > engine.prefill_chunk
    outs = {speculative: [o.token_ids for o in engine.generate(token_ids=batch, max_tokens=12, stop_at_eos=False,
                                                                speculative=speculative, draft_length=3)]
            for speculative in (False, "draft")}
    assert outs["draft"] == outs[False]


def test_feature_draft_proposes_and_some_proposals_are_accepted(eagle):
    """Not a proposer that drafts nothing: every round drafts (but the last few, which max_tokens cuts)."""
    engine, _ = eagle
    out = engine.generate(token_ids=prompts(1, seed=2)[0], max_tokens=40, speculative="draft", draft_length=3,
                          stop_at_eos=False, temperature=1.0, top_k=4, seed=0)
    assert out.stats["drafted_per_position"][0] >= out.stats["rounds"] - 2
    assert out.stats["accepted_per_position"][0] > 0


def test_multi_turn_with_a_feature_draft_equals_target_alone(eagle):
    """A session's second turn reuses the cached prefix: the target's features are cut back with it."""
    engine, _ = eagle
    first, second = prompts(2, seed=9)
    outs = {}
    for speculative in (False, "draft"):
        with engine.session() as session:
            a = session.generate(token_ids=first, max_tokens=20, stop_at_eos=False, speculative=speculative).token_ids
            b = session.generate(token_ids=first + a[:5] + second, max_tokens=20, stop_at_eos=False,
                                 speculative=speculative).token_ids
        outs[speculative] = (a, b)
    assert outs[False] == outs["draft"]


@pytest.mark.parametrize("n, shape", [(2, dict(speculative="draft", draft_length=3)),
                                      (3, dict(speculative="tree", tree_width=2, tree_depth=3))])
def test_sampled_first_tokens_follow_the_target(eagle, target_ckpt, n, shape):
    """FM4/FM5 with q zero outside the head's tokens, for chains and for trees whose siblings are drawn
    without replacement and whose third level hangs under the two likeliest of the four second-level
    nodes (chosen from what was drawn there): the target's distribution of its first n tokens holds
    (chi-square)."""
    from scipy.stats import chisquare

    engine, _ = eagle
    prompt = prompts(1, seed=11)[0][:12]
    exact = exact_first(target_ckpt, prompt, temperature=1.0, top_k=4, n=n)
    assert any(t not in HEAD_TOKENS for key in exact for t in key), "the test needs tokens outside the head"
    counts = dict.fromkeys(exact, 0)
    batch, draws = 16, 8000
    for call in range(draws // batch):  # one token more than counted: a round drafts no deeper than max_tokens
        outs = engine.generate(token_ids=[prompt] * batch, max_tokens=n + 1, temperature=1.0, top_k=4, seed=call,
                               stop_at_eos=False, **shape)
        for o in outs:
            counts[tuple(o.token_ids[:n])] += 1
    keys = sorted(exact)
    observed = np.array([counts[key] for key in keys])
    expected = np.array([exact[key] for key in keys]) * observed.sum()
    assert chisquare(observed, expected).pvalue > 1e-3


# -- token trees (EAGLE-2's) ------------------------------------------------------------------------------

@pytest.mark.parametrize("width, depth", [(2, 3), (4, 1)])
def test_greedy_feature_tree_equals_target_alone(eagle, reference, width, depth):
    engine, _ = eagle
    got = generate_all(engine, prompts(100), max_tokens=40, stop_at_eos=False, speculative="tree",
                       tree_width=width, tree_depth=depth)
    mismatched = [i for i, (a, b) in enumerate(zip(got, reference)) if a != b]
    assert not mismatched, f"{len(mismatched)} of 100 prompts differ, first {mismatched[:5]}"


def test_width_one_feature_tree_is_the_chain(eagle):
    """The tree's levels (rows fed their parents' draft features in a tree forward) propose what the
    chain's steps do: the same tokens and the same acceptance at every position."""
    engine, _ = eagle
    batch = prompts(16, seed=4)
    chain = engine.generate(token_ids=batch, max_tokens=40, stop_at_eos=False, speculative="draft", draft_length=4)
    tree = engine.generate(token_ids=batch, max_tokens=40, stop_at_eos=False, speculative="tree",
                           tree_width=1, tree_depth=4)
    assert [o.token_ids for o in tree] == [o.token_ids for o in chain]
    assert tree[0].stats["accepted_per_position"] == chain[0].stats["accepted_per_position"]
    assert sum(chain[0].stats["accepted_per_position"]) > 0


def test_wider_feature_trees_accept_more_per_target_forward(eagle):
    engine, _ = eagle
    lengths = [engine.generate(token_ids=prompts(8, seed=6), max_tokens=40, stop_at_eos=False, speculative="tree",
                               tree_width=width, tree_depth=2)[0].stats["mean_accepted_length"] for width in (1, 3)]
    assert lengths[0] < lengths[1], lengths


def test_a_feature_tree_round_keeps_the_accepted_paths_features(eagle):
    """After each tree round the target holds one feature row per cached token, each the one a fresh
    prefill of the committed tokens computes: the next round's draft reads the accepted path's."""
    from mlc_spec.runtime.speculative import FeatureTree, SamplingParams, Sequence, SpeculativeDecoder

    engine, _ = eagle
    target = engine.target
    decoder = SpeculativeDecoder(target, FeatureTree(engine.draft, target, engine.prefill_chunk, width=3))
    params = SamplingParams()
    with engine.session() as session, engine.session() as fresh:
        session.tokens[:] = prompts(100)[2]  # one where this random draft's trees are accepted, two levels once
        seq = Sequence(session.seq_id, session.tokens, np.random.default_rng(0), params)
        target.prefill(seq, 64)
        accepted = []
        for _ in range(28):
            accepted += decoder.round([seq], 2).accepted
            assert target.features[seq.seq_id].n == target.cached(seq) == len(seq.tokens) - 1
        assert 2 in accepted and sum(accepted) < 2 * len(accepted)  # partial acceptance, where rollback bugs live
        fresh.tokens[:] = list(seq.tokens)
        fseq = Sequence(fresh.seq_id, fresh.tokens, np.random.default_rng(0), params)
        target.prefill(fseq, 64)
        n = len(seq.tokens) - 1
        np.testing.assert_allclose(target.features[seq.seq_id].rows(0, n), target.features[fseq.seq_id].rows(0, n),
                                   atol=1e-4)


def test_trees_of_a_feature_draft_compiled_without_them_are_refused(eagle, monkeypatch):
    engine, _ = eagle
    monkeypatch.setattr(engine.draft.lib.vm.module, "implements_function", lambda name: name != "prefill_own")
    with pytest.raises(ValueError, match="recompile it with `mlc_spec compile`"):
        engine.generate(token_ids=[5, 6, 7], max_tokens=4, speculative="tree")


def test_train_draft_runs_every_stage_and_resumes(eagle, tmp_path, capsys, monkeypatch):
    """corpus -> features -> training with held-out acceptance -> a draft folder; a rerun resumes from
    the corpus, the features and the checkpoint instead of starting over, and a grown corpus adds
    only its new features."""
    import torch

    from mlc_spec import train_draft
    from mlc_spec.cli import main as cli

    monkeypatch.setattr(train_draft, "FEATURE_SHARD", 3)
    engine, _ = eagle
    work, out = tmp_path / "work", tmp_path / "draft"
    args = ["train-draft", str(engine.folder), "--work", str(work), "--out", str(out), "--prompts", "4",
            "--heldout", "2", "--max-tokens", "8", "--gen-batch", "4", "--minutes", "0.02", "--eval-every", "2",
            "--vocab", "64", "--threads", "1"]
    assert cli(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["draft_kind"] == "eagle" and config["draft_vocab_size"] == 64
    corpus = (work / "corpus-train.jsonl").read_text().splitlines()
    assert len(corpus) == 8  # each prompt answered greedily and sampled
    log = (work / "log.txt").read_text()
    assert "held-out greedy acceptance per position" in log
    shards = sorted(work.glob("features-train-*.pt"))
    assert [len(torch.load(f)) for f in shards] == [3, 3, 2]
    first_written = shards[0].stat().st_mtime_ns
    assert cli(args[:-8] + ["--minutes", "0.04", "--eval-every", "2", "--vocab", "64", "--threads", "1"]) == 0
    assert (work / "corpus-train.jsonl").read_text().splitlines() == corpus
    assert "resuming at step" in (work / "log.txt").read_text()
    grown = args[:7] + ["5"] + args[8:-8] + ["--minutes", "0.06", "--eval-every", "2", "--vocab", "64", "--threads", "1"]
    assert cli(grown) == 0
    assert len((work / "corpus-train.jsonl").read_text().splitlines()) == 10
    shards = sorted(work.glob("features-train-*.pt"))
    assert [len(torch.load(f)) for f in shards] == [3, 3, 3, 1]
    assert shards[0].stat().st_mtime_ns == first_written


def test_held_out_acceptance_counts_the_rounds_a_greedy_runtime_runs():
    """Chains start where the runtime's do, after the tokens the last round accepted and the target's
    own: a draft wrong only about the token at position 4 misses it once, and the target's token there
    starts the next chain."""
    from mlc_spec.train_draft import _rounds

    tokens, steps = np.arange(100, 110), 2
    preds = np.tile(tokens[2:], (steps, 1))  # preds[r, i]: step r+1's token for position i+2, fed the one at i+1
    preds[:, 4 - 2] = -1
    assert _rounds(preds, tokens, start=2, length=10) == [1, 2, 2]  # chains begun at 2, 4 and 7


@pytest.mark.parametrize("layers", ["0", "3"])
def test_train_draft_refuses_more_layers_than_the_target_has_before_any_work(eagle, tmp_path, capsys, layers):
    """The draft starts from the target's last layers: a count outside 1..its layers is one error line,
    given before the corpus is generated."""
    from mlc_spec.cli import main as cli

    engine, _ = eagle
    work = tmp_path / "work"
    assert cli(["train-draft", str(engine.folder), "--work", str(work), "--layers", layers]) == 2
    assert capsys.readouterr().err.strip() == f"error: --layers {layers}: give 1 to 2, the target's layer count"
    assert not (work / "corpus-train.jsonl").exists()


def test_train_draft_fuses_feature_layers_starting_from_a_trained_draft(eagle, target_ckpt, tmp_path, capsys):
    """--feature-layers 0 --init FOLDER: features of the target's layer 0 are extracted beside the last
    hidden state, the draft starts from the folder's weights and head, and a resume that asks for other
    feature layers is one error line."""
    from safetensors.numpy import load_file

    from mlc_spec.cli import main as cli
    from mlc_spec.train_draft import export

    engine, _ = eagle
    net, config = draft_net(target_ckpt)
    export(net, config, tmp_path / "init", "init")
    work, out = tmp_path / "work", tmp_path / "draft"
    args = ["train-draft", str(engine.folder), "--work", str(work), "--out", str(out), "--prompts", "2",
            "--heldout", "1", "--max-tokens", "8", "--gen-batch", "2", "--minutes", "0.02", "--eval-every", "2",
            "--threads", "1", "--init", str(tmp_path / "init")]
    assert cli(args + ["--feature-layers", "0"]) == 0
    assert json.loads((out / "config.json").read_text())["feature_layers"] == [0]
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["fuse.weight"].shape == (64, 128) and "feature_norms.0.weight" in tensors
    np.testing.assert_array_equal(tensors["token_ids"], HEAD_TOKENS)
    assert list(work.glob("features-layers-0-train-*.pt"))
    capsys.readouterr()
    assert cli(args + ["--feature-layers", "none"]) == 2
    assert "holds a draft of feature layers [0], not []" in capsys.readouterr().err


@pytest.mark.parametrize("layers", ["1", "x", "-1"])
def test_train_draft_refuses_feature_layers_the_target_lacks(eagle, tmp_path, capsys, layers):
    from mlc_spec.cli import main as cli

    engine, _ = eagle
    assert cli(["train-draft", str(engine.folder), "--work", str(tmp_path), "--feature-layers", layers]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --feature-layers {layers}: give target layers from 0 to 0, "
                                               "comma-separated, or auto or none")
