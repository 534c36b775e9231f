"""Mixed precision for GPTVQ (GPTVQConfig(average_bits=...)): the config fields, what a setting stores, the
measurement on whole row blocks, and a run on a tiny model (budget, reload, model card, CLI)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_vq
from hf_vq.algorithms.gptvq import gptvq_quantize
from hf_vq.config import ConfigError
from hf_vq.formats.vq import VQLayout
from hf_vq.nn.vqlinear import VQLinear
from hf_vq.pipeline.mixed_vq import block_rows, vq_candidate_errors, vq_cost
from tests.test_mixed import stored_bits

CANDS = [{"vector_dim": 2, "index_bits": 4, "rows_per_block": 8},
         {"vector_dim": 2, "index_bits": 6, "rows_per_block": 16},
         {"vector_dim": 2, "index_bits": 8, "rows_per_block": 32}]


# ------------------------------------------------------------------------------------------ config fields

def test_candidates_gptvq_cannot_do_are_refused():
    with pytest.raises(ConfigError, match=r"vector_dim must be one of \(1, 2, 4\) in candidates\[0\]") as e:
        hf_vq.GPTVQConfig(average_bits=3.0, candidates=[{"vector_dim": 3, "index_bits": 6, "rows_per_block": 32}])
    assert e.value.field == "candidates"
    with pytest.raises(ConfigError, match=r"index_bits must be at most 8 in candidates\[0\], got 9"):
        hf_vq.GPTVQConfig(average_bits=3.0, candidates=[{"vector_dim": 2, "index_bits": 9, "rows_per_block": 32}])
    with pytest.raises(ConfigError, match=r"candidates\[0\] must have exactly the keys vector_dim, index_bits, "
                                          r"rows_per_block"):
        hf_vq.GPTVQConfig(average_bits=3.0, candidates=[{"bits": 3, "group_size": 128}])
    with pytest.raises(ConfigError, match=r"candidates\[0\] has vector_dim=4, which does not divide "
                                          r"cols_per_block=6") as e:
        hf_vq.GPTVQConfig(average_bits=3.0, vector_dim=2, cols_per_block=6,
                          candidates=[{"vector_dim": 4, "index_bits": 8, "rows_per_block": 32}])
    assert e.value.field == "candidates"
    # the smallest default candidate stores 8 / 4 = 2 bits per weight before its codebooks
    with pytest.raises(ConfigError, match="average_bits=1.9 is below the smallest candidate") as e:
        hf_vq.GPTVQConfig(average_bits=1.9)
    assert e.value.field == "average_bits"
    with pytest.raises(ConfigError, match="allocation") as e:
        hf_vq.GPTVQConfig(allocation={"model.layers.0.mlp.down_proj": {"bits": 3}})
    assert e.value.field == "allocation"


def test_gptvq_mixed_fields_round_trip_and_set_each_layer():
    cfg = hf_vq.GPTVQConfig(average_bits=3.0, candidates=CANDS,
                            allocation={"model.layers.0.mlp": {"vector_dim": 2, "index_bits": 8, "rows_per_block": 32}})
    again = hf_vq.GPTVQConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.average_bits == 3.0 and again.candidate_list() == CANDS
    # an entry covers the modules under it (a fused experts module's projections); other layers keep the config's
    assert again.vq_setting("model.layers.0.mlp.down_proj") == CANDS[2]
    assert again.vq_setting("model.layers.1.mlp.down_proj") == {"vector_dim": 2, "index_bits": 6,
                                                                 "rows_per_block": 32}


# ------------------------------------------------------------------------------------------ cost and measurement

@pytest.mark.parametrize("shape", [(96, 96), (48, 96), (160, 96), (96, 160), (576, 1536)])
@pytest.mark.parametrize("setting", CANDS + [{"vector_dim": 4, "index_bits": 8, "rows_per_block": 256}])
def test_cost_is_the_stored_bits_of_the_layer(shape, setting):
    cfg = hf_vq.GPTVQConfig()
    n, k = shape
    lay = VQLayout(n, k, setting["vector_dim"], setting["index_bits"], cfg.codebook_bits, setting["rows_per_block"],
                   cfg.cols_per_block, cfg.data_normalization)
    mod = VQLinear(lay, bias=False, device="meta")
    stored = 8 * sum(b.numel() * b.element_size() for b in mod.buffers())
    assert vq_cost(cfg, n, k, setting) == pytest.approx(stored, rel=1e-12)


def test_block_rows_are_whole_evenly_spread_blocks():
    rows = block_rows(576, 32, 256)
    assert rows.numel() == 256 and torch.equal(rows.reshape(8, 32)[:, 0] % 32, torch.zeros(8, dtype=torch.long))
    starts = rows.reshape(8, 32)[:, 0] // 32
    assert starts[0] == 0 and starts[-1] == 576 // 32 - 1          # from the first block to the last full one
    assert torch.equal(rows.reshape(8, 32), starts[:, None] * 32 + torch.arange(32))
    assert torch.equal(block_rows(192, 256, 256), torch.arange(192))   # one block: every row
    assert torch.equal(block_rows(576, 256, 256), torch.arange(256))   # the partial last block is left out
    assert torch.equal(block_rows(200, 8, 256), torch.arange(200))


def test_measured_blocks_are_quantized_as_the_whole_layer_quantizes_them():
    """Row blocks are independent given H: the candidate's error on the subset is the full run's error on those
    rows (codebook_update off: whether the update is kept is decided over the whole layer)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(96, 64, generator=g)
    cfg = hf_vq.GPTVQConfig(kmeans_iterations=10, cols_per_block=32, codebook_update=False)
    got = vq_candidate_errors({"a": w}, h, CANDS, cfg, h, limit=32)["a"]
    for j, c in enumerate(CANDS):
        rows = got["rows"][j]
        assert rows.numel() < 96 or c["rows_per_block"] >= 32
        full = gptvq_quantize(w, h, vector_dim=2, index_bits=c["index_bits"], rows_per_block=c["rows_per_block"],
                              kmeans_iterations=10, cols_per_block=32, codebook_update=False).dequantize()
        d = (w - full)[rows]
        torch.testing.assert_close(got["errors"][j], (d @ h * d).sum(1).double(), rtol=1e-4, atol=1e-6)
    means = [float(e.mean()) for e in got["errors"]]
    assert means[0] > means[1] > means[2]   # wider indices, smaller error


