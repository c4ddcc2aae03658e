"""Strength windows, step caches per guidance branch, compile, batched branches and the text K/V cache.

The default sampling is held to the released recipe by tests/test_reference_sampling.py; here each knob is
checked against what it promises: which adapters act at which step, which branches run, how many blocks
a step cache skips in each branch, what torch.compile traces, and how often a projection runs.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, person

from lynx import LynxPipeline
from lynx.errors import InputError
from lynx.models.adapters import Conditioning, conditioning, processors
from lynx.pipelines import speed

STEPS4 = {**SMALL, "num_inference_steps": 4}


def spy(pipe, monkeypatch):
    """Record (branch, ip_scale, ref_scale) of every transformer call, and every scheduler step's input."""
    calls, steps = [], []
    predict, step = pipe.predict, pipe.scheduler.step

    def spy_predict(latents, t, text, cond, branch="c"):
        calls.append((branch, cond.ip_scale, cond.ref_scale))
        return predict(latents, t, text, cond, branch)

    monkeypatch.setattr(pipe, "predict", spy_predict)
    monkeypatch.setattr(pipe.scheduler, "step", lambda noise, *a, **kw: (steps.append(noise), step(noise, *a, **kw))[1])
    return calls, steps


# ----- strength ------------------------------------------------------------------------------------------------

def test_adapter_windows_switch_each_adapter_off_outside_its_steps(full, face_embedding, reference_crop,
                                                                  monkeypatch):
    calls, _ = spy(full, monkeypatch)
    full("a man walks", **person(face_embedding, reference_crop), ip_scale=0.7, ref_scale=0.4, ip_end=0.5,
         ref_start=0.25, output_type="latent", **STEPS4)
    per_step = [calls[3 * k:3 * k + 3] for k in range(4)]
    assert [{(ip, ref) for _, ip, ref in step} for step in per_step] == [
        {(0.7, 0.0)}, {(0.7, 0.4)}, {(0.0, 0.4)}, {(0.0, 0.4)}]


def test_full_windows_are_the_default_sampling(full, face_embedding, reference_crop):
    kw = dict(**person(face_embedding, reference_crop), output_type="latent", seed=4, **STEPS4)
    plain = full("a man walks", **kw).frames
    same = full("a man walks", **kw, ip_start=0.0, ip_end=1.0, ref_start=0, ref_end=1, guidance_i_start=0,
                guidance_i_end=1, ref_blocks="0-3").frames
    assert torch.equal(plain, same)
    # An adapter window that covers no step is that adapter at scale 0.
    assert torch.equal(full("a man walks", **kw, ip_start=1.0).frames, full("a man walks", **kw, ip_scale=0).frames)


def test_identity_guidance_window_runs_two_branches_outside_it(full, face_embedding, reference_crop, monkeypatch):
    calls, steps = spy(full, monkeypatch)
    captured = []
    predict_branches = full.predict_branches
    monkeypatch.setattr(full, "predict_branches",
                        lambda *a, **kw: captured.append(predict_branches(*a, **kw)) or captured[-1])
    full("a man walks", **person(face_embedding, reference_crop), guidance_scale=4.0, guidance_scale_i=1.5,
         guidance_i_end=0.5, output_type="latent", **STEPS4)
    assert [b for b, _, _ in calls] == ["c", "u", "i"] * 2 + ["c", "u"] * 2
    c, u, i = captured[0]
    torch.testing.assert_close(steps[0], u + 1.5 * (i - u) + 4.0 * (c - i), rtol=0, atol=0)
    c, u = captured[2]
    torch.testing.assert_close(steps[2], u + 4.0 * (c - u), rtol=0, atol=0)


def test_guidance_one_runs_one_branch(full, face_embedding, reference_crop, monkeypatch):
    calls, _ = spy(full, monkeypatch)
    full("a man walks", **person(face_embedding, reference_crop), guidance_scale=1.0, output_type="latent",
         **STEPS4)
    assert [b for b, _, _ in calls] == ["c"] * 4


def test_ref_blocks_limit_the_ref_adapter(full, face_embedding, reference_crop):
    feats = full.reference_features(reference_crop, torch.Generator().manual_seed(1))
    cond = Conditioning(full.identity_tokens(torch.as_tensor(face_embedding)), feats,
                        ref_blocks=speed.parse_blocks("0-1,3", 4))
    with conditioning(full.transformer, cond):
        on = [p.block for p in processors(full.transformer) if p.branch == "ref" and p.source is not None]
        ip = [p.block for p in processors(full.transformer) if p.branch == "ip" and p.source is not None]
    assert on == [0, 1, 3] and ip == [0, 1, 2, 3]


