"""LynxPipeline on tiny saved models: guidance, seeds, reference features, schedule, inputs and errors."""

import copy

import numpy as np
import pytest
import torch
from conftest import SMALL, person
from diffusers import WanPipeline

from lynx import LynxPipeline
from lynx.errors import InputError
from lynx.models.adapters import uninstall_adapters
from lynx.pipelines.pipeline_lynx import flow_sigmas


def test_same_seed_same_video_other_seed_other_video(full, face_embedding, reference_crop):
    a = full("a man walks", **person(face_embedding, reference_crop), seed=3, **SMALL).frames
    b = full("a man walks", **person(face_embedding, reference_crop), seed=3, **SMALL).frames
    c = full("a man walks", **person(face_embedding, reference_crop), seed=4, **SMALL).frames
    assert a.shape == (1, 5, 32, 32, 3) and np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2


def capture_step(pipe, monkeypatch):
    calls, steps = [], []
    predict, step = pipe.predict, pipe.scheduler.step

    def spy_predict(latents, t, text, cond, branch="c"):
        out = predict(latents, t, text, cond, branch)
        calls.append((text, cond, out))
        return out

    def spy_step(noise, t, latents, **kw):
        steps.append(noise)
        return step(noise, t, latents, **kw)

    monkeypatch.setattr(pipe, "predict", spy_predict)
    monkeypatch.setattr(pipe.scheduler, "step", spy_step)
    return calls, steps


def test_full_three_way_guidance(full, face_embedding, reference_crop, monkeypatch):
    calls, steps = capture_step(full, monkeypatch)
    full("a man walks", **person(face_embedding, reference_crop), guidance_scale=4.0, guidance_scale_i=1.5,
         output_type="latent", **{**SMALL, "num_inference_steps": 2})
    assert len(calls) == 6 and len(steps) == 2
    (tc, cc, c), (tu, cu, u), (ti, ci, i) = calls[:3]
    assert torch.equal(tu, ti) and not torch.equal(tc, tu)  # i and u share the negative prompt
    assert ci is cc and cu is not cc  # i sees the identity and reference, u sees neither
    assert torch.equal(cu.ip_tokens, full.identity_tokens(torch.zeros(512)))
    torch.testing.assert_close(steps[0], u + 1.5 * (i - u) + 4.0 * (c - i), rtol=0, atol=0)


def test_lite_two_way_guidance(lite, face_embedding, monkeypatch):
    calls, steps = capture_step(lite, monkeypatch)
    lite("a man walks", face_embedding=face_embedding, output_type="latent", **{**SMALL, "num_inference_steps": 2})
    assert len(calls) == 4
    (_, cc, c), (_, cu, u) = calls[:2]
    assert cc.ref_features is None and cu.ref_features is None
    torch.testing.assert_close(steps[0], u + 5.0 * (c - u), rtol=0, atol=0)


def test_full_without_reference_runs_with_ref_scale_zero(full, face_embedding, reference_crop):
    kw = dict(output_type="latent", seed=3, ref_scale=0.0, **SMALL)
    without = full("a man walks", face_embedding=face_embedding, **kw).frames
    with_crop = full("a man walks", face_embedding=face_embedding, reference_image=reference_crop, **kw).frames
    assert torch.equal(without, with_crop)


def test_no_identity_tokens_are_resampler_of_zeros_not_zeros(full):
    tokens = full.identity_tokens(torch.zeros(512))
    assert tokens.shape == (1, 4, 24) and tokens.abs().max() > 0.1
    assert torch.equal(tokens, full.resampler(torch.zeros(1, 1, 512)))


def test_reference_features_are_the_frozen_pass_over_the_vae_sample(full, reference_crop):
    gen = lambda: torch.Generator().manual_seed(12)
    feats = full.reference_features(reference_crop, gen())
    assert len(feats) == 4 and feats[0].shape == (1, 256, 24)
    # Independent recomputation on a plain copy of the transformer (diffusers' own processors).
    plain = copy.deepcopy(full.transformer)
    uninstall_adapters(plain)
    pixels = torch.tensor(reference_crop).float().permute(2, 0, 1)[None, :, None] / 127.5 - 1
    z = full.vae.encode(pixels).latent_dist.sample(generator=gen())
    cfg = full.vae.config
    z = (z - torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)) / torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    seen = []
    hooks = [b.attn1.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for b in plain.blocks]
    with torch.no_grad():
        plain(hidden_states=z, timestep=torch.tensor([0]), encoder_hidden_states=full.encode_text(["image of a face"]))
    for h in hooks:
        h.remove()
    for a, b in zip(feats, seen):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # The 'no reference' features come from an all-zero image in [-1, 1] space, same generator.
    empty = full.reference_features(None, gen())
    mid_gray = full.reference_features(np.full((256, 256, 3), 127.5, np.float32) / 255.0, gen())
    assert not torch.equal(empty[0], feats[0])
    torch.testing.assert_close(empty[0], mid_gray[0], atol=0.02, rtol=0)


def test_reference_vae_sample_uses_seed_plus_one(full, face_embedding, reference_crop, monkeypatch):
    seeds = []
    original = full.reference_features

    def spy(image, generator=None, prompt_embeds=None):
        seeds.append(generator.initial_seed())
        return original(image, generator, prompt_embeds)

    monkeypatch.setattr(full, "reference_features", spy)
    full("a man walks", **person(face_embedding, reference_crop), seed=41, output_type="latent",
         **{**SMALL, "num_inference_steps": 1})
    assert seeds == [42, 42]


