"""Quantized bases on tiny models the tests write themselves: GGUF files (community layout, Q8_0/Q5_0/Q4_0) and
torchao / bitsandbytes through diffusers' quantization configs, with the Lynx adapters kept in the pipeline dtype.

Parity is against a pipeline whose transformer holds what the quantized file means, dequantized, so the videos
match to float arithmetic, not to a quantization tolerance. diffusers dequantizes a Q8_0/Q5_0/Q4_0 block as
fp16 scale x integer in fp16 (one rounding of an exact product), so the reference weights are gguf-py's fp32
dequantization rounded once to fp16.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import SMALL

from lynx import LynxPipeline
from lynx.errors import CheckpointError, InputError, WeightsNotFoundError
from lynx.models.adapters import processors
from lynx.models.loading import check_model_dirs
from lynx.models.quantized import inspect_gguf
from lynx.pipelines.memory import MemoryPresetError, check_preset
from lynx.testing import (
    TinyModelConfig,
    save_tiny_adapters,
    save_tiny_base,
    save_transformer_gguf,
    tiny_transformer,
    wan_original_name,
)

gguf = pytest.importorskip("gguf")

# Widths that split into GGUF's 32-value blocks (the default tiny model is 24 wide).
CFG = TinyModelConfig(head_dim=48, ffn_dim=64, text_dim=32, freq_dim=32)
KW = dict(output_type="latent", seed=3, **{**SMALL, "num_inference_steps": 2})


def person(face_embedding, reference_crop):
    return dict(face_embedding=face_embedding, reference_image=reference_crop)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base, its transformer as a GGUF file, the same base with its transformer weights removed (what a
    GGUF user downloads), and a base whose transformer holds the GGUF's values dequantized."""
    from diffusers import WanTransformer3DModel

    root = tmp_path_factory.mktemp("quant")
    base = save_tiny_base(root / "base", CFG)
    adapter = save_tiny_adapters(root / "lynx_full", "full", CFG)
    transformer = WanTransformer3DModel.from_pretrained(base / "transformer")
    file = root / "wan-tiny-Q8_0.gguf"
    values = save_transformer_gguf(file, transformer, prefix="model.diffusion_model.")
    slim = root / "base-without-transformer-weights"
    shutil.copytree(base, slim)
    for weights in (slim / "transformer").glob("*.safetensors"):
        weights.unlink()
    dequantized = root / "base-dequantized"
    shutil.copytree(base, dequantized)
    transformer.load_state_dict({k: v if kind == "F32" else v.half().float() for k, (v, kind) in values.items()})
    transformer.save_pretrained(dequantized / "transformer")
    return dict(base=base, adapter=adapter, file=file, slim=slim, dequantized=dequantized, root=root)