@pytest.mark.parametrize("spec,message", [("0-9", "outside the transformer's blocks 0-3"), ("a-b", "not a block"),
                                          ("3-1", "outside")])
def test_bad_block_specs(spec, message):
    with pytest.raises(InputError, match=message):
        speed.parse_blocks(spec, 4)


def test_bad_windows(full, face_embedding, reference_crop):
    with pytest.raises(InputError, match=r"ip_start=0.8 is after ip_end=0.2"):
        full("a man walks", **person(face_embedding, reference_crop), ip_start=0.8, ip_end=0.2, **SMALL)


# ----- step caches ---------------------------------------------------------------------------------------------

def count_blocks(pipe, monkeypatch):
    """Blocks that really ran, per (branch, step): a block a cache skips never reaches its self-attention."""
    runs, where = {}, {}
    predict = pipe.predict

    def spy_predict(latents, t, text, cond, branch="c"):
        where["key"] = (branch, pipe._cache_step["step_index"])
        return predict(latents, t, text, cond, branch)

    monkeypatch.setattr(pipe, "predict", spy_predict)
    hooks = [b.attn1.register_forward_pre_hook(
        lambda m, a: runs.__setitem__(where.get("key"), runs.get(where.get("key"), 0) + 1))
        for b in pipe.transformer.blocks]
    return runs, hooks


@pytest.mark.parametrize("cache", ["FirstBlockCache", "SeaCache"])
def test_step_caches_skip_blocks_in_each_branch_with_its_own_state(tiny_base, adapter_dirs, face_embedding,
                                                                   reference_crop, monkeypatch, cache):
    import diffusers

    pipe = LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["full"])
    kw = dict(**person(face_embedding, reference_crop), output_type="latent", seed=1,
              **{**SMALL, "num_inference_steps": 5})
    plain = pipe("a man walks", **kw).frames
    config = getattr(diffusers, f"{cache}Config")
    # Thresholds that never / always allow reuse.
    pipe.transformer.enable_cache(config(threshold=0.0))
    assert torch.equal(pipe("a man walks", **kw).frames, plain)
    pipe.transformer.disable_cache()
    pipe.transformer.enable_cache(config(threshold=1e9))
    runs, hooks = count_blocks(pipe, monkeypatch)
    cached = pipe("a man walks", **kw).frames
    for h in hooks:
        h.remove()
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)
    blocks = len(pipe.transformer.blocks)
    if cache == "FirstBlockCache":
        # Each branch runs every block at its own first step (a shared state would let u and i reuse c's
        # residual there), then only the first block.
        expected = [blocks, 1, 1, 1, 1]
    else:
        # SeaCache: step 0 kept, at most 2 reuses in a row, the last step kept; a skip skips every block.
        expected = [blocks, 0, 0, blocks, blocks]
    for branch in "cui":
        assert [runs.get((branch, s), 0) for s in range(5)] == expected, branch
    assert runs[None] == 2 * blocks  # the two reference passes ran whole


# ----- compile -------------------------------------------------------------------------------------------------

def test_one_lynx_block_compiles_whole_with_conditioning(full, face_embedding, reference_crop):
    import torch._dynamo

    torch._dynamo.reset()
    feats = full.reference_features(reference_crop, torch.Generator().manual_seed(1))
    block = full.transformer.blocks[1]
    cond = Conditioning(full.identity_tokens(torch.as_tensor(face_embedding)), feats, text_kv={})
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 12, 24, generator=g), torch.randn(1, 512, 24, generator=g)  # 2x2x3 patches
    temb = torch.randn(1, 6, 24, generator=g)
    rope = full.transformer.rope(torch.zeros(1, 16, 2, 4, 6))
    compiled = torch.compile(block, fullgraph=True, backend="eager")  # a graph break would raise
    with torch.no_grad():
        with conditioning(block, cond, text):
            want = block(x, text, temb, rope)
        for _ in range(2):  # K/V computed, then cached
            with conditioning(block, cond, text):
                got = compiled(x, text, temb, rope)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert all(p.branch is None or p.source is None for p in processors(block))  # inputs unbound again
    torch._dynamo.reset()


@pytest.mark.parametrize("preset,how", [
    (None, "(torch.compile, whole graph)"),
    ("24gb", "with graph breaks at the fp8 casting hooks (24gb)"),
    ("24gb-blocks", "with graph breaks at the block offloading hooks (24gb-blocks)")])
