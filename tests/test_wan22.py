"""Wan2.2-T2V-A14B bases on tiny two-expert models in the real diffusers layout: the expert switch at
boundary_ratio, the adapters on the high-noise expert (or both), reference features per expert, guidance
and strength controls, and bases of other shapes refused at load naming what fits."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import SMALL, person

from lynx import LynxPipeline
from lynx.errors import CheckpointError, InputError
from lynx.io.video import sidecar_path
from lynx.models.adapters import adapter_config
from lynx.models.loading import check_model_dirs
from lynx.testing import save_tiny_base

STEPS = 4  # timesteps 999, 899 | 749, 499: two steps on each side of boundary_ratio 0.875


@pytest.fixture(scope="module")
def base22(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("models") / "Wan2.2-T2V-A14B-Diffusers", two_experts=True)


@pytest.fixture(scope="module")
def high(base22, adapter_dirs):
    return LynxPipeline.from_pretrained(base22, adapter=adapter_dirs["full"])


@pytest.fixture(scope="module")
def both(base22, adapter_dirs):
    return LynxPipeline.from_pretrained(base22, adapter=adapter_dirs["full"], experts="both")


def spy(pipe, monkeypatch):
    """Every transformer call (which expert, timestep, conditioning, output) and every step's guided noise."""
    calls, steps = [], []
    predict, step = pipe.predict, pipe.scheduler.step

    def spy_predict(latents, t, text, cond, branch="c"):
        out = predict(latents, t, text, cond, branch)
        calls.append(dict(t=int(t), expert=2 if pipe.expert(t) is pipe.transformer_2 else 1, cond=cond, out=out))
        return out

    def spy_step(noise, t, latents, **kw):
        steps.append(noise)
        return step(noise, t, latents, **kw)

    monkeypatch.setattr(pipe, "predict", spy_predict)
    monkeypatch.setattr(pipe.scheduler, "step", spy_step)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, a, k, n=n: seen.append(n), with_kwargs=True)
             for n, m in ((1, pipe.transformer), (2, pipe.transformer_2))]
    return calls, steps, seen, hooks


def test_loads_the_real_layout_adapters_on_the_high_noise_expert_by_default(high, both, base22):
    index = json.loads((base22 / "model_index.json").read_text())
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"] and index["boundary_ratio"] == 0.875
    assert high.config.boundary_ratio == 0.875 and high.experts == "high" and both.experts == "both"
    assert adapter_config(high.transformer) is not None and adapter_config(high.transformer_2) is None
    assert adapter_config(both.transformer_2) == adapter_config(both.transformer)
    # Both experts carry the same released adapter weights, in their own processors.
    p1, p2 = (dict(m.named_parameters()) for m in (both.transformer, both.transformer_2))
    key = "blocks.1.attn2.processor.to_k_ip.weight"
    assert torch.equal(p1[key], p2[key])
    assert not torch.equal(p1["blocks.1.attn2.to_k.weight"], p2["blocks.1.attn2.to_k.weight"])  # two experts


def test_high_noise_steps_identity_guided_low_noise_steps_plain(high, face_embedding, reference_crop, monkeypatch):
    calls, steps, seen, hooks = spy(high, monkeypatch)
    try:
        high("a man walks", **person(face_embedding, reference_crop), guidance_scale=4.0, guidance_scale_2=3.0,
             guidance_scale_i=1.5, output_type="latent", **{**SMALL, "num_inference_steps": STEPS})
    finally:
        for h in hooks:
            h.remove()
    assert [(c["t"], c["expert"]) for c in calls] == [(999, 1)] * 3 + [(899, 1)] * 3 + [(749, 2)] * 2 + [(499, 2)] * 2
    assert seen == [1, 1] + [1] * 6 + [2] * 4  # two reference passes on the high-noise expert, then the steps
    c, u, i = (x["out"] for x in calls[:3])
    torch.testing.assert_close(steps[0], u + 1.5 * (i - u) + 4.0 * (c - i), rtol=0, atol=0)
    assert calls[0]["cond"].ref_features is not None
    c, u = (x["out"] for x in calls[6:8])
    assert calls[6]["cond"] is None and calls[7]["cond"] is None  # no adapters on the low-noise expert
    torch.testing.assert_close(steps[2], u + 3.0 * (c - u), rtol=0, atol=0)


def test_both_experts_each_read_reference_features_of_their_own_pass(both, face_embedding, reference_crop,
                                                                     monkeypatch):
    calls, steps, _, hooks = spy(both, monkeypatch)
    for h in hooks:
        h.remove()
    both("a man walks", **person(face_embedding, reference_crop), seed=5, output_type="latent",
         **{**SMALL, "num_inference_steps": STEPS})
    assert [c["expert"] for c in calls] == [1] * 6 + [2] * 6  # identity guidance on both experts
    high_cond, low_cond = calls[0]["cond"], calls[6]["cond"]
    own = both.reference_features(reference_crop, torch.Generator().manual_seed(6), transformer=both.transformer_2)
    assert all(torch.equal(a, b) for a, b in zip(low_cond.ref_features, own))
    assert not torch.equal(low_cond.ref_features[1], high_cond.ref_features[1])
    assert torch.equal(low_cond.ip_tokens, high_cond.ip_tokens)  # one resampler, one set of identity tokens


