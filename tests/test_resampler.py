"""The Perceiver Resampler against a hand-written reference and its sizes read back from a state dict."""

import math

import pytest
import torch

from lynx.constants import ResamplerConfig
from lynx.errors import CheckpointError
from lynx.models.resampler import Resampler, resampler_config_from_state_dict

CFG = ResamplerConfig(dim=32, depth=2, heads=2, dim_head=16, num_queries=4, embedding_dim=512, output_dim=24,
                      ff_mult=3)


def reference_resampler(sd, x, cfg):
    """Independent re-derivation of the released computation with plain tensor ops."""
    ln = lambda t, p: torch.nn.functional.layer_norm(t, (t.shape[-1],), sd[p + ".weight"], sd[p + ".bias"])
    x = x @ sd["proj_in.weight"].T + sd["proj_in.bias"]
    lat = sd["latents"].repeat(x.shape[0], 1, 1)
    for i in range(cfg.depth):
        a = f"layers.{i}.0."
        xn, ln_ = ln(x, a + "norm1"), ln(lat, a + "norm2")
        q = ln_ @ sd[a + "to_q.weight"].T
        kv = torch.cat([xn, ln_], 1) @ sd[a + "to_kv.weight"].T
        k, v = kv[..., : kv.shape[-1] // 2], kv[..., kv.shape[-1] // 2:]
        heads = []
        for h in range(cfg.heads):
            s = slice(h * cfg.dim_head, (h + 1) * cfg.dim_head)
            w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(cfg.dim_head), -1)
            heads.append(w @ v[..., s])
        lat = torch.cat(heads, -1) @ sd[a + "to_out.weight"].T + lat
        f = f"layers.{i}.1."
        hdn = torch.nn.functional.gelu(ln(lat, f + "0") @ sd[f + "1.weight"].T)
        lat = hdn @ sd[f + "3.weight"].T + lat
    return ln(lat @ sd["proj_out.weight"].T + sd["proj_out.bias"], "norm_out")


def test_matches_hand_written_reference():
    torch.manual_seed(0)
    model = Resampler(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(3, 1, 512)
    with torch.no_grad():
        out = model(x)
        ref = reference_resampler(model.state_dict(), x, CFG)
    assert out.shape == (3, 4, 24)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # [B, 512] is accepted as a single-token input too.
    torch.testing.assert_close(model(x[:, 0]), out)


def test_released_key_names_and_shapes():
    sd = Resampler(ResamplerConfig()).state_dict()
    assert sd["latents"].shape == (1, 16, 1280)
    assert sd["proj_in.weight"].shape == (1280, 512)
    assert sd["layers.3.0.to_kv.weight"].shape == (2560, 1280)
    assert sd["layers.0.1.1.weight"].shape == (5120, 1280)
    assert sd["proj_out.weight"].shape == (5120, 1280) and "norm_out.bias" in sd
    assert not any(k.endswith("to_q.bias") or k.endswith("to_out.bias") for k in sd)


def test_sizes_read_from_state_dict():
    sd = Resampler(ResamplerConfig(output_dim=2048)).state_dict()
    assert resampler_config_from_state_dict(sd) == ResamplerConfig(output_dim=2048)
    assert resampler_config_from_state_dict(Resampler(CFG).state_dict(), heads=2) == CFG


def test_foreign_state_dict_is_refused():
    with pytest.raises(CheckpointError, match="not a Lynx resampler"):
        resampler_config_from_state_dict({"weight": torch.zeros(2, 2)}, source="x.safetensors")
