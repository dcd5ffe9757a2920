"""launch/bench.py (jaxforget vs the PyTorch reference in launch/bench_reference.py), on a tiny config.

The two halves of a benchmark cell run on one diffusers folder (a one-level UNet built by
bench.build_random_folder beside the shipped toy-world text encoder), the same batch and the same
(t, ε) draws. Checked: the losses, their terms and the pre-clipping gradient norm agree at step 0
(relative 1e-4: fp32 convolutions / matmuls in different libraries; measured ~1e-7) and after
one AdamW step (relative 1e-3: Adam's normalized update amplifies the last-bit differences of
tiny gradient entries); the trainable counts agree; and the command line writes a table and a
JSON file with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))

import bench  # noqa: E402
import bench_reference  # noqa: E402

# one resolution level (compile time), still two cross-attention layers (down and up) + mid
TINY = {
    "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [32], "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D"], "cross_attention_dim": 64, "attention_head_dim": 4,
    "norm_num_groups": 8,
}
STEP0_RTOL = 1e-4
STEP1_RTOL = 1e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    folder = bench.build_random_folder(root / "tiny", TINY, seed=1)
    return root, folder


def _cell(tiny, method):
    root, folder = tiny
    # threads=1: the in-process torch half must not fight the other test processes with OpenMP
    return bench.prepare_cell(method, "tiny", folder, root, batch=2, steps=1, warmup=1, replay_images=2,
                              sampler_steps=2, guidance=1.0, device="cpu", threads=1)


def _close(a, b, rtol, what):
    assert abs(a - b) <= rtol * max(abs(b), 1e-8), (what, a, b, abs(a - b) / max(abs(b), 1e-12))


@pytest.mark.parametrize("method", ["dfr", "duge"])
def test_jax_and_torch_agree_on_the_same_batch(tiny, method):
    cell = _cell(tiny, method)
    cell.jax = bench.run_jax_worker(cell.spec)
    cell.torch = bench_reference.run_worker(cell.spec)
    j, t = cell.jax, cell.torch

    assert j["n_trainable"] == t["n_trainable"] > 0
    if method == "duge":  # attn2 only
        assert j["n_trainable"] < bench._unet_param_count(tiny[1])
    terms = ("unlearn", "preserve", "reg") if method == "dfr" else ("eps", "attn", "prior")
    m_j, m_t = j["metrics"][0], t["metrics"][0]
    # at step 0 the student is θ_{k-1}: DFR's distillation and L2 terms are exactly zero on both sides
    zero_at_0 = ("preserve", "reg") if method == "dfr" else ()
    for k in ("loss", "grad_norm", *terms):
        if k in zero_at_0:
            assert m_j[k] == 0.0 and m_t[k] == 0.0, (k, m_j[k], m_t[k])
            continue
        assert m_t[k] > 0, (k, m_t[k])
        _close(m_j[k], m_t[k], STEP0_RTOL, f"step 0 {k}")
    # one AdamW step later (same draws): still the same trajectory
    _close(j["losses"][1], t["losses"][1], STEP1_RTOL, "step 1 loss")
    if method == "dfr":  # after the update both terms are > 0; both moved the same parameters alike
        for k in zero_at_0:
            assert j["metrics"][1][k] > 0
            _close(j["metrics"][1][k], t["metrics"][1][k], 1e-2, f"step 1 {k}")

    s = bench.summarize(cell, request_steps=10)
    assert s["loss0_rel_diff"] <= STEP0_RTOL
    for k in ("step_ratio", "jax_steps_per_s", "torch_steps_per_s", "jax_peak_rss_mb", "torch_peak_rss_mb",
              "request_ratio_warm", "request_ratio_cold", "jax_gen_warm_s", "torch_gen_warm_s"):
        assert np.isfinite(s[k]) and s[k] > 0, k
    # the whole-request figures are composed of the measured parts
    assert s["jax_request_warm_s"] == pytest.approx(j["gen_warm_s"] + 10 * j["step_median_s"])
    # both teachers produced finite latents of the same spread (same sampler, same weights)
    assert j["gen_latent_std"] == pytest.approx(t["gen_latent_std"], rel=0.5)
    assert "loss0 rel diff" in bench.main_table([s]).splitlines()[0]


@pytest.mark.slow  # ~70 s: two fresh worker processes, the jax one compiles without a cache
def test_command_line_writes_table_and_json(tiny, tmp_path, capsys):
    _, folder = tiny
    out = tmp_path / "bench.json"
    bench.main(["--model-dir", str(folder), "--method", "dfr", "--batch", "2", "--steps", "1", "--warmup", "1",
                "--replay-images", "2", "--sampler-steps", "2", "--threads", "1", "--request-steps", "5",
                "--work-dir", str(tmp_path / "work"), "--json", str(out)])
    text = capsys.readouterr().out
    assert "step ratio" in text and "req ratio warm" in text and "dfr" in text
    report = json.loads(out.read_text())
    (res,) = report["results"]
    s = res["summary"]
    for k in ("jax_steps_per_s", "torch_steps_per_s", "step_ratio", "jax_peak_rss_mb", "torch_peak_rss_mb",
              "jax_compile_s", "jax_request_warm_s", "torch_request_warm_s", "request_ratio_warm",
              "request_ratio_cold", "loss0_rel_diff"):
        assert isinstance(s[k], (int, float)) and np.isfinite(s[k]), k
    assert s["loss0_rel_diff"] <= STEP0_RTOL
    assert res["jax"]["framework"] == "jax" and res["torch"]["framework"] == "torch"
    assert res["jax"]["threads"] == 1 and res["torch"]["threads"] == 1  # pinned workers


BF16_LOSS0_RTOL = 3e-2  # bf16 UNet compute in both (different kernels and rounding); measured 0.9 %


def test_bf16_step_and_mfu_figures(tiny):
    """--dtype bfloat16: both frameworks run the UNet in bf16 with fp32 params and losses, and
    agree at step 0 within bf16 precision; MFU = analytic model FLOPs / (median step × peak)."""
    root, folder = tiny
    cells = {}
    for dtype in ("float32", "bfloat16"):
        cell = bench.prepare_cell("dfr", "tiny", folder, root, batch=2, steps=1, warmup=1, replay_images=2,
                                  sampler_steps=2, guidance=1.0, device="cpu", threads=1, gen=False,
                                  dtype=dtype, peak_flops=1e9 if dtype == "bfloat16" else None)
        cell.jax = bench.run_jax_worker(cell.spec)
        cell.torch = bench_reference.run_worker(cell.spec)
        cells[dtype] = cell
    cell = cells["bfloat16"]
    s = bench.summarize(cell, request_steps=10)
    assert s["loss0_rel_diff"] <= BF16_LOSS0_RTOL
    # each framework really computed in bf16: its loss moved off its fp32 one (by ~5 %: at step 0
    # the loss is the MSE between two bf16 predictions, so their rounding does not cancel), more
    # than the two frameworks differ from each other in bf16
    for fw in ("jax", "torch"):
        lo16, lo32 = getattr(cell, fw)["losses"][0], getattr(cells["float32"], fw)["losses"][0]
        assert s["loss0_rel_diff"] < abs(lo16 - lo32) / lo32 <= 0.1, (fw, lo16, lo32)
    s32 = bench.summarize(cells["float32"], request_steps=10)
    assert "jax_mfu" not in s32 and "jax_tflops_per_s" in s32  # a CPU has no listed peak
    assert "gen_ratio" not in s  # gen=False: step figures only
    # DFR: two student passes (forward + backward = 3 forwards) and two teacher forwards at batch 2
    from jaxforget.planning import unet_forward_flops

    flops = 8 * unet_forward_flops(TINY, 2, 8, 8, seq_len=77)["total"]
    assert s["model_flops_per_step"] == pytest.approx(flops)
    for fw, r in (("jax", cell.jax), ("torch", cell.torch)):
        assert r["device_kind"]
        assert s[f"{fw}_mfu"] == pytest.approx(flops / (r["step_median_s"] * 1e9))
    row = bench.main_table([s]).splitlines()
    assert "jax MFU" in row[0] and f"{s['jax_mfu']:.3g}" in row[2]
    notes = bench._notes([s], argparse.Namespace(request_steps=10))
    assert "(no data build: --no-gen)" in notes and "peak RSS MB after load/step 0/end" in notes
    assert f"MFU {100 * s['jax_mfu']:.1f} % of 0.001 TFLOP/s" in notes


def test_sd15_folder_is_sd15_with_768_wide_contexts(tmp_path):
    """--model sd15: SD 1.5's shipped UNet config (here at 0.1 width, 64² pixels), random weights,
    and a text encoder whose contexts are 768 wide, loadable by diffusers / transformers."""
    folder = bench.resolve_model("sd15", tmp_path, width=0.1, resolution=64)
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    shipped = json.loads((ROOT / "configs" / "models" / "sd15" / "unet" / "config.json").read_text())
    assert unet_cfg["block_out_channels"] == [32, 64, 128, 128] and unet_cfg["sample_size"] == 8
    for k in ("down_block_types", "up_block_types", "layers_per_block", "attention_head_dim", "norm_num_groups"):
        assert unet_cfg[k] == shipped[k], k
    assert unet_cfg["cross_attention_dim"] in (768, [768] * 4)
    m = bench_reference.load_models(folder)
    assert m.text_encoder.config.hidden_size == 768 and m.unet.config.cross_attention_dim == 768
    arrays = bench.make_batch(folder, 2, bench.bench_prompts())
    assert arrays["forget_ctx"].shape == (2, 77, 768)
    # the same contexts through transformers (the torch worker's text encoder)
    ctx = bench_reference.encode_texts(m, bench._cycle(bench.bench_prompts()["forget"], 2)).numpy()
    np.testing.assert_allclose(arrays["forget_ctx"], ctx, atol=1e-4)


def test_resolution_needs_a_generated_model(capsys):
    for argv in (["--model", "toyworld", "--resolution", "256"], ["--model", "sd15", "--resolution", "100"]):
        with pytest.raises(SystemExit) as err:
            bench.parse_args(argv)
        assert err.value.code == 2
    assert "--resolution" in capsys.readouterr().err


def test_width_scaling_config():
    cfg = bench.small_sd_unet_config(32)
    assert cfg["block_out_channels"] == [32, 64, 128, 128]
    assert bench.scaled_unet_config(cfg, 2)["block_out_channels"] == [64, 128, 256, 256]
    with pytest.raises(ValueError):
        bench.scaled_unet_config(cfg, 1.5)  # 48 channels: not divisible into 32 groups


def test_attention_bench_prints_a_row_per_shape(capsys):
    import bench_attention

    bench_attention.main(["--shapes", "2,2,8,8,4;2,2,8,5,4", "--reps", "1"])
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out[2:]]
    assert [r[:5] for r in rows] == [["2,", "2,", "8,", "8,", "4"], ["2,", "2,", "8,", "5,", "4"]]
    for r in rows:  # jax before, jax now, torch SDPA: three positive times
        assert all(float(x) > 0 for x in r[5:8]) and len(r) == 8


def test_attention_bench_reference_layout_equals_the_model_attention():
    # the "before" layout the bench times computes what layers.attention computes (fp32 rounding)
    import bench_attention
    import jax.numpy as jnp

    from jaxforget.models.layers import attention

    q, k, v = (jnp.asarray(x) for x in bench_attention._inputs(2, 8, 5, 8))
    np.testing.assert_allclose(attention(q, k, v, 2)[0], bench_attention.attention_before(q, k, v, 2),
                               rtol=1e-5, atol=1e-6)


def test_conv_bench_prints_a_row_per_shape(capsys):
    import bench_conv

    bench_conv.main(["--shapes", "2,2,4,1;2,4,4,2;2,4,4,1", "--reps", "1"])
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out[2:]]
    assert [r[:5] for r in rows] == [["2,", "2,", "4,", "1", "2x2"], ["2,", "4,", "4,", "2", "2x2"],
                                     ["2,", "4,", "4,", "1", "4x4"]]
    for r in rows:  # lax conv, patches: two positive times
        assert len(r) == 7 and all(float(x) > 0 for x in r[5:7])


def test_combine_repeats_takes_medians_and_keeps_each_ratio():
    base = {"method": "dfr", "model": "tiny", "batch": 2, "jax_n_trainable": 7}
    sums = [base | {"step_ratio": r, "request_ratio_warm": r + 0.1, "jax_step_median_s": j}
            for r, j in ((0.9, 0.3), (0.5, 0.1), (0.7, 0.2))]
    s = bench.combine_repeats(sums)
    assert s["step_ratio"] == pytest.approx(0.7) and s["request_ratio_warm"] == pytest.approx(0.8)
    assert s["jax_step_median_s"] == pytest.approx(0.2)
    assert s["step_ratios"] == [0.9, 0.5, 0.7] and s["repeats"] == 3
    assert s["batch"] == 2 and s["jax_n_trainable"] == 7 and s["method"] == "dfr"
    assert "gen_ratios" not in s  # no data build in these repeats
    assert bench.combine_repeats(sums[:1]) == sums[0]  # one run: its own figures, nothing added


def test_repeats_alternate_the_frameworks_and_report_medians(tiny, tmp_path, monkeypatch, capsys):
    _, folder = tiny
    calls, step = [], {"jax": iter((0.30, 0.10, 0.20)), "torch": iter((0.60, 0.20, 0.25))}

    def fake_worker(framework, spec, work, timeout=None):  # the figures a worker returns, no subprocess
        calls.append(framework)
        med = next(step[framework])
        return {"framework": framework, "step_median_s": med, "first_step_s": med + 1.0, "steps_per_s": 1 / med,
                "losses": [0.5, 0.4], "peak_rss_mb": 100.0, "n_trainable": 3}

    monkeypatch.setattr(bench, "run_worker", fake_worker)
    out = tmp_path / "bench.json"
    bench.main(["--model-dir", str(folder), "--method", "dfr", "--batch", "2", "--steps", "1", "--warmup", "1",
                "--no-gen", "--threads", "1", "--repeats", "3", "--work-dir", str(tmp_path / "w"),
                "--json", str(out)])
    assert calls == ["jax", "torch"] * 3
    (res,) = json.loads(out.read_text())["results"]
    s = res["summary"]
    assert s["step_ratios"] == pytest.approx([0.5, 0.5, 0.8]) and s["step_ratio"] == pytest.approx(0.5)
    assert s["jax_step_median_s"] == pytest.approx(0.2) and len(res["repeats"]) == 3
    assert "medians over 3 repeats" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        bench.parse_args(["--repeats", "0"])
    assert err.value.code == 2
