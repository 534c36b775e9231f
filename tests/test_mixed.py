"""Mixed precision to a bit budget: the budgeted choice (hf_vq.algorithms.allocation), the average_bits/candidates
config fields, and an average_bits GPTQ run on a tiny model (budget, reload, compressed-tensors and GGUF export)."""

import json
import math
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import hf_vq
from hf_vq.algorithms.allocation import BudgetError, choose
from hf_vq.config import ConfigError
from hf_vq.export.checkpoint import ExportError
from hf_vq.pipeline.mixed import affine_cost, units_of
from tests.test_export_checkpoint import bpe_llama_dir, read_logits  # noqa: F401  (a fixture used below)

# ------------------------------------------------------------------------------------------ the pure allocator

units_st = st.lists(st.lists(st.tuples(st.floats(1, 1e6), st.floats(0, 1e3)), min_size=1, max_size=5),
                    min_size=1, max_size=12)


@given(units=units_st, frac=st.floats(0, 1.2))
def test_budget_never_exceeded(units, frac):
    costs = [[c for c, _ in u] for u in units]
    losses = [[lo for _, lo in u] for u in units]
    floor = math.fsum(min(c) for c in costs)
    top = math.fsum(max(c) for c in costs)
    budget = floor + frac * (top - floor)
    got = choose(costs, losses, budget)
    assert len(got.picks) == len(units)
    assert math.fsum(c[j] for c, j in zip(costs, got.picks)) <= budget
    assert got.cost == pytest.approx(math.fsum(c[j] for c, j in zip(costs, got.picks)))


def test_no_single_move_left_that_fits_and_helps():
    """Random small cases: never over budget, the reported loss is the picks' loss, and the greedy fill leaves no
    unit whose move to another candidate would lower the loss and still fit."""
    rng = random.Random(0)
    for _ in range(300):
        n_units, n_cands = rng.randint(1, 5), rng.randint(1, 4)
        costs = [[rng.choice([1, 2, 3, 4, 8]) * rng.randint(1, 50) for _ in range(n_cands)] for _ in range(n_units)]
        losses = [[rng.random() for _ in range(n_cands)] for _ in range(n_units)]
        floor, top = math.fsum(min(c) for c in costs), math.fsum(max(c) for c in costs)
        budget = rng.uniform(floor, top)
        got = choose(costs, losses, budget)
        assert sum(c[j] for c, j in zip(costs, got.picks)) <= budget
        assert got.loss == pytest.approx(sum(lo[j] for lo, j in zip(losses, got.picks)))
        spent = sum(c[j] for c, j in zip(costs, got.picks))
        for u in range(n_units):   # no single move left that lowers the loss and fits
            for j in range(n_cands):
                if spent - costs[u][got.picks[u]] + costs[u][j] <= budget:
                    assert losses[u][j] >= losses[u][got.picks[u]] - 1e-12


def test_impossible_budget_is_refused():
    with pytest.raises(BudgetError):
        choose([[10, 20], [10, 30]], [[1, 0], [1, 0]], 19.5)


def test_same_sensitivity_at_a_uniform_size_gives_the_uniform_choice():
    """Layers of the tiny Llama's shapes, every weight equally sensitive (loss per weight 4**-bits, from the
    quantization noise of a uniform grid): the budget of uniform 3-bit g32 picks 3-bit g32 everywhere."""
    shapes = [(96, 96), (48, 96), (48, 96), (96, 96), (160, 96), (160, 96), (96, 160)] * 2
    cands = [{"bits": b, "group_size": 32} for b in (2, 3, 4, 8)]
    costs = [[affine_cost(n, k, c) for c in cands] for n, k in shapes]
    losses = [[n * k * 4.0 ** -c["bits"] for c in cands] for n, k in shapes]
    budget = sum(affine_cost(n, k, cands[1]) for n, k in shapes)
    assert choose(costs, losses, budget).picks == [1] * len(shapes)
    assert choose(costs, losses, budget - 1).picks != [1] * len(shapes)   # one bit less: not all 3-bit fits


def test_expert_projections_are_one_unit():
    targets = ["m.layers.0.q", "m.layers.0.experts.0.up", "m.layers.0.experts.1.down", "m.layers.0.o"]
    assert units_of(targets, ["m.layers.0.experts"]) == {
        "m.layers.0.q": ["m.layers.0.q"], "m.layers.0.o": ["m.layers.0.o"],
        "m.layers.0.experts": ["m.layers.0.experts.0.up", "m.layers.0.experts.1.down"]}


