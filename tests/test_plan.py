"""`lynx plan`: the live-bytes counter against hand counts, the real model sizes, and the presets' promises.

The prediction at the real size (81 frames at 480x832, bf16) must put `24gb` under 24 GiB and `12gb` under
12 GiB, full and lite, with the CUDA context (0.5 GiB) on top: the issue's acceptance numbers.
"""

import pytest
import torch
from test_cli import lynx, run_command

from lynx.models.adapters import processors
from lynx.pipelines.memory import get_preset
from lynx.pipelines.plan import (
    GIB,
    FusedAttention,
    LiveBytes,
    build_models,
    leaf_offload_bytes,
    plan_memory,
    resident_weights,
)


def test_live_bytes_counts_each_storage_once_until_its_last_view_dies():
    weight = torch.ones(256, 64, device="meta")
    layer = torch.nn.Linear(64, 256, bias=False, device="meta")
    tracker = LiveBytes([layer])
    with tracker:
        tracker.phase("a")
        x = torch.zeros(8, 64, device="meta")  # 2048 bytes
        y = layer(x)  # 8 x 256 x 4 = 8192 bytes; the transposed weight it uses is a view of a weight: not counted
        view = y.view(2, 4, 256)
        del y
        assert tracker.now == 2048 + 8192  # the view keeps the storage alive
        del view
        assert tracker.now == 2048
        z = (x * 2).to(torch.float8_e4m3fn)  # fp8 results are weights going back to storage: never counted
        assert tracker.now == 2048
        del z
        tracker.phase("b")
        w = weight + 1  # 64 KiB
    assert tracker.peaks == {"a": 2048 + 8192, "b": 2048 + 65536}
    del w, x


def test_attention_is_counted_as_a_fused_kernel():
    q = torch.zeros(1, 40, 32760, 128, dtype=torch.bfloat16, device="meta")
    tracker = LiveBytes()
    with FusedAttention(), tracker:
        tracker.phase("attention")
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    rows = 40 * 32760
    assert out.shape == q.shape
    assert tracker.peaks["attention"] == rows * 128 * 2 + rows * 4  # output + fp32 log-sum-exp, no scores


def test_real_model_sizes():
    full = build_models("full")
    count = lambda module: sum(p.numel() for p in module.parameters())
    adapters = sum(count(p) for p in processors(full.transformer))
    assert count(full.transformer) - adapters == 14_288_491_584  # Wan2.1-T2V-14B
    assert adapters + count(full.resampler) == pytest.approx(4.28e9, rel=0.01)  # spec: about 4.2 B + resampler
    assert count(full.text_encoder) == 5_680_910_336  # UMT5-XXL encoder
    # UMT5's token embedding (256384 x 4096 bf16, tied to the encoder's) is its largest layer, moved once.
    embedding = 256384 * 4096 * 2
    assert embedding < leaf_offload_bytes(full.text_encoder) < embedding + 0.2 * GIB
    everything = resident_weights(get_preset("max"), "denoising", full)
    assert everything == sum(sum(t.numel() * t.element_size() for t in m.parameters())
                             + sum(t.numel() * t.element_size() for t in m.buffers())
                             for m in (full.text_encoder, full.transformer, full.vae, full.resampler))


@pytest.mark.parametrize("variant", ["full", "lite"])
def test_presets_fit_their_cards_at_81x480x832(variant):
    size = dict(frames=81, height=480, width=832)
    for preset, card in (("24gb", 24), ("12gb", 12)):
        plan = plan_memory(preset, variant, **size)
        assert plan.peak.total + 0.5 * GIB <= card * GIB, plan.table()
        # The text encoder is gone before the transformer's weights arrive.
        phases = {p.phase: p for p in plan.phases}
        assert phases["denoising"].weights < phases["text encoding"].weights + 18 * GIB
    plan = plan_memory("24gb", variant, **size)
    assert {p.phase for p in plan.phases} == {"text encoding", "denoising", "VAE decode"} | (
        {"reference passes"} if variant == "full" else set())


def test_plan_command(tmp_path):
    r = lynx("plan", "--memory", "48gb", "12gb", "--variant", "lite", "--frames", "9", "--height", "32",
             "--width", "48", "--gpu-gib", "12")
    assert r.returncode == 0, r.stderr
    assert "Lynx lite, memory preset 48gb, 9 frames at 32x48" in r.stdout and "denoising" in r.stdout
    # At a tiny video size the weights decide: 48gb holds the whole 14B transformer (28 GiB in bf16).
    assert "on a 12 GiB card: 48gb does not fit, 12gb fits" in r.stdout


def lora_14b(path, rank: int, blocks: int = 40):
    """A LoRA of the 14B's shapes (the original Wan layout) on each block's self-attention query."""
    from safetensors.torch import save_file

    state = {}
    for b in range(blocks):
        state[f"diffusion_model.blocks.{b}.self_attn.q.lora_A.weight"] = torch.zeros(rank, 5120)
        state[f"diffusion_model.blocks.{b}.self_attn.q.lora_B.weight"] = torch.zeros(5120, rank)
    save_file(state, str(path))
    return path