# ------------------------------------------------------------------------------------------ a real run

@pytest.fixture(scope="module")
def vq_mixed_model(tiny_llama_dir, calib_ids):
    cfg = hf_vq.GPTVQConfig(average_bits=3.6, candidates=CANDS, dataset=calib_ids, num_samples=8, seq_len=32,
                            kmeans_iterations=10)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg, dtype=torch.float32)


def test_run_meets_the_budget_and_mixes(vq_mixed_model):
    bits, weights = stored_bits(vq_mixed_model)
    assert weights == 2 * (2 * 96 * 96 + 2 * 48 * 96 + 3 * 160 * 96)
    assert bits / weights <= 3.6
    cfg = vq_mixed_model.config.quantization_config
    report = vq_mixed_model.hf_quantizer.last_run["allocation"]
    assert report["achieved_bits"] == pytest.approx(bits / weights)
    assert len({e["index_bits"] for e in cfg.allocation.values()}) > 1
    for name, entry in cfg.allocation.items():
        lay = vq_mixed_model.get_submodule(name).layout
        assert (lay.vector_dim, lay.index_bits, lay.rows_per_block) == tuple(entry[k] for k in CANDS[0])
    # the budget is used: no layer could move to the next wider setting within what is left
    left = 3.6 * weights - bits
    for name, entry in cfg.allocation.items():
        j = CANDS.index(entry)
        if j + 1 < len(CANDS):
            mod = vq_mixed_model.get_submodule(name)
            n, k = mod.out_features, mod.in_features
            assert vq_cost(cfg, n, k, CANDS[j + 1]) - vq_cost(cfg, n, k, CANDS[j]) > left