def test_a_compiled_generation_compiles_nothing_after_the_first_step(tiny_base, adapter_dirs, face_embedding,
                                                                    reference_crop, preset, how):
    """Whole-graph without hooks: one graph, for denoising, made at the first step (the reference passes and the
    calls that compute the keys and values to keep run uncompiled). fp8 storage casts every layer in a
    hook and block offloading moves each block in one, where a whole-graph compile raised: the blocks compile
    with graph breaks there, several graphs per block, all made in step 0. Later videos with other scales, windows,
    Ref-adapter blocks and guidance (turbo's: one branch, the Ref-adapter on half the steps) add no graph, and
    every video equals the uncompiled one."""
    import torch._dynamo

    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    pipe = LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["full"])
    if preset is not None:
        pipe.enable_memory_preset(preset, "cpu")
    kw = dict(**person(face_embedding, reference_crop), output_type="latent", seed=1, **STEPS4)
    others = [dict(ip_scale=0.7, ref_scale=0.5, ref_end=0.5, ref_blocks="1", guidance_scale=1.0),  # turbo-like
              dict(ip_end=0.5, guidance_i_end=0.5, ref_start=0.25)]
    plain = [pipe("a man walks", **kw, **other).frames for other in [{}, *others]]
    assert speed.compile_transformer(pipe.transformer, backend=counting_backend).endswith(how)
    after_step = []
    out = pipe("a man walks", **kw, callback_on_step_end=lambda p, i, t, d: after_step.append(len(graphs)) or {})
    if preset is None:
        assert after_step == [1, 1, 1, 1]
    else:
        assert len(set(after_step)) == 1 and after_step[0] > 1
    torch.testing.assert_close(out.frames, plain[0], rtol=1e-5, atol=1e-5)
    for other, want in zip(others, plain[1:]):
        got = pipe("a man walks", **kw, **other).frames
        assert len(graphs) == after_step[0], other  # nothing new
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_compile_names_the_hooks_it_breaks_at(tiny_base, adapter_dirs):
    """Context parallelism puts a split hook on the first block (diffusers names it "cp_input---blocks.0"); a
    whole-graph compile raised there under torchrun (checked by hand with 2 gloo processes, ulysses and ring,
    which then gave their video). Any diffusers hook in a block turns whole-graph off and is named."""
    from diffusers.hooks import HookRegistry, ModelHook

    pipe = LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["lite"])
    HookRegistry.check_if_exists_or_initialize(pipe.transformer.blocks[0]).register_hook(ModelHook(),
                                                                                         "cp_input---blocks.0")
    line = speed.compile_transformer(pipe.transformer, backend="eager")
    assert line.endswith("with graph breaks at the context-parallel split and gather hooks")
    assert pipe.transformer.blocks[1]._compiled_call_impl is not None  # every block, hooked or not
    torch._dynamo.reset()


def test_compile_refuses_a_step_cache_and_layer_streaming(tiny_base, adapter_dirs):
    from diffusers import SeaCacheConfig

    pipe = LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["lite"])
    pipe.transformer.enable_cache(SeaCacheConfig(threshold=0.2))
    with pytest.raises(InputError, match="does not combine with a step cache"):
        speed.compile_transformer(pipe.transformer)
    pipe = LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["lite"])
    pipe.enable_memory_preset("12gb", "cpu")
    with pytest.raises(InputError, match="does not combine with --memory 12gb"):
        speed.compile_transformer(pipe.transformer)
    assert speed.compile_refusal("exact", "24gb") is None and speed.compile_refusal("turbo", None) is None


# ----- batched branches ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["full", "lite"])
def test_batched_branches_match_separate_calls(request, variant, face_embedding, reference_crop, monkeypatch):
    pipe = request.getfixturevalue(variant)
    who = person(face_embedding, reference_crop) if variant == "full" else dict(face_embedding=face_embedding)
    kw = dict(**who, output_type="latent", seed=2, **STEPS4)
    separate = pipe("a man walks", **kw).frames
    sizes = []
    predict = pipe.predict
    monkeypatch.setattr(pipe, "predict", lambda latents, *a: sizes.append(latents.shape[0]) or predict(latents, *a))
    batched = pipe("a man walks", **kw, batch_branches=True).frames
    assert sizes == [3 if variant == "full" else 2] * 4
    # fp32, one batch against three: only the summation order of some kernels differs.
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)


