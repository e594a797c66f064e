"""Generation and scoring (rgkd_megatron/generation) against independent references, in ONE 4-process spawn.

Layouts, run one after another on the same 4 gloo ranks, all with the same weights (saved by the
TP=1 layout and loaded by every other one; PP stages consume the init RNG differently):
(1, 1) = TP=1 x DP=4 (the reference), (2, 1), (1, 2), (2, 2), and (2, 1) with sequence parallelism
(generation switches it off and restores it).

On rank 0, TP=1 only, single-process checks against references written here:
- greedy generation with the KV cache == a plain greedy loop that runs the model on the whole
  unpadded prefix of each prompt alone (no cache, no batching), tokens and log-probs;
- sampling with the cache == sampling without (same seed); two runs equal; another seed differs;
- EOS stop (from a run without the stop, the stop id chosen among its tokens) and max length;
- score() == log_softmax of the full logits of each sequence, run alone;
- bad inputs raise ValueError naming the problem.
Every layout: sampled and greedy tokens equal TP=1 exactly, log-probs and score() within 1e-5, and
every rank of a layout returns the same output. Last, two roles on rank windows (TP=2 on {0, 1},
TP=1 x DP=2 on {2, 3}, parallel_state uninitialised, same CPU-initialised weights) sample the same.
"""

from __future__ import annotations

import torch
from distributed_utils import run_distributed

VOCAB = 250  # padded to 256 at TP=1 and TP=2 (divisible by 64 * tp): one checkpoint serves both
EOS, PAD = 7, 0
MAX_NEW = 10
PROMPTS = [[5, 17, 33], [100, 2, 7, 9, 41, 8, 77], [200], [3, 3, 3, 3], [120, 60]]
SAMPLING = dict(temperature=0.9, top_p=0.95, top_k=50)
LAYOUTS = [(1, 1, False), (2, 1, False), (1, 2, False), (2, 2, False), (2, 1, True)]  # (tp, pp, sp)


def _model_cfg():
    from rgkd_megatron.config.schema import ModelConfig

    return ModelConfig(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=2,
        max_position_embeddings=32,
        make_vocab_size_divisible_by=64,
        tie_word_embeddings=False,
        init_method_std=0.1,  # peaked enough that greedy decoding is not a repetition of the prompt
        params_dtype="fp32",
        spec="local",
    )


def _gen(model, groups, **overrides):
    from rgkd_megatron.generation import generate

    kwargs = dict(max_new_tokens=MAX_NEW, **SAMPLING, eos_id=EOS, pad_id=PAD, seed=1234, vocab_size=VOCAB)
    kwargs.update(overrides)
    out = generate(model, groups, kwargs.pop("prompts", PROMPTS), **kwargs)
    return {
        "ids": out.response_ids(),
        "responses": out.responses,
        "lengths": out.response_lengths,
        "logprobs": out.logprobs,
        "finished": out.finished,
    }


def _full_logits(model, ids):
    """Gathered full-vocab logits [s, V] of one unpadded sequence (TP=1, no cache)."""
    tokens = torch.tensor([ids])
    with torch.no_grad():
        return model(tokens, torch.arange(len(ids))[None], None)[0, :, :VOCAB]


def _plain_greedy(model, prompt):
    """Independent reference: argmax of the model on the whole prefix each step, one prompt alone."""
    seq, logprobs = list(prompt), []
    for _ in range(MAX_NEW):
        logits = _full_logits(model, seq)[-1]
        nxt = int(logits.argmax())
        logprobs.append(torch.log_softmax(logits.double(), -1)[nxt].item())
        seq.append(nxt)
        if nxt == EOS:
            break
    return seq[len(prompt) :], logprobs


def _single_process_checks(model, groups):
    from rgkd_megatron.generation import score

    model.train()
    out = {"greedy_cache": _gen(model, groups, temperature=0.0)}
    out["training_restored"] = model.training  # generate() runs in eval mode, then restores the mode
    model.eval()
    out["plain_greedy"] = [_plain_greedy(model, p) for p in PROMPTS]
    out["greedy_nocache"] = _gen(model, groups, temperature=0.0, use_kv_cache=False)
    out["sample_cache"] = _gen(model, groups)
    out["sample_cache_again"] = _gen(model, groups)
    out["sample_nocache"] = _gen(model, groups, use_kv_cache=False)
    out["sample_other_seed"] = _gen(model, groups, seed=999)
    # EOS: a run without a stop id, then the stop set to the third token of row 0
    no_stop = _gen(model, groups, eos_id=None, max_new_tokens=12)
    out["no_stop"] = no_stop
    stop_id = no_stop["ids"][0][2]
    out["stop_id"] = stop_id
    out["with_stop"] = _gen(model, groups, eos_id=stop_id, max_new_tokens=12)
    seqs = [p + r for p, r in zip(PROMPTS, out["sample_cache"]["ids"])]
    out["score"] = score(model, groups, seqs, vocab_size=VOCAB)
    out["score_t2"] = score(model, groups, seqs, vocab_size=VOCAB, temperature=2.0)
    out["score_ref"] = [torch.log_softmax(_full_logits(model, s).double(), -1) for s in seqs]
    out["seqs"] = seqs
    out["errors"] = _bad_inputs(model, groups)
    return out