def test_cost_is_the_stored_bits_of_the_layer():
    # 160 x 96, 3-bit g32: 36 code bytes, 3 fp16 scales and 3 uint8 zeros per row, an int32 g_idx per column
    assert affine_cost(160, 96, {"bits": 3, "group_size": 32}) == 8 * (160 * (36 + 6 + 3) + 96 * 4)


# ------------------------------------------------------------------------------------------ config fields

@pytest.mark.parametrize("cls", [hf_vq.GPTQConfig, hf_vq.AdaScaleConfig])
def test_candidates_a_method_cannot_do_are_refused(cls):
    with pytest.raises(ConfigError, match=r"bits must be one of \(2, 3, 4, 8\) in candidates\[0\]"):
        cls(average_bits=3.0, candidates=[{"bits": 5, "group_size": 128}])
    with pytest.raises(ConfigError, match=r"candidates\[1\] must have exactly the keys bits, group_size"):
        cls(average_bits=3.0, candidates=[{"bits": 4, "group_size": 128}, {"index_bits": 6, "vector_dim": 2}])
    with pytest.raises(ConfigError, match=r"candidates\[1\] repeats"):
        cls(average_bits=3.0, candidates=[{"bits": 4, "group_size": 128}, {"bits": 4, "group_size": 128}])
    with pytest.raises(ConfigError, match=r"candidates must be a non-empty list"):
        cls(average_bits=3.0, candidates=[])
    with pytest.raises(ConfigError, match="average_bits=1.5 is below the smallest candidate"):
        cls(average_bits=1.5)
    with pytest.raises(ConfigError, match="average_bits must be None or a number of bits > 0"):
        cls(average_bits=0)
    with pytest.raises(ConfigError, match="module_overrides .* sets bits/group_size, which average_bits chooses"):
        cls(average_bits=3.0, module_overrides={"mlp": {"bits": 8}})
    cls(average_bits=3.0, module_overrides={"mlp": {"skip": True}})  # skips stay allowed


def test_lpbq_candidates_are_checked():
    with pytest.raises(ConfigError, match=r"candidates: .* cannot be an LPBQ grid"):
        hf_vq.AdaScaleConfig(weight_granularity="lpbq", sym=True, group_size=64, average_bits=4.0,
                             candidates=[{"bits": 8, "group_size": 64}, {"bits": 4, "group_size": 64}])


def test_candidates_without_average_bits_warn():
    with pytest.warns(UserWarning, match="candidates=.* has no effect: average_bits is None"):
        hf_vq.GPTQConfig(candidates=[{"bits": 4, "group_size": 128}])


def test_fields_round_trip():
    cfg = hf_vq.GPTQConfig(average_bits=3.25, candidates=[{"bits": 3, "group_size": 64}, {"bits": 4, "group_size": 64}])
    again = hf_vq.GPTQConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.average_bits == 3.25 and again.candidate_list() == cfg.candidate_list()


# ------------------------------------------------------------------------------------------ a real run

CANDS = [{"bits": b, "group_size": 32} for b in (2, 4, 8)]


def stored_bits(model) -> tuple[float, int]:
    bits = weights = 0
    for mod in model.modules():
        if getattr(mod, "layer_type", None) is not None and hasattr(mod, "in_features"):
            n = mod.in_features * mod.out_features
            bits, weights = bits + mod.bits_per_value() * n, weights + n
    return bits, weights


@pytest.fixture(scope="module")
def mixed_model(tiny_llama_dir, calib_ids):
    cfg = hf_vq.GPTQConfig(average_bits=3.5, candidates=CANDS, sym=True, dataset=calib_ids, num_samples=8,
                           seq_len=32)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg, dtype=torch.float32)