def test_identity_acts_and_strength_windows_span_both_experts(high, both, face_embedding, reference_crop,
                                                              monkeypatch):
    kw = dict(reference_image=reference_crop, seed=3, output_type="latent", **{**SMALL, "num_inference_steps": STEPS})
    a = high("a man walks", face_embedding=face_embedding, **kw).frames
    b = high("a man walks", face_embedding=-face_embedding, **kw).frames
    c = both("a man walks", face_embedding=face_embedding, **kw).frames
    assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3
    calls, _, _, hooks = spy(both, monkeypatch)
    for h in hooks:
        h.remove()
    both("a man walks", face_embedding=face_embedding, ip_end=0.5, guidance_i_end=0.25, **kw)
    scales = [(x["t"], x["cond"].ip_scale) for x in calls]
    assert scales[:3] == [(999, 1.0)] * 3  # step 0: c, u, i with the ID-adapter
    assert scales[3:5] == [(899, 1.0)] * 2  # step 1: outside the identity-guidance window: c, u
    assert {s for t, s in scales if t < 875} == {0.0}  # the low-noise half: outside ip_end=0.5


def test_guidance_2_and_experts_need_a_two_expert_base(tiny_base, adapter_dirs, face_embedding):
    with pytest.raises(InputError, match="needs a two-expert base"):
        LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["full"], experts="both")
    with pytest.raises(InputError, match="experts must be one of high, both"):
        LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["full"], experts="low")
    pipe = LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["lite"])
    with pytest.raises(InputError, match="low-noise expert's guidance; this base has one transformer"):
        pipe("a man walks", face_embedding=face_embedding, guidance_scale_2=3.0, **SMALL)


def _reshaped(base, tmp_path, name, **config):
    d = shutil.copytree(base, tmp_path / name)
    cfg = json.loads((d / "transformer" / "config.json").read_text())
    (d / "transformer" / "config.json").write_text(json.dumps({**cfg, **config}))
    return d


@pytest.mark.parametrize("shape, named", [
    (dict(num_layers=30, num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48),
     r"Wan2.2-TI2V-5B-shaped \(30 blocks of width 3072, 48 input channels\)"),
    (dict(num_layers=30, num_attention_heads=12, attention_head_dim=128),
     r"Wan2.1-T2V-1.3B-shaped \(30 blocks of width 1536, 16 input channels\)"),
])
def test_bases_of_other_shapes_refused_before_loading_with_what_fits(tiny_base, adapter_dirs, tmp_path, shape, named):
    d = _reshaped(tiny_base, tmp_path, "other", **shape)
    fits = (r"made for a transformer of 4 blocks of width 24: use Wan-AI/Wan2.1-T2V-14B-Diffusers or "
            r"Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    for adapter in ("full", "lite"):
        with pytest.raises(CheckpointError, match=named + ".*" + (fits if adapter == "full" else "width 24")):
            LynxPipeline.from_pretrained(d, adapter=adapter_dirs[adapter])
    with pytest.raises(CheckpointError, match=named):
        check_model_dirs(d, adapter_dirs["full"])


def test_ti2v_layout_and_image_models_refused(tmp_path, adapter_dirs, tiny_base):
    ti2v = save_tiny_base(tmp_path / "ti2v", expand_timesteps=True)
    with pytest.raises(CheckpointError, match="per-frame timesteps.*use Wan-AI/Wan2.1-T2V-14B-Diffusers"):
        LynxPipeline.from_pretrained(ti2v, adapter=adapter_dirs["full"])
    i2v = _reshaped(tiny_base, tmp_path, "i2v", num_layers=40, num_attention_heads=40, attention_head_dim=128,
                    in_channels=36)
    with pytest.raises(CheckpointError, match=r"Wan2.1-I2V-14B / Wan2.2-I2V-A14B-shaped .*image-to-video"):
        check_model_dirs(i2v, adapter_dirs["full"])


def test_experts_of_different_shapes_or_no_boundary_refused(base22, adapter_dirs, tmp_path):
    d = shutil.copytree(base22, tmp_path / "b")
    cfg = json.loads((d / "transformer_2" / "config.json").read_text())
    (d / "transformer_2" / "config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    with pytest.raises(Exception, match="the two experts must match"):
        LynxPipeline.from_pretrained(d, adapter=adapter_dirs["full"])
    index = json.loads((base22 / "model_index.json").read_text())
    d = shutil.copytree(base22, tmp_path / "c")
    (d / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": None}))
    with pytest.raises(Exception, match="no boundary_ratio"):
        LynxPipeline.from_pretrained(d, adapter=adapter_dirs["full"])


def test_cli_generates_on_both_experts_and_records_it(base22, adapter_dirs, face_embedding, reference_crop,
                                                       tmp_path, tiny_base):
    from PIL import Image
    from test_cli import lynx

    np.save(tmp_path / "emb.npy", face_embedding)
    Image.fromarray(reference_crop).save(tmp_path / "crop.png")
    common = ["--embedding", tmp_path / "emb.npy", "--reference", tmp_path / "crop.png", "--prompt", "a man walks",
              "--adapter", adapter_dirs["full"], "--height", "32", "--width", "32", "--frames", "5", "--steps", "4"]
    out = tmp_path / "clip.mp4"
    r = lynx("generate", *common, "--base", base22, "--experts", "both", "--guidance-2", "3", "--out", out)
    assert r.returncode == 0, r.stderr
    record = json.loads(sidecar_path(out).read_text())
    assert record["experts"] == "both" and record["guidance_scale_2"] == 3.0
    r = lynx("generate", *common, "--base", tiny_base, "--experts", "both", "--out", tmp_path / "x.mp4")
    assert r.returncode == 2 and "--experts both needs a two-expert base" in r.stderr
    assert not (tmp_path / "x.mp4").exists()
