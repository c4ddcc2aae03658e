"""Wan LoRAs on LynxPipeline: the three key layouts in circulation load to the same model, the reference
pass sees the plain backbone, the prediction changes, and a LoRA for another model size is refused by name."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lynx import LynxPipeline
from lynx.errors import CheckpointError
from lynx.models.adapters import Conditioning
from lynx.models.lora import lora_off, parse_lora_spec

RANK, ALPHA = 2, 4.0  # kohya's alpha / rank = 2 scales its product; the other layouts carry it in B
# (diffusers' module, original Wan module) for the layers the test LoRA touches.
LAYERS = [("attn1.to_q", "self_attn.q"), ("attn1.to_out.0", "self_attn.o"), ("attn2.to_k", "cross_attn.k"),
          ("attn2.to_v", "cross_attn.v"), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2")]


def lora_matrices(width=24, ffn=32, blocks=4, seed=0):
    """{(block, diffusers module): (A [r, in], B [out, r])} with the product scale already in B."""
    g = torch.Generator().manual_seed(seed)
    dims = {"ffn.net.0.proj": (width, ffn), "ffn.net.2": (ffn, width)}
    out = {}
    for b in range(blocks):
        for module, _ in LAYERS:
            i, o = dims.get(module, (width, width))
            out[b, module] = (torch.randn(RANK, i, generator=g) * 0.5, torch.randn(o, RANK, generator=g) * 0.5)
    return out


def write_layout(path, layout, **kw):
    original = dict(LAYERS)
    state = {}
    for (b, module), (a, bb) in lora_matrices(**kw).items():
        if layout == "diffusers":
            state[f"transformer.blocks.{b}.{module}.lora_A.weight"] = a
            state[f"transformer.blocks.{b}.{module}.lora_B.weight"] = bb
        elif layout == "wan":  # original Wan / lightx2v names
            state[f"diffusion_model.blocks.{b}.{original[module]}.lora_A.weight"] = a
            state[f"diffusion_model.blocks.{b}.{original[module]}.lora_B.weight"] = bb
        else:  # kohya / ComfyUI: down, up and alpha (the product is scaled by alpha / rank when applied)
            name = f"diffusion_model.blocks.{b}.{original[module]}"
            state[f"{name}.lora_down.weight"] = a
            state[f"{name}.lora_up.weight"] = bb / (ALPHA / RANK)
            state[f"{name}.alpha"] = torch.tensor(ALPHA)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return {layout: write_layout(d / f"{layout}.safetensors", layout) for layout in ("diffusers", "wan", "kohya")}


@pytest.fixture
def pipe(tiny_base, adapter_dirs):
    return LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["full"])


def prediction(pipe, face_embedding, reference_crop):
    """One denoising prediction of branch c at t=500 on fixed latents (the reference pass included)."""
    feats = pipe.reference_features(reference_crop, torch.Generator().manual_seed(1))
    cond = Conditioning(pipe.identity_tokens(torch.as_tensor(face_embedding)), feats)
    latents = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return feats, pipe.predict(latents, torch.tensor(500), pipe.encode_text(["a man walks"]), cond)


def test_three_layouts_load_the_same_lora_and_leave_the_reference_pass_alone(pipe, loras, face_embedding,
                                                                            reference_crop):
    feats, plain = prediction(pipe, face_embedding, reference_crop)
    outs = {}
    for layout, path in loras.items():
        pipe.load_lora_weights(path, adapter_name=layout)
        pipe.set_adapters([layout])
        with_lora, outs[layout] = prediction(pipe, face_embedding, reference_crop)
        for a, b in zip(with_lora, feats):  # the reference pass ran on the plain backbone
            assert torch.equal(a, b)
    assert (outs["diffusers"] - plain).abs().max() > 1e-2  # the LoRA changes the prediction
    # The same LoRA in every layout: equal up to the rounding of kohya's alpha rescaling (fp32).
    torch.testing.assert_close(outs["wan"], outs["diffusers"], rtol=0, atol=0)
    torch.testing.assert_close(outs["kohya"], outs["diffusers"], rtol=1e-5, atol=1e-5)
    # LoRAs switched off by hand stay off after a reference pass (each layer's own state comes back).
    pipe.disable_lora()
    _, off = prediction(pipe, face_embedding, reference_crop)
    assert torch.equal(off, plain)
    with lora_off(pipe.transformer):
        pass
    _, still_off = prediction(pipe, face_embedding, reference_crop)
    assert torch.equal(still_off, plain)


def test_lora_changes_the_generated_video_at_its_scale(pipe, loras, face_embedding, reference_crop):
    kw = dict(face_embedding=face_embedding, reference_image=reference_crop, height=32, width=48, num_frames=5,
              num_inference_steps=2, output_type="latent", seed=3)
    plain = pipe("a man walks", **kw).frames
    pipe.load_lora_weights(loras["kohya"], adapter_name="k")
    pipe.set_adapters(["k"], [0.0])
    assert torch.equal(pipe("a man walks", **kw).frames, plain)  # scale 0 is the plain model
    pipe.set_adapters(["k"], [1.0])
    assert not torch.allclose(pipe("a man walks", **kw).frames, plain, atol=1e-3)


@pytest.mark.parametrize("shape,message", [
    (dict(width=36), r"other-width\.safetensors is a LoRA for a Wan transformer with 4\+ blocks of width 36; "
                     r"this one has 4 blocks of width 24"),
    (dict(blocks=6), r"other-depth\.safetensors is a LoRA for a Wan transformer with 6\+ blocks"),
])
def test_lora_for_another_model_size_is_refused_by_name(pipe, tmp_path, shape, message):
    name = "other-width" if "width" in shape else "other-depth"
    path = write_layout(tmp_path / f"{name}.safetensors", "wan", **shape)
    with pytest.raises(CheckpointError, match=message):
        pipe.load_lora_weights(path)
    assert not pipe.get_list_adapters()  # nothing half-loaded


def test_not_a_lora_and_missing_files(pipe, tmp_path):
    save_file({"blocks.0.attn1.to_q.weight": torch.zeros(24, 24)}, str(tmp_path / "full.safetensors"))
    with pytest.raises(CheckpointError, match=r"full\.safetensors"):
        pipe.load_lora_weights(tmp_path / "full.safetensors")
    from lynx.errors import InputError

    with pytest.raises(InputError, match=r"nope\.safetensors does not exist"):
        pipe.load_lora_weights(tmp_path / "nope.safetensors")
    # A damaged file (diffusers' reader raises OSError on it) is a CheckpointError naming it, not a traceback.
    (tmp_path / "junk.bin").write_text("<html>404 Not Found</html>")
    with pytest.raises(CheckpointError, match=r"junk\.bin could not be read as a LoRA"):
        pipe.load_lora_weights(tmp_path / "junk.bin")


def test_lora_spec_parsing():
    assert parse_lora_spec("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_spec("dir/a.safetensors:0.5") == ("dir/a.safetensors", 0.5)
    assert parse_lora_spec("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)
    assert np.isclose(parse_lora_spec("a:b.safetensors:-1")[1], -1.0)
