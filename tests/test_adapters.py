"""Adapter processors on diffusers' WanTransformer3DModel: parity with the plain model, hand-computed branches,
and the adapter weights as parameters of the transformer."""

import copy

import pytest
import torch
import torch.nn.functional as F

import lynx.models.adapters as lynx_adapters
from lynx.errors import InputError
from lynx.models.adapters import (
    Conditioning,
    LynxAttnProcessor,
    adapter_config,
    conditioning,
    install_adapters,
    processors,
    recording,
    uninstall_adapters,
)
from lynx.testing import TinyModelConfig, add_tiny_adapters, tiny_adapter_config, tiny_components

CFG = TinyModelConfig()


@pytest.fixture(scope="module")
def transformer():
    return tiny_components(CFG)["transformer"]


def inputs(seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CFG.vae_z_dim, 2, 8, 8, generator=g)
    text = torch.randn(batch, 7, CFG.text_dim, generator=g)
    t = torch.full((batch,), 500.0)
    return x, t, text


def run(model, x, t, text):
    return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


def adapted(transformer, variant="full", **kw):
    model = copy.deepcopy(transformer)
    add_tiny_adapters(model, variant, CFG, **kw)
    return model, adapter_config(model)


def make_cond(config, seed=1, batch=1, ref_tokens=16, **kw):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, config.resampler.num_queries, config.ip_input_dim, generator=g)
    ref = None
    if config.use_ref:
        ref = [torch.randn(batch, ref_tokens, CFG.hidden_dim, generator=g) for _ in range(CFG.num_layers)]
    return Conditioning(tokens, ref, **kw)


@pytest.mark.parametrize("variant", ["full", "lite"])
def test_without_conditioning_equals_plain_diffusers(transformer, variant):
    model, _ = adapted(transformer, variant)
    x, t, text = inputs()
    with torch.no_grad():
        assert torch.equal(run(model, x, t, text), run(transformer, x, t, text))