def test_run_meets_the_budget_and_mixes(mixed_model):
    bits, weights = stored_bits(mixed_model)
    assert weights == 2 * (2 * 96 * 96 + 2 * 48 * 96 + 3 * 160 * 96)
    assert bits / weights <= 3.5
    # the budget is used: no layer left at 2 bits could move to 4 bits within what is left
    left = 3.5 * weights - bits
    at_two = [m for m in mixed_model.modules() if getattr(m, "bits", None) == 2 and hasattr(m, "qweight")]
    assert at_two and all(affine_cost(m.out_features, m.in_features, CANDS[1])
                          - affine_cost(m.out_features, m.in_features, CANDS[0]) > left for m in at_two)
    report = mixed_model.hf_quantizer.last_run["allocation"]
    assert report["achieved_bits"] == pytest.approx(bits / weights)
    chosen = {mixed_model.get_submodule(n).bits for n in report["units"]}
    assert len(chosen) > 1
    cfg = mixed_model.config.quantization_config
    for name, entry in cfg.allocation.items():
        assert mixed_model.get_submodule(name).bits == entry["bits"] == report["units"][name]["bits"]


@pytest.mark.usefixtures("exact_kernels")
def test_mixed_checkpoint_reloads_exactly(mixed_model, tmp_path):
    mixed_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["average_bits"] == 3.5 and saved["allocation"] == mixed_model.config.quantization_config.allocation
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, mixed_model(ids).logits)
    for name in saved["allocation"]:
        assert again.get_submodule(name).bits == mixed_model.get_submodule(name).bits


@pytest.mark.usefixtures("exact_kernels")
def test_mixed_exports_to_compressed_tensors_read_by_transformers(mixed_model, tmp_path):
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = mixed_model(ids).logits
    hf_vq.export_checkpoint(mixed_model, tmp_path / "ct", "compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    schemes = {g["weights"]["num_bits"]: set(g["targets"]) for g in qc["config_groups"].values()}
    alloc = mixed_model.config.quantization_config.allocation
    assert schemes == {b: {n for n, e in alloc.items() if e["bits"] == b} for b in {e["bits"] for e in alloc.values()}}
    got = read_logits(tmp_path / "ct", ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_impossible_budget_for_the_model_names_average_bits(tiny_llama_dir, calib_ids):
    # 2.0 passes the config check (no candidate below 2 bits), but scales and g_idx put every layer above it
    cfg = hf_vq.GPTQConfig(average_bits=2.0, candidates=CANDS, dataset=calib_ids, num_samples=4, seq_len=32)
    with pytest.raises(ConfigError, match=r"average_bits=2.0 is below what the candidates can store for this model: "
                                          r"at least \d\.\d{4} bits per weight"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg, dtype=torch.float32)


@pytest.mark.usefixtures("exact_kernels")
def test_gguf_exports_exact_mixed_layers_and_names_the_rest(bpe_llama_dir, calib_ids, tmp_path):
    import gguf

    ids = torch.randint(0, 200, (8, 32), generator=torch.Generator().manual_seed(2))
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2

    def halfway(lo, hi):   # average bits halfway between every layer at setting lo and every layer at hi
        size = [sum(affine_cost(n, k, {"bits": b, "group_size": 32}) for n, k in shapes) for b in (lo, hi)]
        return sum(size) / 2 / sum(n * k for n, k in shapes)

    cfg = hf_vq.GPTQConfig(average_bits=halfway(4, 8), sym=True, dataset=ids, num_samples=8, seq_len=32,
                           candidates=[{"bits": 4, "group_size": 32}, {"bits": 8, "group_size": 32}])
    model = AutoModelForCausalLM.from_pretrained(bpe_llama_dir, quantization_config=cfg, dtype=torch.float32)
    alloc = model.config.quantization_config.allocation
    assert {e["bits"] for e in alloc.values()} == {4, 8}
    hf_vq.export_checkpoint(model, tmp_path / "g", "gguf", dtype="float32")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "g" / "model.gguf")).tensors}
    kind = {4: "Q4_0", 8: "Q8_0"}
    assert types["blk.0.attn_q.weight"] == kind[alloc["model.layers.0.self_attn.q_proj"]["bits"]]
    assert types["blk.1.ffn_down.weight"] == kind[alloc["model.layers.1.mlp.down_proj"]["bits"]]

    cfg3 = hf_vq.GPTQConfig(average_bits=halfway(3, 4), sym=True, dataset=ids, num_samples=8, seq_len=32,
                            candidates=[{"bits": 3, "group_size": 32}, {"bits": 4, "group_size": 32}])
    model3 = AutoModelForCausalLM.from_pretrained(bpe_llama_dir, quantization_config=cfg3, dtype=torch.float32)
    three = sorted(n for n, e in model3.config.quantization_config.allocation.items() if e["bits"] == 3)
    assert three
    with pytest.raises(ExportError, match=r"3-bit sym has no exact") as err:
        hf_vq.export_checkpoint(model3, tmp_path / "g3", "gguf")
    assert str(err.value).split(":")[0] in three   # the refusal names a 3-bit layer