# ----- text keys and values once per prompt --------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["full", "lite"])
def test_text_keys_values_are_computed_once_per_prompt(request, variant, face_embedding, reference_crop):
    pipe = request.getfixturevalue(variant)
    who = person(face_embedding, reference_crop) if variant == "full" else dict(face_embedding=face_embedding)
    counts = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, k=(b, name): counts.__setitem__(k, counts.get(k, 0) + 1))
             for b, block in enumerate(pipe.transformer.blocks)
             for name, layer in (("k", block.attn2.to_k), ("v", block.attn2.to_v))]
    try:
        pipe("a man walks", **who, output_type="latent", **STEPS4)
    finally:
        for h in hooks:
            h.remove()
    # Prompt and negative prompt once each (not 4 steps x 3 or 2 branches), plus one per reference pass.
    per_block = 2 + (2 if variant == "full" else 0)
    assert counts == {(b, n): per_block for b in range(4) for n in "kv"}


def test_presets(full):
    kwargs, lines = speed.apply_speed(full, "exact")
    assert kwargs == {} and "authors' recipe" in lines[0]
    with pytest.raises(InputError, match="needs a step-distill LoRA"):
        speed.apply_speed(full, "turbo")
    assert np.allclose(speed.turbo_sigmas(4) * 1000, [1000, 750, 500, 250])


# ----- the benchmark scripts' arguments ------------------------------------------------------------------------

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    """A benchmarks/ script as a module (shared with tests/test_step_flops.py, which loads step_time too)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        spec.loader.exec_module(sys.modules.setdefault(name, importlib.util.module_from_spec(spec)))
    return sys.modules[name]


@pytest.mark.parametrize("script,args,words", [
    ("step_time", ["--steps", "1"], "--steps 1: must be at least 2"),
    ("step_time", ["--repeats", "0"], "--repeats 0: must be at least 1"),
    ("step_time", ["--clip", "--clip-steps", "-1"], "--clip-steps -1: must be at least 1"),
    ("train_throughput", ["--steps", "0"], "--steps 0: must be at least 1"),
    ("train_throughput", ["--warmup", "-1"], "--warmup -1: must be at least 0"),
    ("train_throughput", ["--measure-blocks", "2"], "--measure-blocks needs --device cuda"),
    ("train_throughput", ["--device", "nope"], "--device 'nope' is not a device"),
    ("train_throughput", ["--json", "{tmp}/a-file/r.json"], "--json {tmp}/a-file/r.json: its folder {tmp}/a-file"),
], ids=["step_time steps 1", "step_time repeats 0", "step_time clip-steps -1", "train_throughput steps 0",
        "train_throughput warmup -1", "train_throughput measure-blocks on cpu", "train_throughput bad device",
        "train_throughput json under a file"])
def test_benchmark_scripts_refuse_bad_arguments_before_measuring(script, args, words, tmp_path, monkeypatch, capsys):
    module = _script(script)
    for name in ("bench", "clip", "throughput", "measure_gpu"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("it started measuring"))
    if script == "train_throughput":
        monkeypatch.setattr(module, "dist", None)  # no process group either
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *(a.replace("{tmp}", str(tmp_path)) for a in args)])
    with pytest.raises(SystemExit) as e:
        module.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"{script}.py: error: {words.replace('{tmp}', str(tmp_path))}"), err
    assert len(err.strip().splitlines()) == 1


def test_step_time_help_describes_it_in_whole_sentences(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["step_time.py", "--help"])
    with pytest.raises(SystemExit):
        _script("step_time").main()
    description = " ".join(capsys.readouterr().out.split("\n\n")[1].split())
    assert description == ("Time one denoising step of LynxPipeline against diffusers' plain WanPipeline on the "
                           "same model, in one process, beside the ratio the FLOP count predicts (docs/benchmarks.md).")


def test_train_throughput_makes_the_folder_of_its_json(tmp_path, monkeypatch, one_thread):
    out = tmp_path / "new" / "folder" / "r.json"
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--sizes", "tiny", "--steps", "1", "--warmup", "0",
                                      "--json", str(out)])
    _script("train_throughput").main()
    assert json.loads(out.read_text())["throughput"][0]["size"] == "tiny"


def test_memory_benchmark_exits_non_zero_when_a_preset_fails(tmp_path):
    r = subprocess.run([sys.executable, str(BENCHMARKS / "memory_peak.py"), "--size", "tiny", "--device", "no-such",
                        "--memory", "max"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)})
    assert r.returncode != 0, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("memory_peak.py: error: 1 of 1 preset(s) failed: max (their errors "
                                                 "are above)")