BAD_INPUTS = {  # generate() overrides (or a score() call) -> expected ValueError text
    "empty prompt": (dict(prompts=[[1], []]), "prompt needs >= 1 token"),
    "id >= vocab_size": (dict(prompts=[[1, VOCAB]]), "outside"),
    "max_new_tokens": (dict(max_new_tokens=0), "max_new_tokens"),
    "top_p": (dict(top_p=0.0), "top_p"),
    "too long": (dict(max_new_tokens=40), "max_position_embeddings"),
    "vocab above padded": (dict(vocab_size=300), "padded vocab"),
    "eos outside": (dict(eos_id=VOCAB), "eos_id"),
    "score: one token": (None, ">= 2 tokens"),
}


def _bad_inputs(model, groups):
    from rgkd_megatron.generation import score

    messages = {}
    for name, (overrides, _) in BAD_INPUTS.items():
        try:
            if overrides is None:
                score(model, groups, [[1, 2], [3]], vocab_size=VOCAB)
            else:
                _gen(model, groups, **overrides)
        except ValueError as e:
            messages[name] = str(e)
    return messages


def _body(rank, world_size, workdir):
    import torch.distributed as dist

    from rgkd_megatron.checkpoint.dist_ckpt import load_model_weights, save_model_weights
    from rgkd_megatron.config.schema import ParallelConfig
    from rgkd_megatron.generation import score
    from rgkd_megatron.models.builders import build_policy
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.setup import init_role, teardown_roles

    results = {}
    for tp, pp, sp in LAYOUTS:
        groups = init_role(layout_for_world(tp, pp, dist.get_world_size()), seed=11)
        parallel = ParallelConfig(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp
        )
        model = build_policy(_model_cfg(), parallel, groups, VOCAB)
        if (tp, pp) == (1, 1):
            save_model_weights(f"{workdir}/init", model)
        load_model_weights(f"{workdir}/init", model)
        flags_before = _sp_flags(model)
        out = {
            "sample": _gen(model, groups),
            "sample_nocache": _gen(model, groups, use_kv_cache=False),
            "greedy": _gen(model, groups, temperature=0.0),
            "score": score(model, groups, [p + [1, 2, 3] for p in PROMPTS], vocab_size=VOCAB),
        }
        if (tp, pp) == (1, 1) and rank == 0:
            out["checks"] = _single_process_checks(model, groups)
        # generation switches sequence parallelism off: every flag must be restored
        out["sp_restored"] = _sp_flags(model) == flags_before and model.config.sequence_parallel == sp
        results[(tp, pp, sp)] = out
        teardown_roles()
    results["windows"] = _window_roles(rank)
    return results


def _sp_flags(model):
    names = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")
    return [(n, a, getattr(m, a)) for n, m in model.named_modules() for a in names if hasattr(m, a)]


def _window_roles(rank):
    """TP=2 on ranks {0, 1} and TP=1 x DP=2 on {2, 3}, megatron's parallel_state left uninitialised."""
    from megatron.core import parallel_state

    from rgkd_megatron.config.schema import ParallelConfig
    from rgkd_megatron.models.builders import build_policy
    from rgkd_megatron.parallel.groups import RoleLayout
    from rgkd_megatron.training.setup import init_role

    layouts = {"P": RoleLayout(tp=2, rank_offset=0), "Q": RoleLayout(tp=1, dp=2, rank_offset=2)}
    groups = {name: init_role(layout, seed=5) for name, layout in layouts.items()}  # collective
    assert not parallel_state.model_parallel_is_initialized()
    mine = "P" if rank < 2 else "Q"
    torch.manual_seed(5)  # CPU init draws the full weights from this generator: same weights at TP 1 and 2
    parallel = ParallelConfig(tensor_model_parallel_size=layouts[mine].tp)
    model = build_policy(_model_cfg(), parallel, groups[mine], VOCAB)
    return _gen(model, groups[mine])


def _assert_same(a, b, what, atol=1e-5):
    assert a["ids"] == b["ids"], (what, a["ids"], b["ids"])
    assert torch.equal(a["lengths"], b["lengths"]) and torch.equal(a["finished"], b["finished"]), what
    assert torch.equal(a["responses"], b["responses"]), what
    torch.testing.assert_close(a["logprobs"], b["logprobs"], atol=atol, rtol=0, msg=what)