def test_model_card_shows_the_allocation(mixed_model, tmp_path):
    from hf_vq.hub import render_model_card

    card = str(render_model_card(mixed_model, None, bits_plot_path=tmp_path / "bits.png"))
    alloc = mixed_model.config.quantization_config.allocation
    downs = [alloc[f"model.layers.{i}.mlp.down_proj"]["bits"] for i in (0, 1)]
    row = next(line for line in card.splitlines() if line.startswith("| `model.layers.*.mlp.down_proj` |"))
    for b in set(downs):
        assert f"{b}-bit g32 x{downs.count(b)}" in row
    assert "![stored bits per weight by block](bits.png)" in card
    assert (tmp_path / "bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "`allocation`" not in card.split("### Parameters")[1].split("###")[0].replace(
        "`layers` and `allocation` records", "")   # summarized, not dumped as a parameter


# ------------------------------------------------------------------------------------------ the sensitivity pass

@pytest.mark.parametrize("act_order", [True, False])
def test_shared_factor_gives_gptq_codes_bit_for_bit(act_order):
    from hf_vq.algorithms.gptq import gptq_factor, gptq_quantize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 96, generator=g) @ torch.randn(96, 96, generator=g)
    x[:, 5] = 0   # a dead input: GPTQ zeroes its column
    h = 2 * x.T @ x / x.shape[0]
    factor = gptq_factor(h, 0.01, act_order)
    for w, bits, group in [(torch.randn(40, 96, generator=g), 3, 32), (torch.randn(24, 96, generator=g), 2, 64)]:
        plain = gptq_quantize(w, h, bits, group, False, 0.01, act_order, 32)
        shared = gptq_quantize(w, h, bits, group, False, 0.01, act_order, 32, factor=factor)
        assert torch.equal(plain.codes, shared.codes)
        assert torch.equal(plain.scales, shared.scales) and torch.equal(plain.zeros, shared.zeros)
    with pytest.raises(ValueError, match="factor was computed with act_order"):
        gptq_quantize(w, h, 2, 64, False, 0.01, not act_order, 32, factor=factor)


def test_estimate_does_not_depend_on_the_scale_of_a_layers_inputs():
    """Two layers computing the same outputs, one from inputs 8x larger (weights 8x smaller): each candidate's
    row errors d H d^T, and so every estimator's loss, agree (H grows 64x, the GPTQ error shrinks 8x)."""
    from types import SimpleNamespace

    from hf_vq.pipeline.mixed import ESTIMATORS, candidate_errors, estimated_loss

    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)
    w = torch.randn(48, 64, generator=g)
    cfg = SimpleNamespace(percdamp=0.01, act_order=True, block_size=32, clip_search=False)
    cands = [{"bits": b, "group_size": 32} for b in (2, 3, 4)]
    h = 2 * x.T @ x / x.shape[0]
    one = candidate_errors({"a": w}, h, cands, False, cfg)["a"]
    big = candidate_errors({"b": w / 8}, h * 64, cands, False, cfg)["b"]
    fisher = {"a": torch.rand(48, generator=g, dtype=torch.float64)}
    fisher["b"] = fisher["a"]
    torch.testing.assert_close(big["errors"], one["errors"], rtol=1e-3, atol=0)
    for est in ESTIMATORS:
        for j in range(len(cands)):
            assert estimated_loss(big, fisher, "b", est, j) == pytest.approx(
                estimated_loss(one, fisher, "a", est, j), rel=1e-3)
    assert (one["errors"][0] > one["errors"][1]).all() and (one["errors"][1] > one["errors"][2]).all()


# ------------------------------------------------------------------ scoring under the token-average Hessian

def _split_hessians(x: torch.Tensor, weight: float):
    """(weighted H, plain token-average H) of inputs x [windows, tokens, features], collected in one pass."""
    from hf_vq.algorithms.hessian import HessianAccumulator

    acc = HessianAccumulator(x.shape[-1], first_token_weight=weight, split_first=True)
    acc.add(x[:3])
    acc.add(x[3:])
    return acc.finalize(), acc.token_mean


