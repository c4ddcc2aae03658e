"""Memory presets and diffusers' offloading modes with the Lynx adapters inside the transformer, on tiny models.

The CPU stands in for the GPU as diffusers' "onload" device. Where an offloading mode moves nothing on the CPU
(group offloading: CPU -> CPU is no copy; accelerate's hooks on "cpu") the video must be bit-identical to the
plain pipeline's. Model CPU offload copies every weight to "cpu:0" and back; a copied weight can take another
path through the CPU's matrix kernels (a different summation order), so it matches to float32 rounding, 1e-4
on latents of unit scale after three steps (the bound the existing offload test uses). fp8 storage matches a
pipeline whose cast weights were rounded to fp8 by hand, to the same rounding.
"""

import numpy as np
import pytest
import torch
from conftest import SMALL

from lynx import LynxPipeline
from lynx.models.adapters import LynxAttnProcessor, processors
from lynx.pipelines.memory import MEMORY_PRESETS, MemoryPresetError, check_preset, enable_memory_preset, memory_presets

COPY_ROUNDING = dict(atol=1e-4, rtol=0)


def person(face_embedding, reference_crop):
    return dict(face_embedding=face_embedding, reference_image=reference_crop)


@pytest.fixture(scope="module")
def case(tiny_base, adapter_dirs, face_embedding, reference_crop):
    """(a loader of fresh pipelines, call kwargs, the plain pipeline's latents) for the full model with registers:
    every kind of adapter weight (ID, registers, Ref) and both adapter passes (reference, denoising)."""
    def load():
        return LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["registers"])

    kw = dict(**person(face_embedding, reference_crop), output_type="latent", seed=2,
              **{**SMALL, "num_inference_steps": 2})
    return load, kw, load()("a man walks", **kw).frames


def run(pipe, kw):
    return pipe("a man walks", **kw).frames


# ----- diffusers' own tools, one by one -------------------------------------------------------------------
def test_sequential_offload_gives_the_same_video(case):
    """accelerate's sequential offload (what `enable_sequential_cpu_offload` attaches to every component): every
    weight waits on the meta device and is materialised only inside the module that uses it. The registers once
    sat directly on a processor, whose hook then tried to move the attention module (its first argument) off
    the meta device."""
    from accelerate import cpu_offload

    load, kw, plain = case
    pipe = load()
    # diffusers' pipeline method names the CPU "cpu:0", a device accelerate's tied-weight bookkeeping does not
    # match back to "cpu"; the same hooks on "cpu" are what it would attach on a GPU.
    for name in ("text_encoder", "resampler", "transformer", "vae"):
        module = getattr(pipe, name)
        cpu_offload(module, torch.device("cpu"), offload_buffers=len(module._parameters) > 0)
    assert pipe.transformer.blocks[0].attn1.processor.to_k_ref.weight.device.type == "meta"  # waits off-device
    assert torch.equal(run(pipe, kw), plain)


def test_text_encoder_is_done_before_the_adapters_and_transformer_run(case):
    """Model CPU offload moves a model out when the next one of `text_encoder->resampler->transformer->vae` runs:
    a text encoding after the resampler would bring UMT5 (11 GB) back and leave it on the GPU while the
    transformer denoises. (On the CPU accelerate skips the move out, so the order itself is what is checked.)"""
    load, kw, plain = case
    pipe = load()
    calls = []
    for name in ("text_encoder", "resampler", "transformer", "vae"):
        getattr(pipe, name).register_forward_pre_hook(lambda *_, _name=name: calls.append(_name))
    run(pipe, kw)
    last_text = max(i for i, name in enumerate(calls) if name == "text_encoder")
    assert calls.count("text_encoder") == 3  # prompt, negative prompt, reference prompt
    assert last_text < calls.index("resampler") < calls.index("transformer")


def test_no_offloading_hook_lands_on_a_processor(tiny_base, adapter_dirs):
    """Hooks go on modules that hold parameters directly; a processor is called with the attention module as
    its first argument, which a hook would move as a whole."""
    pipe = LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["registers"])
    for proc in processors(pipe.transformer):
        assert isinstance(proc, LynxAttnProcessor) and not list(proc.parameters(recurse=False))


# ----- presets --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["48gb", "24gb-blocks", "12gb"])
def test_offloading_presets_give_max_video(case, name):
    """48gb: model CPU offload; 24gb-blocks: block-level group offloading of the transformer; 12gb: leaf-level
    group offloading of the transformer (each adapter projection a group of its own) and of the text encoder."""
    load, kw, plain = case
    pipe = load()
    preset = enable_memory_preset(pipe, name, "cpu")
    assert pipe.memory_preset == name and pipe.vae.use_tiling == preset.vae_tiling
    out = run(pipe, kw)
    if name == "48gb":
        torch.testing.assert_close(out, plain, **COPY_ROUNDING)
    else:
        assert torch.equal(out, plain)


def cast_modules(pipe) -> set[str]:
    """Names of the transformer's modules stored in fp8 by layerwise casting (under a LoRA, the layer it wraps)."""
    return {n.removesuffix(".base_layer") for n, m in pipe.transformer.named_modules()
            if getattr(m, "_diffusers_hook", None) and m._diffusers_hook.get_hook("layerwise_casting")}


