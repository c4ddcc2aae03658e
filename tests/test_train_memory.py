"""The FSDP memory model: parameter counts of the real 14B definitions, measured activations, sharding arithmetic."""

from pathlib import Path

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


# ----- host memory of the sharded start ------------------------------------------------------------------------
PROBE = '''
import json, sys
from pathlib import Path
import accelerate, diffusers, torch, torch.distributed.checkpoint, torch.distributed.fsdp  # imported before measuring
from diffusers import WanTransformer3DModel
from lynx.training.config import training_config_from_dict
from lynx.training.model import build_model, setup_runtime, teardown_runtime

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

base, adapters = sys.argv[1], Path(sys.argv[2])
runtime = setup_runtime()
config = training_config_from_dict({"train": {"base": base, "precision": "fp32", "init": str(adapters)}})
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
model = build_model(config, runtime, adapters)
peak = status("VmHWM:") - before
local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
full = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"rank": runtime.rank, "peak": peak, "local": local, "full": full}), flush=True)
teardown_runtime(runtime)
'''


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_two_ranks_start_with_their_shards_only(tmp_path):
    """Meta-device construction, FSDP2 sharding, then each rank reads only its rows of the files: the peak
    host memory a rank adds while building the model stays near its half, far below one full copy."""
    import json
    import os
    import re
    import subprocess
    import sys

    from lynx.testing import save_tiny_adapters, save_tiny_base

    # Wide enough (185 MB in fp32) that a full copy stands far above the allocator's noise.
    cfg = TinyModelConfig(num_layers=4, num_heads=8, head_dim=96, ffn_dim=3072)
    base = save_tiny_base(tmp_path / "base", cfg)
    adapters = save_tiny_adapters(tmp_path / "adapters", "full", cfg)
    (tmp_path / "probe.py").write_text(PROBE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(tmp_path / "probe.py"), str(base), str(adapters)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    # The two ranks share one stdout, so their lines can interleave ('{...}{...}'): take each object as written.
    ranks = [json.loads(obj) for obj in re.findall(r"\{[^{}]*\}", done.stdout)]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    mib = 2 ** 20
    for r in ranks:
        print(f"rank {r['rank']}: peak host memory added while building {r['peak'] / mib:.1f} MiB; its shards "
              f"{r['local'] / mib:.1f} MiB; one full copy {r['full'] / mib:.1f} MiB")
        assert r["local"] == pytest.approx(r["full"] / 2, rel=0.02)
        assert r["peak"] < r["full"]  # below one full copy (every rank held a full copy before sharding)
        assert r["peak"] < r["local"] + 0.25 * r["full"]  # near its shard: what it keeps plus transients