@pytest.mark.parametrize("k", [40, 1100])  # plain and tiled (upper triangle) accumulation
def test_split_first_token_gives_both_hessians(k):
    """One pass keeps both: the weighted H (as GPTQ collects it) and the plain average, each against x^T x computed
    directly in float64."""
    x = torch.randn(5, 24, k, generator=torch.Generator().manual_seed(2))
    x[:, 0, :3] *= 40  # a massive first token
    weighted, plain = _split_hessians(x, 16.0)
    flat = x.reshape(-1, k).double()
    ref_plain = 2.0 / flat.shape[0] * flat.T @ flat
    x0 = x[:, 0].double()
    ref_weighted = ref_plain + 2.0 / flat.shape[0] * 15.0 * x0.T @ x0
    torch.testing.assert_close(plain.double(), ref_plain, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(weighted.double(), ref_weighted, rtol=1e-5, atol=1e-3)


def test_massive_first_token_does_not_inflate_the_estimate():
    """A layer whose windows start with a massive token (100x in 4 channels): GPTQ quantizes under the weighted H
    (first token 16x) but the estimate is scored under the plain token average, so it stays near the estimate at
    first token weight 1 (GPTQ's trade-off for the first token costs the other tokens a little), while scoring under
    the weighted H itself rates the layer several times more sensitive."""
    from types import SimpleNamespace

    from hf_vq.pipeline.mixed import candidate_errors

    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 64, 64, generator=g) @ torch.randn(64, 64, generator=g)
    x[:, 0, :4] *= 100
    w = torch.randn(48, 64, generator=g)
    cfg = SimpleNamespace(percdamp=0.01, act_order=True, block_size=32, clip_search=False)
    cands = [{"bits": b, "group_size": 32} for b in (2, 3, 4)]
    h1, _ = _split_hessians(x, 1.0)
    h16, plain = _split_hessians(x, 16.0)
    at_one = candidate_errors({"a": w}, h1, cands, False, cfg)["a"]["errors"].sum(1)
    scored = candidate_errors({"a": w}, h16, cands, False, cfg, score=plain)["a"]["errors"].sum(1)
    weighted = candidate_errors({"a": w}, h16, cands, False, cfg)["a"]["errors"].sum(1)
    assert ((scored / at_one) < 2.5).all(), scored / at_one
    assert ((weighted / at_one) > 6.0).all(), weighted / at_one
    assert (scored[:-1] > scored[1:]).all()  # fewer bits, larger error