# ----- the file ------------------------------------------------------------------------------------------------
def test_original_names_are_what_diffusers_converts_back():
    """The writer's key names are the community files' (original Wan), proven by diffusers' own converter
    mapping every one of them back onto the model, with every value."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    state = tiny_transformer(CFG).state_dict()
    original = {wan_original_name(k): v for k, v in state.items()}
    assert "head.modulation" in original and "blocks.0.cross_attn.o.weight" in original
    back = convert_wan_transformer_to_diffusers(dict(original))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_header_describes_the_transformer(models):
    found = inspect_gguf(models["file"])
    assert (found.blocks, found.width, found.in_channels, found.ffn_dim, found.text_dim) == \
        (CFG.num_layers, CFG.hidden_dim, CFG.vae_z_dim, CFG.ffn_dim, CFG.text_dim)
    # 4 blocks x (4 self-attention Q8_0, 4 cross-attention Q5_0, 2 FFN Q4_0) matrices; the rest F32
    assert {k: found.quant_types[k] for k in ("Q8_0", "Q5_0", "Q4_0")} == {"Q8_0": 16, "Q5_0": 16, "Q4_0": 8}
    assert not found.image_to_video


# ----- generation ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gguf_base_gives_the_video_of_its_dequantized_weights(models, face_embedding, reference_crop, dtype):
    """A base whose transformer folder holds only config.json, plus the GGUF file: the quantized matrices stay
    packed (uint8) and the video is the one of the dequantized weights, bit for bit, in fp32 and in bf16 (the
    same values reach the same kernels). The adapters and the resampler are plain tensors in the pipeline dtype."""
    pipe = LynxPipeline.from_pretrained(models["slim"], models["adapter"], torch_dtype=dtype,
                                        transformer_file=models["file"])
    t = pipe.transformer
    assert t.blocks[0].attn1.to_q.weight.dtype == torch.uint8 and t.blocks[0].ffn.net[0].proj.weight.dtype == \
        torch.uint8
    adapter_params = [p for proc in processors(t) for p in proc.parameters()] + list(pipe.resampler.parameters())
    assert adapter_params and all(type(p) is torch.nn.Parameter and p.dtype == dtype and not p.requires_grad
                                  for p in adapter_params)
    # Every plain weight in the pipeline dtype as the unquantized path casts them; RoPE tables stay fp32.
    plain = [p for n, p in t.named_parameters() if p.dtype != torch.uint8]
    assert all(p.dtype == dtype for p in plain) and t.rope.freqs_cos.dtype == torch.float32

    video = pipe("a man walks", **person(face_embedding, reference_crop), **KW).frames
    reference = LynxPipeline.from_pretrained(models["dequantized"], models["adapter"], torch_dtype=dtype)
    assert torch.equal(video, reference("a man walks", **person(face_embedding, reference_crop), **KW).frames)
    # ... and not the unquantized base's: the file's weights were used.
    original = LynxPipeline.from_pretrained(models["base"], models["adapter"], torch_dtype=dtype)
    assert not torch.equal(video, original("a man walks", **person(face_embedding, reference_crop), **KW).frames)


def test_gguf_base_under_model_offload_and_layer_streaming(models, face_embedding, reference_crop):
    """The 48gb preset (model CPU offload: every weight copied to "cpu:0" and back, packed ones included) and 12gb
    (leaf-level group offloading) keep the quantized matrices packed and give the plain GGUF pipeline's video; the
    copy may take another summation path, hence float32 rounding (test_memory's bound)."""
    load = lambda: LynxPipeline.from_pretrained(models["slim"], models["adapter"],  # noqa: E731
                                                transformer_file=models["file"])
    kw = dict(**person(face_embedding, reference_crop), **KW)
    plain = load()("a man walks", **kw).frames
    for preset in ("48gb", "12gb"):
        pipe = load()
        pipe.enable_memory_preset(preset, "cpu")
        video = pipe("a man walks", **kw).frames
        assert pipe.transformer.blocks[0].attn1.to_q.weight.dtype == torch.uint8
        torch.testing.assert_close(video, plain, atol=1e-4, rtol=0)


# ----- refusals, before anything loads ------------------------------------------------------------------------
def test_gguf_of_another_model_is_refused_naming_the_file(models):
    other = models["root"] / "wan-1.3b-like.gguf"
    save_transformer_gguf(other, tiny_transformer(TinyModelConfig()))  # 24 wide, the base is 96
    with pytest.raises(CheckpointError) as e:
        check_model_dirs(models["slim"], models["adapter"], {"transformer": other})
    message = str(e.value)
    assert "\n" not in message and str(other) in message and "width 24" in message and "width 96" in message

    llm = models["root"] / "llama.gguf"
    writer = gguf.GGUFWriter(str(llm), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(CheckpointError, match=r"llama\.gguf is not a Wan transformer GGUF \(its general\."
                                              r"architecture is 'llama'\)"):
        LynxPipeline.from_pretrained(models["slim"], models["adapter"], transformer_file=llm)

    junk = models["root"] / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="junk.gguf could not be read as GGUF"):
        LynxPipeline.from_pretrained(models["slim"], models["adapter"], transformer_file=junk)
    with pytest.raises(InputError, match="must be a GGUF file"):
        LynxPipeline.from_pretrained(models["slim"], models["adapter"],
                                     transformer_file=models["base"] / "transformer" / "config.json")
    with pytest.raises(WeightsNotFoundError, match="absent.gguf does not exist"):
        LynxPipeline.from_pretrained(models["slim"], models["adapter"], transformer_file=models["root"] / "absent.gguf")
    with pytest.raises(InputError, match="has one transformer"):
        LynxPipeline.from_pretrained(models["base"], models["adapter"], transformer_2_file=models["file"])
    # The slim base alone lacks the transformer's weights, and says so.
    with pytest.raises(WeightsNotFoundError, match="transformer is missing or incomplete"):
        check_model_dirs(models["slim"], models["adapter"])


def test_fp8_preset_is_refused_on_a_quantized_transformer():
    with pytest.raises(MemoryPresetError, match=r"already \(gguf\); use --memory 48gb"):
        check_preset("24gb", "cpu", "gguf")
    check_preset("48gb", "cpu", "gguf")


# ----- the command line -----------------------------------------------------------------------------------------
def test_generate_with_base_transformer(models, face_embedding, reference_crop, tmp_path):
    """GIF, not MP4: libx264's threads make the decoded frames of two runs differ by a few levels now and then."""
    from PIL import Image
    from test_cli import TINY, lynx

    from lynx.io.video import read_video

    np.save(tmp_path / "emb.npy", face_embedding)
    Image.fromarray(reference_crop).save(tmp_path / "crop.png")
    common = ["--embedding", tmp_path / "emb.npy", "--reference", tmp_path / "crop.png", "--prompt", "a man walks",
              "--adapter", models["adapter"], "--seed", 4, *TINY]
    r = lynx("generate", *common, "--base", models["slim"], "--base-transformer", models["file"],
             "--out", tmp_path / "gguf.gif")
    assert r.returncode == 0, r.stderr
    assert f"transformer from {models['file']}" in r.stderr
    sidecar = json.loads((tmp_path / "gguf.gif.json").read_text())
    assert sidecar["base_transformer"] == {"transformer": str(models["file"].resolve())}
    r = lynx("generate", *common, "--base", models["dequantized"], "--out", tmp_path / "dequantized.gif")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(read_video(tmp_path / "gguf.gif")[0], read_video(tmp_path / "dequantized.gif")[0])

    # Another model's GGUF, and fp8 storage on top of GGUF: one line each, before any model loads.
    loaded = lambda r: any(line.startswith("loading ") for line in r.stderr.splitlines())  # noqa: E731
    other = models["root"] / "cli-other.gguf"
    save_transformer_gguf(other, tiny_transformer(TinyModelConfig()))
    r = lynx("generate", *common, "--base", models["slim"], "--base-transformer", other, "--out", tmp_path / "x.mp4")
    assert r.returncode == 2 and not loaded(r), r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"lynx generate: error: {other} holds a Wan transformer")
    r = lynx("generate", *common, "--base", models["slim"], "--base-transformer", models["file"], "--memory", "24gb",
             "--out", tmp_path / "y.mp4")
    assert r.returncode == 2 and not loaded(r) and "use --memory 48gb" in r.stderr, r.stderr