def test_zeroed_adapters_equal_plain_diffusers(transformer):
    model, config = adapted(transformer, "full", num_registers=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".processor." in name:
                p.zero_()
    x, t, text = inputs()
    with torch.no_grad(), conditioning(model, make_cond(config)):
        out = run(model, x, t, text)
    assert torch.equal(out, run(transformer, x, t, text))


@pytest.mark.parametrize("variant,registers", [("full", 0), ("full", 3), ("lite", 0)])
def test_adapters_change_output_and_scales_switch_branches_off(transformer, variant, registers):
    model, config = adapted(transformer, variant, num_registers=registers)
    x, t, text = inputs()
    plain = run(transformer, x, t, text).detach()
    with torch.no_grad():
        with conditioning(model, make_cond(config)):
            on = run(model, x, t, text)
        with conditioning(model, make_cond(config, ip_scale=0.0, ref_scale=0.0)):
            off = run(model, x, t, text)
        with conditioning(model, make_cond(config, ip_scale=2.0)):
            doubled = run(model, x, t, text)
    assert (on - plain).abs().max() > 1e-3
    assert torch.equal(off, plain)
    assert (doubled - on).abs().max() > 1e-3


def manual_attention(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v per head, q/k/v as [B, S, H*D]."""
    b, s, _ = q.shape
    q, k, v = (z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
    return (w @ v).transpose(1, 2).reshape(b, s, -1)


@pytest.mark.parametrize("scale", [0.7, 1.0])  # 1.0: the branch is added without the (exact) product
@pytest.mark.parametrize("variant,registers", [("full", 0), ("full", 2), ("lite", 0)])
def test_id_branch_matches_hand_computation(transformer, variant, registers, scale):
    model, config = adapted(transformer, variant, num_registers=registers)
    block = 2
    attn = model.blocks[block].attn2
    cond = make_cond(config, ip_scale=scale)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(1, 10, CFG.hidden_dim, generator=g)
    text = torch.randn(1, 6, CFG.hidden_dim, generator=g)
    with torch.no_grad():
        base = attn(h, text)
        with conditioning(model, cond):
            out = attn(h, text)
        layer = attn.processor
        tokens = cond.ip_tokens
        if registers:
            tokens = torch.cat([tokens, layer.registers.tokens], 1)
        k = layer.to_k_ip(tokens)
        if variant == "full":
            k = attn.norm_k(k)
        else:
            k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-5)
        q = attn.norm_q(attn.to_q(h))
        branch = manual_attention(q, k, layer.to_v_ip(tokens), attn.heads)
        expected = base + scale * F.linear(branch, attn.to_out[0].weight)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_lite_leaves_odd_blocks_alone(transformer):
    model, config = adapted(transformer, "lite")
    assert config.ip_blocks == (0, 2)
    assert [model.blocks[i].attn2.processor.branch for i in range(4)] == ["ip", None, "ip", None]
    assert all(model.blocks[i].attn1.processor.branch is None for i in range(4))
    assert not list(model.blocks[1].attn2.processor.parameters())


@pytest.mark.parametrize("variant", ["full", "lite"])
def test_processors_reads_the_blocks_as_a_walk_would(transformer, variant):
    # `processors` reads attn1/attn2 of each block (the fast path `conditioning` takes on every call); it must
    # find exactly what a walk over every module finds, in the same order, for a transformer, one block and a
    # module without Wan's layout (the walk itself).
    model, _ = adapted(transformer, variant)

    def walk(module):
        return [m for m in module.modules() if isinstance(m, LynxAttnProcessor)]

    assert list(processors(model)) == walk(model) and len(walk(model)) == 2 * CFG.num_layers
    assert list(processors(model.blocks[1])) == walk(model.blocks[1])
    wrapped = torch.nn.Sequential(model)
    assert list(processors(wrapped)) == walk(model)


def test_ref_branch_matches_hand_computation(transformer):
    model, config = adapted(transformer, "full")
    block = 1
    attn = model.blocks[block].attn1
    cond = make_cond(config, ref_scale=1.3, ref_tokens=9)
    x, t, text = inputs()
    rope = model.rope(x)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(1, rope[0].shape[1], CFG.hidden_dim, generator=g)
    with torch.no_grad():
        base = attn(h, None, None, rope)
        with conditioning(model, cond):
            out = attn(h, None, None, rope)
        layer = attn.processor
        feats = cond.ref_features[block]
        q = attn.norm_q(attn.to_q(h))  # no RoPE on the reference branch
        branch = manual_attention(q, attn.norm_k(layer.to_k_ref(feats)), layer.to_v_ref(feats), attn.heads)
        expected = base + 1.3 * F.linear(branch, attn.to_out[0].weight)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_recording_captures_the_self_attention_input_of_every_block(transformer):
    model, config = adapted(transformer, "full")
    seen = []
    hooks = [b.attn1.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone())) for b in model.blocks]
    x, t, text = inputs()
    try:
        with torch.no_grad(), conditioning(model, make_cond(config)), recording(model) as rec:
            out = run(model, x, t, text)
    finally:
        for hk in hooks:
            hk.remove()
    assert len(rec) == CFG.num_layers == len(seen)
    for a, b in zip(rec, seen):
        assert torch.equal(a, b)
    # Recording switches every adapter branch off: the pass is the plain model's.
    assert torch.equal(out, run(transformer, x, t, text).detach())
    assert all(p.source is None and p.kv is None and not p.record and p.recorded is None for p in processors(model))


def test_cached_keys_values_equal_uncached(transformer):
    model, config = adapted(transformer, "full", num_registers=1)
    x, t, text = inputs()
    cached = make_cond(config)
    with torch.no_grad(), conditioning(model, cached):
        first, second = run(model, x, t, text), run(model, x, t, text)
    assert len(cached._kv) == 2 * CFG.num_layers
    uncached = make_cond(config, cache_kv=False)
    with torch.no_grad(), conditioning(model, uncached):
        third = run(model, x, t, text)
    assert torch.equal(first, second) and torch.equal(first, third) and not uncached._kv


def test_batched_inputs_match_single(transformer):
    model, config = adapted(transformer, "full")
    x, t, text = inputs(batch=2)
    cond = make_cond(config, batch=2)
    with torch.no_grad():
        with conditioning(model, cond):
            both = run(model, x, t, text)
        for i in range(2):
            one = Conditioning(cond.ip_tokens[i:i + 1], [f[i:i + 1] for f in cond.ref_features])
            with conditioning(model, one):
                torch.testing.assert_close(run(model, x[i:i + 1], t[i:i + 1], text[i:i + 1]), both[i:i + 1],
                                           atol=1e-5, rtol=1e-5)


def test_gradients_reach_adapters_only_when_trained(transformer):
    model, config = adapted(transformer, "full")
    model.requires_grad_(False)
    for proc in processors(model):
        proc.requires_grad_(True)
    x, t, text = inputs()
    with conditioning(model, make_cond(config, cache_kv=False)):
        run(model, x, t, text).square().mean().backward()
    assert model.blocks[0].attn2.processor.to_k_ip.weight.grad.abs().sum() > 0
    assert model.blocks[3].attn1.processor.to_v_ref.weight.grad.abs().sum() > 0
    assert all(p.grad is None for name, p in model.named_parameters() if ".processor." not in name)


def test_attention_backend_survives_install(transformer):
    model = copy.deepcopy(transformer)
    model.set_attention_backend("native")
    install_adapters(model, tiny_adapter_config("full", CFG))
    proc = model.blocks[0].attn1.processor
    assert isinstance(proc, LynxAttnProcessor) and str(proc._attention_backend.value) == "native"
    uninstall_adapters(model)
    assert not isinstance(model.blocks[0].attn1.processor, LynxAttnProcessor)


def test_wrong_depth_is_refused(transformer):
    with pytest.raises(InputError, match="2 blocks"):
        install_adapters(copy.deepcopy(transformer), tiny_adapter_config("full", CFG.with_(num_layers=2)))


@pytest.mark.parametrize("variant,registers", [("full", 2), ("lite", 0)])
def test_adapter_weights_are_parameters_of_the_transformer(transformer, variant, registers):
    """Every per-block adapter weight is reached from the transformer: .to(), offloading, FSDP see it."""
    model, config = adapted(transformer, variant, num_registers=registers)
    names = [n for n, _ in model.named_parameters() if ".processor." in n]
    per_ip = 4 if variant == "full" else 2
    per_ref = 4 if config.use_ref else 0
    assert len(names) == len(config.ip_blocks) * (per_ip + (1 if registers else 0)) + CFG.num_layers * per_ref
    assert "blocks.2.attn2.processor.to_k_ip.weight" in names
    assert ("blocks.1.attn1.processor.to_v_ref.bias" in names) == config.use_ref
    model.to(torch.float64)
    assert model.blocks[2].attn2.processor.to_k_ip.weight.dtype == torch.float64


def test_plain_state_dict_is_diffusers_own(transformer):
    model, _ = adapted(transformer, "full", num_registers=1)
    with lynx_adapters.plain_state_dict(model):
        assert model.state_dict().keys() == transformer.state_dict().keys()
    assert any(".processor." in k for k in model.state_dict())
    assert adapter_config(model) is not None


@pytest.mark.parametrize("variant,registers", [("full", 2), ("lite", 0)])
def test_official_keys_round_trip(transformer, variant, registers):
    model, config = adapted(transformer, variant, num_registers=registers)
    files = lynx_adapters.official_state_dicts(model)
    assert sorted(files) == sorted(["ip_layers.safetensors"] + (["ref_layers.safetensors"] if config.use_ref else []))
    assert "1.to_k_ip.weight" in files["ip_layers.safetensors"]  # lite: index 1 is block 2
    back = {}
    for name, sd in files.items():
        back.update(lynx_adapters.model_keys(config, name, sd))
    state = model.state_dict()
    assert back.keys() == {k for k in state if ".processor." in k}
    assert all(torch.equal(back[k], state[k]) for k in back)