def test_sensitivity_pass_collects_the_plain_hessian_beside_gptqs(tiny_llama_dir, calib_ids):
    """collect_hessians with token_means: the Hessians it returns are the ones a uniform run collects (first token
    weighted), and token_means holds what a pass at first token weight 1 collects."""
    import contextlib

    from hf_vq.pipeline.blocks import capture_block_inputs, collect_hessians, find_decoder_blocks

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    _, blocks = find_decoder_blocks(model)
    linears = {n: m for n, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear)}
    cache = capture_block_inputs(model, blocks[0], calib_ids[:4], 2, contextlib.nullcontext)
    plain: dict = {}
    got = collect_hessians(blocks[0], linears, cache, first_token_weight=16.0, token_means=plain)
    uniform = collect_hessians(blocks[0], linears, cache, first_token_weight=16.0)
    at_one = collect_hessians(blocks[0], linears, cache, first_token_weight=1.0)
    assert set(plain) == set(got) == set(linears)
    for n in linears:
        torch.testing.assert_close(got[n], uniform[n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain[n], at_one[n], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got[n], plain[n], rtol=1e-3)  # the first token's weight shows


def test_hessian_pass_hands_back_the_block_outputs(tiny_llama_dir, calib_ids):
    """collect_hessians with outputs: the pass runs to the block's end and returns each batch's block output, bit for
    bit what a plain forward gives, with the same Hessians as the pass that stops after the last Linear."""
    import contextlib

    from hf_vq.pipeline.blocks import _run_block, capture_block_inputs, collect_hessians, find_decoder_blocks

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    _, blocks = find_decoder_blocks(model)
    linears = {n: m for n, m in blocks[1].named_modules() if isinstance(m, torch.nn.Linear)}
    cache = capture_block_inputs(model, blocks[1], calib_ids[:6], 2, contextlib.nullcontext)
    outputs: list = []
    got = collect_hessians(blocks[1], linears, cache, first_token_weight=4.0, outputs=outputs)
    stopped = collect_hessians(blocks[1], linears, cache, first_token_weight=4.0)
    assert len(outputs) == len(cache) == 3
    with torch.no_grad():
        for out, (hidden, kw) in zip(outputs, cache):
            assert torch.equal(out, _run_block(blocks[1], hidden, kw))
    for n in linears:
        assert torch.equal(got[n], stopped[n])


def test_token_weighted_hessian_matches_per_token_gradients(tiny_llama_dir, calib_ids):
    """tokenfisher's Hessian of a layer, 2 sum_t a_t x_t x_t^T / sum_t a_t with a_t the squared norm of the loss
    gradient at the layer's output for token t, against the same sum built from retained gradients in float64."""
    from hf_vq.pipeline.mixed import fisher_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    targets = {n: model.get_submodule(n) for n in names}
    ids = calib_ids[:4]
    token_h: dict = {}
    fisher = fisher_weights(model, targets, ids, token_hessians=token_h)
    seen = {}

    def keep(name):
        def hook(_m, args, out):
            out.retain_grad()
            seen[name] = (args[0].detach(), out)
        return hook
    handles = [targets[n].register_forward_hook(keep(n)) for n in names]
    grads = {n: [] for n in names}
    for start in range(0, ids.shape[0], 2):  # fisher_weights' batches: the loss is a mean per batch
        batch = ids[start:start + 2]
        model.zero_grad()
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        for n in names:
            grads[n].append((seen[n][0].double(), seen[n][1].grad.double()))
    for h in handles:
        h.remove()
    for n in names:
        x = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in grads[n]])
        g = torch.cat([g.reshape(-1, g.shape[-1]) for _, g in grads[n]])
        a = g.pow(2).sum(1, keepdim=True)
        ref = 2 * (x * a).T @ x / a.sum()
        torch.testing.assert_close(token_h[n].double(), ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
        torch.testing.assert_close(fisher[n], g.pow(2).sum(0), rtol=1e-4, atol=0)


def test_per_layer_score_matrices_score_each_layer_separately():
    """Layers sharing a GPTQ Hessian but scored under their own matrices: the stacked pass gives each layer the
    errors of a pass over that layer alone."""
    from types import SimpleNamespace

    from hf_vq.pipeline.mixed import candidate_errors

    g = torch.Generator().manual_seed(6)
    x = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)
    h = 2 * x.T @ x / x.shape[0]
    s = {n: 2 * (x * torch.rand(256, 1, generator=g)).T @ x / 256 for n in "ab"}
    w = {"a": torch.randn(40, 64, generator=g), "b": torch.randn(24, 64, generator=g)}
    cfg = SimpleNamespace(percdamp=0.01, act_order=True, block_size=32, clip_search=False)
    cands = [{"bits": b, "group_size": 32} for b in (2, 3)]
    both = candidate_errors(w, h, cands, False, cfg, score=s)
    for n in "ab":
        alone = candidate_errors({n: w[n]}, h, cands, False, cfg, score=s[n])[n]
        torch.testing.assert_close(both[n]["errors"], alone["errors"], rtol=1e-5, atol=0)
        torch.testing.assert_close(both[n]["energy"], alone["energy"], rtol=1e-5, atol=0)


def test_an_allocation_with_unknown_keys_or_values_is_refused_at_construction():
    with pytest.raises(hf_vq.ConfigError, match="allocation") as e:
        hf_vq.GPTQConfig(bits=4, allocation={"model.layers.0.mlp.down_proj": {"bitz": 3}})
    assert e.value.field == "allocation"
    with pytest.raises(hf_vq.ConfigError, match="allocation") as e:
        hf_vq.GPTQConfig(bits=4, allocation={"model.layers.0.mlp.down_proj": {"bits": 5}})
    assert e.value.field == "allocation"
    cfg = hf_vq.GPTQConfig(bits=4, allocation={"model.layers.0.mlp.down_proj": {"bits": 8, "group_size": 128}})
    assert cfg.spec_for("model.layers.0.mlp.down_proj").bits == 8