def test_serve_takes_the_base_transformer_option(models):
    from lynx.apps.cli import build_parser
    from lynx.apps.web.cli import load_options, model_flags

    args = build_parser().parse_args(["serve", "--base", str(models["slim"]), "--base-transformer",
                                      str(models["file"])])
    assert load_options(args)["base_transformer"] == str(models["file"])
    assert model_flags(args)[-2:] == ["--base-transformer", str(models["file"])]


# ----- torchao and bitsandbytes through diffusers' configs ------------------------------------------------------
def test_torchao_int8_transformer_keeps_the_adapters_in_float(models, face_embedding, reference_crop):
    """int8 weight-only (torchao, per-row scales) for the transformer through a PipelineQuantizationConfig: its
    matrices become int8 tensors, the adapters and the resampler stay plain fp32, and the video is the one of the
    transformer holding the int8 weights dequantized, to float32 rounding (the int8 matmul applies the scale
    after the product)."""
    pytest.importorskip("torchao")
    from diffusers import PipelineQuantizationConfig, TorchAoConfig, WanTransformer3DModel
    from torchao.quantization import Int8WeightOnlyConfig

    config = PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(Int8WeightOnlyConfig())})
    pipe = LynxPipeline.from_pretrained(models["base"], models["adapter"], quantization_config=config)
    t = pipe.transformer
    weight = t.blocks[0].attn1.to_q.weight
    assert type(weight) is not torch.nn.Parameter and weight.qdata.dtype == torch.int8
    adapter_params = [p for proc in processors(t) for p in proc.parameters()] + list(pipe.resampler.parameters())
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in adapter_params)
    assert pipe.text_encoder.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float32  # not mapped
    kw = dict(**person(face_embedding, reference_crop), **KW)
    video = pipe("a man walks", **kw).frames

    dequantized = models["root"] / "base-int8-dequantized"
    if not dequantized.exists():
        shutil.copytree(models["base"], dequantized)
        plain = WanTransformer3DModel.from_pretrained(models["base"] / "transformer")
        quantized = {n: m.weight for n, m in t.named_modules() if hasattr(getattr(m, "weight", None), "qdata")}
        assert quantized
        with torch.no_grad():
            for name, w in quantized.items():
                plain.get_submodule(name).weight.copy_(w.dequantize())
        plain.save_pretrained(dequantized / "transformer")
    reference = LynxPipeline.from_pretrained(dequantized, models["adapter"])("a man walks", **kw).frames
    torch.testing.assert_close(video, reference, atol=1e-4, rtol=0)
    original = LynxPipeline.from_pretrained(models["base"], models["adapter"])("a man walks", **kw).frames
    assert (video - original).abs().max() > 10 * (video - reference).abs().max()  # it was quantized