def _check_single_process(c):
    # greedy with the KV cache (batched, per-sample offsets) == the plain recompute loop, per prompt
    for i, (ref_ids, ref_logp) in enumerate(c["plain_greedy"]):
        assert c["greedy_cache"]["ids"][i] == ref_ids, (i, c["greedy_cache"]["ids"][i], ref_ids)
        n = len(ref_ids)
        torch.testing.assert_close(c["greedy_cache"]["logprobs"][i, :n].double(), torch.tensor(ref_logp, dtype=torch.float64),
                                   atol=1e-5, rtol=0)  # fmt: skip
        assert bool(c["greedy_cache"]["finished"][i]) == (ref_ids[-1] == EOS)
    assert any(len(set(r)) > 1 for r, _ in c["plain_greedy"]), "a degenerate greedy reference"
    _assert_same(c["greedy_cache"], c["greedy_nocache"], "greedy cache vs no cache")
    # sampling: cache == no cache, seeded, and a different seed differs
    _assert_same(c["sample_cache"], c["sample_nocache"], "sampling cache vs no cache")
    _assert_same(c["sample_cache"], c["sample_cache_again"], "same seed", atol=0.0)
    assert c["sample_cache"]["ids"] != c["sample_other_seed"]["ids"]
    assert c["sample_cache"]["ids"] != c["greedy_cache"]["ids"]
    # EOS stop and max length
    no_stop, with_stop, stop_id = c["no_stop"], c["with_stop"], c["stop_id"]
    assert not no_stop["finished"].any() and (no_stop["lengths"] == 12).all()
    cut_rows = 0
    for i, (full, cut) in enumerate(zip(no_stop["ids"], with_stop["ids"])):
        expected = full[: full.index(stop_id) + 1] if stop_id in full else full
        assert cut == expected, (i, cut, expected)
        assert bool(with_stop["finished"][i]) == (stop_id in full)
        n = len(cut)
        assert (with_stop["responses"][i, n:] == PAD).all() and (with_stop["logprobs"][i, n:] == 0).all()
        torch.testing.assert_close(
            with_stop["logprobs"][i, :n], no_stop["logprobs"][i, :n], atol=1e-6, rtol=0
        )
        cut_rows += stop_id not in full
    assert with_stop["finished"][0] and len(with_stop["ids"][0]) <= 3
    assert cut_rows > 0, "some row must run to max_new_tokens"
    # score == log_softmax of the full logits of each sequence alone
    for i, (seq, ref) in enumerate(zip(c["seqs"], c["score_ref"])):
        n = len(seq) - 1
        expected = ref[torch.arange(n), torch.tensor(seq[1:])].float()
        torch.testing.assert_close(c["score"][i, :n], expected, atol=1e-5, rtol=0)
        assert (c["score"][i, n:] == 0).all()
        # the sampled tokens' log-probs reported by generate() agree with teacher forcing
        plen, r = len(PROMPTS[i]), len(c["sample_cache"]["ids"][i])
        torch.testing.assert_close(c["sample_cache"]["logprobs"][i, :r], expected[plen - 1 : plen - 1 + r],
                                   atol=1e-5, rtol=0)  # fmt: skip
    for name, (_, expected) in BAD_INPUTS.items():
        assert expected in c["errors"].get(name, "no ValueError"), (name, c["errors"].get(name))
    assert (c["score_t2"] > c["score"]).any() and not torch.allclose(c["score_t2"], c["score"])
    assert c["training_restored"]


def test_generation_layouts_and_references(tmp_path):
    per_rank = run_distributed(_body, 4, args=(str(tmp_path),), timeout=600)
    _check_single_process(per_rank[0][(1, 1, False)]["checks"])
    reference = per_rank[0][(1, 1, False)]
    windows = [results.pop("windows") for results in per_rank]
    for rank in (1, 2, 3):  # TP=2 on a rank window == TP=1 on another, same CPU-initialised weights
        _assert_same(windows[rank], windows[0], f"window role on rank {rank}")
    assert windows[0]["ids"] != reference["sample"]["ids"]  # other weights: the comparison is not vacuous
    for rank, results in enumerate(per_rank):
        for layout, out in results.items():
            what = f"rank {rank} layout tp,pp,sp={layout}"
            _assert_same(out["sample"], reference["sample"], what + " sample")
            _assert_same(out["sample_nocache"], reference["sample"], what + " sample without cache")
            _assert_same(out["greedy"], reference["greedy"], what + " greedy")
            torch.testing.assert_close(out["score"], reference["score"], atol=1e-5, rtol=0, msg=what)
            assert out["sp_restored"], what
