"""The training objective: flow matching, condition dropout, and packing that changes nothing but speed."""

import copy

import numpy as np
import pytest
import torch

from lynx.models.adapters import Conditioning, adapter_parameters, conditioning, zero_init_
from lynx.testing import WAN_SCHEDULER_CONFIG, TinyModelConfig, add_tiny_adapters, tiny_components
from lynx.training.objective import (
    LynxTrainModel,
    PackedAttention,
    PackedLynxAttnProcessor,
    default_shift,
    flow_matching_loss,
    make_step_inputs,
    noisy_latents,
    pad_text,
    shifted_sigmas,
)

CFG = TinyModelConfig()
# Mixed sizes and lengths in one pack: an image (1 frame, 8x12 latent), a 5-frame clip, a small image.
SHAPES = [(16, 1, 8, 12), (16, 2, 8, 8), (16, 1, 4, 4)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_transformer():
    return tiny_components(CFG)["transformer"].requires_grad_(False)


def train_model(base_transformer, variant="full", zero=False, registers=0, attention="split", checkpointing=True):
    transformer = copy.deepcopy(base_transformer)
    resampler = add_tiny_adapters(transformer, variant, CFG, num_registers=registers,
                                  processor_class=PackedLynxAttnProcessor)
    if zero:
        zero_init_(transformer)
    for q in adapter_parameters(transformer):
        q.requires_grad_(True)
    return LynxTrainModel(transformer, resampler.train().requires_grad_(True), attention, checkpointing)


def adapter_grads(model):
    return {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad}


def pack(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    n = len(shapes)
    text = torch.randn(n, 512, CFG.text_dim, generator=g)
    for i, length in enumerate((5, 9, 3)[:n]):
        text[i, length:] = 0  # encoder output past the prompt is zero
    return dict(noisy=[torch.randn(s, generator=g) for s in shapes],
                targets=[torch.randn(s, generator=g) for s in shapes],
                timesteps=torch.tensor([120.0, 540.0, 910.0][:n]), text=text,
                embeddings=torch.randn(n, 512, generator=g), reference=torch.randn(n, 16, 1, 8, 8, generator=g),
                reference_text=torch.randn(1, 512, CFG.text_dim, generator=g))


def packed_loss_and_grads(model, p, normaliser):
    model.zero_grad()
    preds = model(p["noisy"], p["timesteps"], p["text"], p["embeddings"], p["reference"], p["reference_text"])
    loss = flow_matching_loss(preds, p["targets"], normaliser)
    loss.backward()
    return preds, loss.detach(), adapter_grads(model)


def one_by_one(model, p, normaliser):
    """The same samples through diffusers' own forward, one at a time, as the pipeline runs the model."""
    transformer = model.transformer
    model.zero_grad()
    preds, total = [], 0.0
    for i in range(len(p["noisy"])):
        features = model.reference_features(p["reference"][i:i + 1], p["reference_text"]) \
            if model.adapter_config.use_ref else None
        tokens = model.resampler(p["embeddings"][i:i + 1, None])
        with conditioning(transformer, Conditioning(tokens, features, cache_kv=False)):
            pred = transformer(hidden_states=p["noisy"][i][None], timestep=p["timesteps"][i:i + 1],
                               encoder_hidden_states=p["text"][i:i + 1], return_dict=False)[0][0]
        loss = flow_matching_loss([pred], [p["targets"][i]], normaliser)
        loss.backward()
        preds.append(pred.detach())
        total += float(loss.detach())
    return preds, total, adapter_grads(model)


def assert_grads_close(a, b, rtol=2e-4):
    assert a.keys() == b.keys()
    for name in a:
        scale = a[name].abs().max().item()
        assert scale > 0, f"{name} got no gradient"
        assert (a[name] - b[name]).abs().max().item() <= rtol * scale + 1e-7, name


# ----- flow matching ------------------------------------------------------------------------------------------------
def test_flow_matching_path_and_the_base_shift():
    u = torch.linspace(0, 0.999, 50)
    assert torch.equal(shifted_sigmas(u, 1.0), u)
    s = shifted_sigmas(u, 3.0)
    assert torch.all(s[1:] > s[:-1]) and torch.all(s >= u)  # shift > 1 spends more steps at high noise
    assert shifted_sigmas(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    x0, noise = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.equal(noisy_latents(x0, noise, 0.0)[0], x0)
    assert torch.equal(noisy_latents(x0, noise, 1.0)[0], noise)
    x_t, target = noisy_latents(x0, noise, 0.3)
    assert torch.allclose(x_t, 0.7 * x0 + 0.3 * noise) and torch.equal(target, noise - x0)
    assert default_shift(WAN_SCHEDULER_CONFIG) == 3.0


def test_condition_dropout_is_per_branch_and_reproducible():
    g = torch.Generator().manual_seed(0)
    sample = {"latent_mean": torch.randn(16, 1, 4, 4, generator=g), "latent_std": torch.full((16, 1, 4, 4), 0.1),
              "text": torch.randn(6, CFG.text_dim, generator=g), "embedding": torch.randn(512, generator=g),
              "reference_mean": torch.randn(16, 1, 8, 8, generator=g), "reference_std": torch.zeros(16, 1, 8, 8)}
    shared = {"null_text": torch.randn(2, CFG.text_dim, generator=g), "reference_text": torch.randn(3, CFG.text_dim),
              "null_reference_mean": torch.randn(16, 1, 8, 8, generator=g),
              "null_reference_std": torch.zeros(16, 1, 8, 8)}
    args = (3.0, None, 1000, "cpu", torch.float32)

    def inputs(index, drop):
        return make_step_inputs([sample], shared, index, 7, args[0], drop, *args[2:])

    kept = inputs(0, (0.0, 0.0, 0.0))
    assert torch.equal(kept.text[0], pad_text(sample["text"])) and torch.equal(kept.embeddings[0], sample["embedding"])
    assert torch.equal(kept.reference[0], sample["reference_mean"])
    dropped = inputs(0, (1.0, 1.0, 1.0))
    assert torch.equal(dropped.text[0], pad_text(shared["null_text"]))
    assert not dropped.embeddings.any()  # the 'no identity' tokens are the resampler's output for zeros
    assert torch.equal(dropped.reference[0], shared["null_reference_mean"])
    assert not dropped.kept.any() and kept.kept.all()
    # Same pack, same draws (independent of rank or restart); another pack, other draws.
    again = inputs(0, (0.0, 0.0, 0.0))
    assert torch.equal(again.noisy[0], kept.noisy[0]) and torch.equal(again.timesteps, kept.timesteps)
    assert not torch.equal(inputs(1, (0.0, 0.0, 0.0)).noisy[0], kept.noisy[0])
    rates = torch.stack([inputs(i, (0.3, 0.5, 0.2)).kept[0] for i in range(400)]).float().mean(0)
    assert torch.allclose(1 - rates, torch.tensor([0.3, 0.5, 0.2]), atol=0.07)
    sigmas = torch.stack([inputs(i, (0, 0, 0)).timesteps[0] for i in range(400)]) / 1000
    assert 0 <= sigmas.min() and sigmas.max() < 1 and sigmas.median() > 0.6  # shifted towards noise (shift 3)


# ----- packing ------------------------------------------------------------------------------------------------------
def test_zero_initialised_adapters_start_from_the_base_model(base_transformer):
    model = train_model(base_transformer, zero=True)
    p = pack()
    with torch.no_grad():
        preds = model(p["noisy"], p["timesteps"], p["text"], p["embeddings"], p["reference"], p["reference_text"])
        for i, pred in enumerate(preds):
            plain = base_transformer(hidden_states=p["noisy"][i][None], timestep=p["timesteps"][i:i + 1],
                                     encoder_hidden_states=p["text"][i:i + 1], return_dict=False)[0][0]
            assert pred.shape == p["noisy"][i].shape
            assert torch.allclose(pred, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant,registers,mode", [("full", 0, "split"), ("full", 2, "mask"), ("lite", 0, "split")])
def test_packed_step_equals_the_samples_one_by_one(base_transformer, variant, registers, mode):
    model = train_model(base_transformer, variant, registers=registers, attention=mode)
    p = pack(seed=3)
    if variant == "lite":
        p["reference"] = None
    normaliser = float(sum(t.numel() for t in p["targets"]))
    preds, loss, grads = packed_loss_and_grads(model, p, normaliser)
    preds_1, loss_1, grads_1 = one_by_one(model, p, normaliser)
    for a, b in zip(preds, preds_1):
        assert torch.allclose(a.detach(), b, atol=2e-5, rtol=1e-5)
    assert float(loss) == pytest.approx(loss_1, rel=1e-5)
    assert_grads_close(grads, grads_1)


def test_samples_in_a_pack_do_not_see_each_other(base_transformer):
    model = train_model(base_transformer)
    p = pack(seed=4)
    with torch.no_grad():
        before = model(p["noisy"], p["timesteps"], p["text"], p["embeddings"], p["reference"], p["reference_text"])
        q = dict(p, noisy=[p["noisy"][0], p["noisy"][1] * 3, p["noisy"][2]])
        q["embeddings"] = p["embeddings"].clone()
        q["embeddings"][1] = 0
        q["reference"] = p["reference"].clone()
        q["reference"][1] = 0
        after = model(q["noisy"], q["timesteps"], q["text"], q["embeddings"], q["reference"], q["reference_text"])
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert not torch.allclose(before[1], after[1])


def test_checkpointing_changes_memory_not_gradients(base_transformer):
    p = pack(seed=5)
    normaliser = float(sum(t.numel() for t in p["targets"]))
    with_ckpt = packed_loss_and_grads(train_model(base_transformer, checkpointing=True), p, normaliser)[2]
    without = packed_loss_and_grads(train_model(base_transformer, checkpointing=False), p, normaliser)[2]
    assert_grads_close(with_ckpt, without, rtol=1e-6)


def test_only_the_adapters_train(base_transformer):
    model = train_model(base_transformer)
    trainable = {id(q) for q in model.trainable_parameters()}
    assert trainable == {id(q) for q in [*model.resampler.parameters(), *adapter_parameters(model.transformer)]}
    assert not any(q.requires_grad for q in model.transformer.parameters() if id(q) not in trainable)
    p = pack()
    packed_loss_and_grads(model, p, 1.0)
    assert all(q.grad is None for q in model.transformer.parameters() if id(q) not in trainable)


def test_reference_features_are_the_pipelines(tiny_base, adapter_dirs, reference_crop):
    from lynx.pipelines.pipeline_lynx import LynxPipeline

    pipe = LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["full"])
    ref_text = pipe.encode_text(["image of a face"])
    expected = [pipe.reference_features(img, torch.Generator().manual_seed(43), ref_text)
                for img in (reference_crop, None)]
    latents = []
    for img in (reference_crop, np.full((256, 256, 3), 127.5)):
        pixels = torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None, :, None] / 127.5 - 1
        dist = pipe.vae.encode(pixels).latent_dist
        latents.append(pipe._normalize_latents(dist.sample(generator=torch.Generator().manual_seed(43))))
    model = LynxTrainModel(pipe.transformer, pipe.resampler)
    got = model.reference_features(torch.cat(latents), ref_text)
    for block, feats in enumerate(got):
        for i in range(2):
            assert torch.allclose(feats[i], expected[i][block][0], atol=1e-5), (block, i)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen attention runs on CUDA only")
def test_varlen_attention_matches_split():
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [37, 100, 5]
    q = torch.randn(1, sum(lengths), 4, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn_like(q)
    text = torch.randn(3, 20, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g)

    def attend(q_, k_, v_, mask=None):
        return torch.nn.functional.scaled_dot_product_attention(
            q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), attn_mask=mask).transpose(1, 2).flatten(2)

    for kind, key in (("self", k), ("text", text)):
        a = PackedAttention(lengths, "varlen")(q, key, key, kind, attend)
        b = PackedAttention(lengths, "split")(q, key, key, kind, attend)
        assert torch.allclose(a.float(), b.float(), atol=2e-2)