def test_a_single_quantization_config_applies_to_the_transformer_only(models):
    pytest.importorskip("torchao")
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    pipe = LynxPipeline.from_pretrained(models["base"], models["adapter"],
                                        quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    assert hasattr(pipe.transformer.blocks[0].attn1.to_q.weight, "qdata")
    assert type(pipe.vae.decoder.conv_in.weight) is torch.nn.Parameter
    with pytest.raises(InputError, match="quantized already"):
        LynxPipeline.from_pretrained(models["slim"], models["adapter"], transformer_file=models["file"],
                                     quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    with pytest.raises(InputError, match="must be a diffusers quantization config"):
        LynxPipeline.from_pretrained(models["base"], models["adapter"], quantization_config={"bits": 8})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal; on a GPU the next test loads it")
def test_bitsandbytes_without_a_gpu_is_one_clear_error(models):
    pytest.importorskip("bitsandbytes")
    from diffusers import BitsAndBytesConfig

    with pytest.raises(InputError, match=r"transformer could not be loaded with BitsAndBytesConfig \(.*GPU"):
        LynxPipeline.from_pretrained(models["base"], models["adapter"],
                                     quantization_config=BitsAndBytesConfig(load_in_8bit=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="diffusers' bitsandbytes quantizer needs a GPU")
def test_bitsandbytes_4bit_transformer_keeps_the_adapters_in_bf16(models, face_embedding, reference_crop):
    pytest.importorskip("bitsandbytes")
    from diffusers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    pipe = LynxPipeline.from_pretrained(models["base"], models["adapter"], torch_dtype=torch.bfloat16,
                                        quantization_config=config, device="cuda")
    assert pipe.transformer.blocks[0].attn1.to_q.weight.dtype == torch.uint8
    assert all(p.dtype == torch.bfloat16 for proc in processors(pipe.transformer) for p in proc.parameters())
    video = pipe("a man walks", **person(face_embedding, reference_crop), **KW).frames
    assert torch.isfinite(video).all()
