"""The FSDP memory model: parameter counts of the real 14B definitions, measured activations, sharding arithmetic."""

import pytest

from lynx.testing import TinyModelConfig
from lynx.training.memory import (
    GIB,
    WAN_14B,
    ActivationModel,
    block_saved_bytes,
    fits,
    fsdp_memory_per_gpu,
    meta_model,
    parameter_counts,
)


@pytest.fixture(scope="module")
def wan14b():
    transformer, resampler = meta_model(WAN_14B)
    return transformer, resampler, parameter_counts(transformer, resampler)


def test_parameter_counts_are_the_spec_figures(wan14b):
    transformer, resampler, counts = wan14b
    assert counts.backbone / 1e9 == pytest.approx(14.29, abs=0.005)
    layers = counts.adapters - sum(p.numel() for p in resampler.parameters())
    assert layers / 1e9 == pytest.approx(4.20, abs=0.01)  # ID + Ref layers: 29.35 % of the base (spec 2)
    assert layers / counts.backbone == pytest.approx(0.2935, abs=0.001)
    assert counts.block_adapters * 40 == layers
    assert counts.block_backbone * 40 + counts.root - sum(p.numel() for p in resampler.parameters()) \
        == counts.backbone


def test_activation_model_is_exact_and_has_no_score_matrix(wan14b):
    transformer, _, _ = wan14b
    model = ActivationModel.measure(transformer, tokens=512)
    # Linear in tokens and samples: with FlashAttention nothing of size tokens^2 is kept.
    predicted = model.bytes(3000, 3)
    assert block_saved_bytes(transformer, 3000, 3) == pytest.approx(predicted, rel=1e-9)
    width = 5120
    assert 50 * width < model.per_token < 200 * width  # tens of width-sized tensors per token, not thousands


def test_sharding_arithmetic(wan14b):
    _, _, counts = wan14b
    activations = ActivationModel(per_token=1000.0, per_sample=10.0, constant=5.0)
    kw = dict(tokens=32760, samples=1, blocks=40, hidden=5120)
    one, eight, many = (fsdp_memory_per_gpu(counts, activations, gpus=n, **kw) for n in (1, 8, 128))
    key = "AdamW moments (fp32, sharded)"
    assert one[key] == counts.adapters * 8 and eight[key] == pytest.approx(one[key] / 8)
    assert one["total"] > eight["total"] > many["total"]
    assert one["gathered units (bf16)"] == 0 and eight["gathered units (bf16)"] > 0
    assert not fits(one, 80) and fits(eight, 80)
    no_ckpt = fsdp_memory_per_gpu(counts, activations, gpus=8, gradient_checkpointing=False, **kw)
    assert no_ckpt["activations: all blocks"] == 40 * (1000.0 * 32760 + 10.0 + 5.0)
    assert eight["total"] / GIB < 80


def test_tiny_model_counts_match_the_live_modules():
    from lynx.testing import add_tiny_adapters, tiny_adapter_config, tiny_components

    cfg = TinyModelConfig()
    kwargs = dict(num_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                  ffn_dim=cfg.ffn_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, in_channels=16,
                  out_channels=16, rope_max_seq_len=32)
    transformer, meta_resampler = meta_model(kwargs, tiny_adapter_config("full", cfg))
    counts = parameter_counts(transformer, meta_resampler)
    live = tiny_components(cfg)["transformer"]
    assert counts.backbone == sum(p.numel() for p in live.parameters())
    resampler = add_tiny_adapters(live, "full", cfg)
    assert counts.adapters == sum(p.numel() for p in live.parameters()) - counts.backbone + \
        sum(p.numel() for p in resampler.parameters())