@pytest.mark.usefixtures("exact_kernels")
def test_mixed_gptvq_checkpoint_reloads_exactly(vq_mixed_model, tmp_path):
    vq_mixed_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["allocation"] == vq_mixed_model.config.quantization_config.allocation
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, vq_mixed_model(ids).logits)
    for name in saved["allocation"]:
        assert again.get_submodule(name).layout == vq_mixed_model.get_submodule(name).layout


def test_model_card_shows_the_gptvq_allocation(vq_mixed_model, tmp_path):
    from hf_vq.hub import render_model_card

    card = str(render_model_card(vq_mixed_model, None, bits_plot_path=tmp_path / "bits.png"))
    alloc = vq_mixed_model.config.quantization_config.allocation
    q = [alloc[f"model.layers.{i}.self_attn.q_proj"] for i in (0, 1)]
    row = next(line for line in card.splitlines() if line.startswith("| `model.layers.*.self_attn.q_proj` |"))
    for s in q:
        label = f"{s['vector_dim']}D {s['index_bits']}-bit index, {s['rows_per_block']} rows x{q.count(s)}"
        assert label in row
    assert (tmp_path / "bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_impossible_gptvq_budget_names_average_bits(tiny_llama_dir, calib_ids):
    # 2.1 passes the config check (4-bit indices of 2D vectors: 2 bits), but every layer's codebooks add more
    cfg = hf_vq.GPTVQConfig(average_bits=2.1, candidates=CANDS, dataset=calib_ids, num_samples=4, seq_len=32)
    lowest = sum(vq_cost(cfg, n, k, CANDS[0]) for n, k in [(96, 96), (48, 96), (48, 96), (96, 96), (160, 96),
                                                          (160, 96), (96, 160)]) * 2
    weights = 2 * (2 * 96 * 96 + 2 * 48 * 96 + 3 * 160 * 96)
    assert lowest / weights > 2.1
    with pytest.raises(ConfigError, match=r"average_bits=2.1 is below what the candidates can store for this model: "
                                          r"at least (\d\.\d{4}) bits") as e:
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg, dtype=torch.float32)
    assert e.value.field == "average_bits"
    assert float(e.value.args[0].split("at least ")[1].split()[0]) == pytest.approx(lowest / weights, abs=1e-4)


def test_cli_reads_gptvq_candidates():
    from hf_vq.cli.quantize_flags import parse_candidates

    assert parse_candidates("2d6:32,4d8:256") == [{"vector_dim": 2, "index_bits": 6, "rows_per_block": 32},
                                                  {"vector_dim": 4, "index_bits": 8, "rows_per_block": 256}]
    assert parse_candidates("4:128,2:64") == [{"bits": 4, "group_size": 128}, {"bits": 2, "group_size": 64}]
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="DIMdINDEX_BITS:ROWS"):
        parse_candidates("2d6")


def test_aimet_encodings_carry_each_layers_own_setting(vq_mixed_model, tmp_path):
    enc = json.loads(hf_vq.export_encodings(vq_mixed_model, tmp_path / "enc").read_text())
    by_name = {e["name"]: e for e in enc["param_encodings"]}
    alloc = vq_mixed_model.config.quantization_config.allocation
    assert len(by_name) == len(alloc)
    for name, s in alloc.items():
        e = by_name[name + ".weight"]
        assert e["enc_type"] == "VECTOR"
        assert (e["vector_dim"], e["index_bw"], e["rows_per_block"]) == (s["vector_dim"], s["index_bits"],
                                                                         s["rows_per_block"])