def rounded_to_fp8(pipe, names: set[str]):
    """`pipe` with the weights of modules `names` rounded to fp8 by hand, kept in float32."""
    with torch.no_grad():
        for name, module in pipe.transformer.named_modules():
            if name in names:
                for p in module.parameters(recurse=False):
                    p.copy_(p.to(torch.float8_e4m3fn).float())
    return pipe


def test_24gb_preset_equals_weights_rounded_to_fp8(case):
    load, kw, plain = case
    pipe = load()
    pipe.enable_memory_preset("24gb", "cpu")
    proc = next(p for p in processors(pipe.transformer) if p.branch == "ip")
    assert proc.to_k_ip.weight.dtype == torch.float8_e4m3fn  # the adapters are stored in fp8 too
    assert pipe.transformer.dtype == torch.float32  # and computed in the pipeline's dtype
    cast = cast_modules(pipe)
    assert "blocks.0.ffn.net.2" in cast and not any("norm" in n for n in cast)
    out = run(pipe, kw)
    torch.testing.assert_close(out, run(rounded_to_fp8(load(), cast), kw), **COPY_ROUNDING)
    assert (out - plain).abs().max() > 100 * COPY_ROUNDING["atol"]  # the fp8 rounding is there, and visible


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    from test_lora import write_layout

    return write_layout(tmp_path_factory.mktemp("lora") / "kohya.safetensors", "kohya")


@pytest.mark.parametrize("name,lora_first", [("48gb", False), ("24gb", False), ("24gb", True), ("24gb-blocks", False),
                                             ("12gb", False)])
def test_a_lora_under_every_preset_gives_the_max_video_with_that_lora(case, lora_file, name, lora_first):
    """`lynx generate --memory NAME --lora FILE` applies the preset, then loads the LoRA (diffusers takes the
    offloading hooks off and puts them back around it, on the device the preset chose); a script may do it the
    other way round. Under fp8 storage peft gave a LoRA loaded after the preset the stored dtype, float8: rounded,
    and the first step failed ("not implemented for 'Float8_e4m3fn'"). It is held in the compute dtype, exact."""
    load, kw, plain = case
    pipe = load()
    if lora_first:
        pipe.load_lora_weights(lora_file, adapter_name="k")
    pipe.enable_memory_preset(name, "cpu")
    if not lora_first:
        pipe.load_lora_weights(lora_file, adapter_name="k")
    lora = pipe.transformer.blocks[0].attn1.to_q
    assert lora.lora_A["k"].weight.dtype == torch.float32
    out = run(pipe, kw)

    reference = load()
    if MEMORY_PRESETS[name].fp8_weights:
        assert lora.base_layer.weight.dtype == torch.float8_e4m3fn
        reference = rounded_to_fp8(reference, cast_modules(pipe))
    reference.load_lora_weights(lora_file, adapter_name="k")
    expected = run(reference, kw)
    assert (expected - plain).abs().max() > 1e-2  # the LoRA is felt
    if MEMORY_PRESETS[name].transformer == "model_offload":
        torch.testing.assert_close(out, expected, **COPY_ROUNDING)
    else:
        assert torch.equal(out, expected)


def test_the_memory_benchmark_runs_a_preset_with_a_lora():
    """`benchmarks/memory_peak.py` (what a GPU session runs) smoke-run at tiny size on the CPU: the 24gb preset, a
    random LoRA loaded after it (which raised at the first step before), one video."""
    import os
    import subprocess
    import sys

    from test_cli import REPO

    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "memory_peak.py"), "--size", "tiny", "--device",
                        "cpu", "--memory", "24gb", "--lora-rank", "4"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "24gb         full ran on cpu with a rank-4 LoRA" in r.stdout, r.stderr


def test_lite_decoded_video_under_the_smallest_preset(tiny_base, adapter_dirs, face_embedding):
    kw = dict(face_embedding=face_embedding, seed=2, **{**SMALL, "num_inference_steps": 2})
    plain = LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["lite"])("a man walks", **kw).frames
    pipe = LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["lite"])
    pipe.enable_memory_preset("12gb", "cpu")
    out = pipe("a man walks", **kw).frames
    # 32x32 frames are below the VAE's tile size: tiling must leave them untouched.
    assert np.array_equal(out, plain)


def test_preset_list_is_data_for_a_menu():
    listed = memory_presets()
    assert [p["name"] for p in listed] == ["max", "48gb", "24gb", "24gb-blocks", "12gb"] == list(MEMORY_PRESETS)
    assert all(p["description"] and p["gpu"] for p in listed)
    assert [p["text_encoder"] == "gpu" for p in listed] == [True, False, False, False, False]


def test_presets_that_cannot_work_name_one_that_will(tiny_base, adapter_dirs):
    # The meta device holds no data and has no streams: it fails both checks for real.
    with pytest.raises(MemoryPresetError, match="fp8.*--memory 24gb-blocks"):
        check_preset("24gb", "meta")
    with pytest.raises(MemoryPresetError, match="streams.*--memory 48gb"):
        check_preset("12gb", "meta")
    assert check_preset("48gb", "meta").name == "48gb"
    with pytest.raises(Exception, match="unknown memory preset 'huge'; choose one of max, 48gb"):
        check_preset("huge", "cpu")
    pipe = LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["lite"])
    pipe.enable_memory_preset("12gb", "cpu")
    pipe.enable_memory_preset("12gb", "cpu")  # the same preset again is a no-op
    with pytest.raises(Exception, match="already runs the 12gb memory preset; load it again for 48gb"):
        pipe.enable_memory_preset("48gb", "cpu")