def test_authors_sigma_grid():
    from diffusers import UniPCMultistepScheduler

    from lynx.testing import WAN_SCHEDULER_CONFIG

    s = UniPCMultistepScheduler.from_config(WAN_SCHEDULER_CONFIG)
    s.set_timesteps(sigmas=flow_sigmas(4, 0.999))
    assert s.timesteps.tolist() == [999, 899, 749, 499]
    assert abs(float(s.sigmas[0]) - 0.999666) < 1e-6


def test_output_types_and_callback(full, face_embedding, reference_crop):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append(i)
        return {"latents": tensors["latents"] * 0} if i == 2 else {}

    pil = full("a man walks", **person(face_embedding, reference_crop), output_type="pil",
               callback_on_step_end=callback, **SMALL).frames[0]
    assert seen == [0, 1, 2] and len(pil) == 5 and pil[0].size == (32, 32)
    lat = full("a man walks", **person(face_embedding, reference_crop), output_type="latent", **SMALL).frames
    assert lat.shape == (1, 16, 2, 4, 4)


def test_bf16_runs(tiny_base, adapter_dirs, face_embedding, reference_crop):
    pipe = LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["registers"], torch_dtype=torch.bfloat16)
    assert pipe.resampler.latents.dtype == torch.bfloat16
    assert pipe.transformer.blocks[0].attn1.processor.to_k_ref.weight.dtype == torch.bfloat16
    assert pipe.transformer.rope.freqs_cos.dtype == torch.float32  # RoPE tables stay fp32, as in the reference
    out = pipe("a man walks", **person(face_embedding, reference_crop), **SMALL).frames
    assert np.isfinite(out).all() and out.shape == (1, 5, 32, 32, 3)


def test_wrap_wan_pipeline_in_memory(tiny_base, adapter_dirs, face_embedding):
    wan = WanPipeline.from_pretrained(tiny_base)
    pipe = LynxPipeline.from_wan(wan, adapter=adapter_dirs["lite"])
    assert pipe.transformer is wan.transformer and pipe.variant == "lite"
    assert pipe("a man walks", face_embedding=face_embedding, output_type="latent", **SMALL).frames.shape[2] == 2


@pytest.mark.parametrize("kw,message", [
    (dict(num_frames=6), r"num_frames=6 is not 4k\+1 \(try 5 or 9\)"),
    (dict(height=40), r"height=40 is not a positive multiple of 16 \(try 32 or 48\)"),
    (dict(width=8), "width=8"),
    (dict(num_inference_steps=0), "at least 1"),
    (dict(output_type="mp4"), "output_type"),
])
def test_bad_sizes_and_options(full, face_embedding, reference_crop, kw, message):
    with pytest.raises(InputError, match=message):
        full("a man walks", **person(face_embedding, reference_crop), **{**SMALL, **kw})


@pytest.mark.parametrize("kw,message", [
    (dict(face_embedding=np.zeros(100)), "512 finite numbers"),
    (dict(face_embedding=np.zeros(512)), "also needs reference_image"),
    (dict(face_embedding=np.zeros(512), reference_image=np.zeros((112, 112, 3), np.uint8)), "256x256"),
    (dict(), "exactly one way"),
])
def test_bad_identity(full, kw, message):
    with pytest.raises(InputError, match=message):
        full("a man walks", **kw, **SMALL)


def test_long_prompt_is_truncated_with_a_warning(full, face_embedding, reference_crop):
    with pytest.warns(UserWarning, match="only the first 512 are used"):
        full("walks " * 600, **person(face_embedding, reference_crop), output_type="latent",
             **{**SMALL, "num_inference_steps": 1})


def test_damaged_base_component_is_named(tiny_base, tmp_path):
    import shutil

    base = shutil.copytree(tiny_base, tmp_path / "base")
    weights = next((base / "vae").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:200])
    from lynx.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"vae could not be loaded"):
        LynxPipeline.from_pretrained(base)


def test_fp16_on_cpu(tiny_base, adapter_dirs, face_embedding):
    pipe = LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["lite"], torch_dtype=torch.float16)
    out = pipe("a man walks", face_embedding=face_embedding, output_type="latent", **SMALL).frames
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_diffusers_step_cache_works_per_guidance_branch(tiny_base, adapter_dirs, face_embedding, reference_crop):
    from diffusers import FirstBlockCacheConfig

    pipe = LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["full"])
    kw = dict(**person(face_embedding, reference_crop), output_type="latent", seed=1,
              **{**SMALL, "num_inference_steps": 4})
    plain = pipe("a man walks", **kw).frames
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))  # never skips: must change nothing
    assert torch.equal(pipe("a man walks", **kw).frames, plain)
    pipe.transformer.disable_cache()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))  # skips whenever it can
    cached = pipe("a man walks", **kw).frames
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)


def test_pipeline_save_load_round_trip(full, face_embedding, reference_crop, tmp_path):
    full.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "lynx_adapter" / "ref_layers.safetensors").is_file()
    again = LynxPipeline.from_pretrained(tmp_path / "saved")
    assert again.variant == "full"
    kw = dict(**person(face_embedding, reference_crop), output_type="latent", seed=5, **SMALL)
    assert torch.equal(again("a man walks", **kw).frames, full("a man walks", **kw).frames)


def test_model_cpu_offload_gives_the_same_video(tiny_base, adapter_dirs, face_embedding, reference_crop):
    pipe = LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["full"])
    kw = dict(**person(face_embedding, reference_crop), output_type="latent", seed=2, **SMALL)
    plain = pipe("a man walks", **kw).frames
    pipe.enable_model_cpu_offload(device="cpu")  # the same hooks as on a GPU, with the CPU as 'accelerator'
    # accelerate's hooks copy inputs between calls, which can change float summation order: ~1e-6 apart.
    torch.testing.assert_close(pipe("a man walks", **kw).frames, plain, atol=1e-4, rtol=0)