def test_a_lora_is_counted_where_the_transformer_layers_are(tmp_path):
    """LoRA weights live in the transformer's layers, in bf16 (also under fp8 storage, as peft holds them
    there): on the GPU wherever and whenever those layers are."""
    from lynx.models.lora import lora_bytes

    lora = lora_bytes(lora_14b(tmp_path / "q.safetensors", rank=4), build_models("lite").transformer)
    assert lora == 40 * 2 * 4 * 5120 * 2  # A and B of 40 layers, bf16
    size = dict(frames=5, height=64, width=64)
    for preset, phase, extra in [("max", "text encoding", lora), ("48gb", "text encoding", 0),
                                 ("24gb", "denoising", lora), ("24gb-blocks", "denoising", 2 * lora // 40),
                                 ("12gb", "denoising", 0)]:
        plain, with_lora = plan_memory(preset, "lite", **size), plan_memory(preset, "lite", **size, lora=lora)
        weights = {p.phase: p.weights for p in plain.phases}
        assert {p.phase: p.weights - weights[p.phase] for p in with_lora.phases}[phase] == extra, preset


def test_plan_command_with_a_lora(tmp_path):
    common = ("plan", "--memory", "24gb", "--variant", "lite", "--frames", "5", "--height", "32", "--width", "32")
    r = lynx(*common, "--lora", lora_14b(tmp_path / "big.safetensors", rank=64, blocks=8))
    assert r.returncode == 0, r.stderr
    assert "the weights include LoRAs of 0.01 GiB in bf16" in r.stdout  # 8 x 2 x 64 x 5120 x 2 bytes
    assert "kept in float32" not in r.stdout + r.stderr  # diffusers' loading advice has no place here
    from test_lora import write_layout

    r = lynx(*common, "--lora", write_layout(tmp_path / "tiny.safetensors", "kohya"))
    assert r.returncode == 2 and "is a LoRA for a Wan transformer with 4+ blocks of width 24" in r.stderr


def test_plan_refuses_a_bad_lora_file_in_one_line(tmp_path):
    (tmp_path / "junk.safetensors").write_text("<html>404 Not Found</html>")
    (tmp_path / "dir.safetensors").mkdir()
    for spec, message in [(tmp_path / "junk.safetensors", f"--lora {tmp_path}/junk.safetensors is not a safetensors "
                                                          "file"),
                          (tmp_path / "dir.safetensors", f"--lora: {tmp_path}/dir.safetensors is a folder, not a file"),
                          (f"{tmp_path}/junk.safetensors:abc", "the scale 'abc' is not a number")]:
        r = run_command("plan", "--memory", "max", "--frames", "5", "--height", "32", "--width", "32", "--lora", spec)
        assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("lynx plan: error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert message in r.stderr, r.stderr


@pytest.mark.parametrize("args,message", [
    (["--frames", "0"], "invalid video size: --frames 0 is not 4k+1 (try 1 or 5)"),
    (["--gpu-gib", "0"], "argument --gpu-gib: 0 is not a card size: give its memory in GiB, a number above 0"),
    (["--gpu-gib", "-8"], "argument --gpu-gib: -8 is not a card size"),
    (["--gpu-gib", "lots"], "argument --gpu-gib: lots is not a card size"),
    (["--frames", "100001"], "--frames 100001 is above the limit of 241 (try 241, or pass --allow-large"),
    (["--height", "100000"], "--height 100000 is above the limit of 1920 (try 1920, or pass --allow-large"),
    (["--height", "100000", "--allow-large"], "--height 100000 is beyond the 16384 that Wan's position embedding "
                                              "covers"),
])
def test_plan_refuses_bad_sizes_in_one_line(args, message):
    r = run_command("plan", "--memory", "max", *args)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("lynx plan: error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert message in r.stderr, r.stderr


def test_plan_denoises_a_long_video_in_the_context_windows_generate_uses():
    """Frames beyond the context window are denoised window by window, as `lynx generate` runs them."""
    from lynx.pipelines.windows import ContextWindows

    r = lynx("plan", "--memory", "max", "--variant", "lite", "--frames", "41", "--context-frames", "21",
             "--height", "32", "--width", "32")
    assert r.returncode == 0, r.stderr
    windows = len(ContextWindows(frames=21, overlap=16).video_windows(41))
    assert windows == 4 and f"41 frames at 32x32 in {windows} context windows of 21 frames" in r.stdout
    from lynx.pipelines.plan import plan_settings

    # Without --context-frames, the window generate uses: the variant's clip (81 frames full).
    assert plan_settings("full", frames=241).context_frames == 81
