"""The training loop on a tiny model and synthetic data: it learns identity, its checkpoints load in the
pipeline, it fine-tunes released adapters, and a failed save loses nothing."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lynx.errors import CheckpointError, InputError, LynxError
from lynx.models.adapters import adapter_config
from lynx.models.loading import load_adapters
from lynx.testing import adapter_files, load_tiny_adapters
from lynx.training import checkpoint as ckpt
from lynx.training.config import training_config_from_dict
from lynx.training.data import load_sample, load_shared, prepare, read_index
from lynx.training.objective import LynxTrainModel, PackedLynxAttnProcessor, evaluation_loss
from lynx.training.synthetic import make_dataset, pixel_encoders
from lynx.training.trainer import load_transformer, read_metrics, train

RESAMPLER = {"dim": 32, "depth": 1, "heads": 2, "dim_head": 16, "num_queries": 4}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(data: dict, base, out, validation=None, **train_values):
    values = {"base": str(base), "output_dir": str(out), "steps": 4, "learning_rate": 3e-3, "warmup_steps": 5,
              "token_budget": 128, "precision": "fp32", "num_workers": 0, "save_every": 1000,
              "resampler": RESAMPLER, **train_values}
    return training_config_from_dict({"data": data, "train": values,
                                      "validation": validation or {"every": 0}})


@pytest.fixture(scope="module")
def identity_data(tiny_base, tmp_path_factory):
    """4 people x 4 photos whose content is their identity, cached with a colour-keeping 'VAE' (see synthetic)."""
    root = tmp_path_factory.mktemp("identity")
    ds = make_dataset(root / "data", identities=4, images_per_identity=4, bad_samples=False)
    data = {"manifest": str(ds.manifest), "cache_dir": str(root / "cache"), "buckets": [[64, 64]], "frames": [1],
            "cache_dtype": "fp32", "dtype": "fp32", "device": "cpu"}
    prepare(make_config(data, tiny_base, root / "unused"), identity_fn=ds.identity_fn,
            encoders=pixel_encoders(tiny_base), progress=False)
    return data


def identity_measure(config, adapter_dir, base):
    """Denoising loss of every training photo at fixed noise: with its own identity, with another person's
    identity, and with the ID branch switched off. Following identity = on < wrong and on < off."""
    index = read_index(config.data.cache_dir)
    samples = [load_sample(config.data.cache_dir, k) for k in index.keys]
    shared = load_shared(config.data.cache_dir, config)
    transformer = load_transformer(Path(base), torch.float32)
    model = LynxTrainModel(transformer, load_adapters(transformer, adapter_dir, PackedLynxAttnProcessor),
                           gradient_checkpointing=False)
    kw = dict(seed=1234, shift=3.0, repeats=4)
    emb = torch.stack([s["embedding"] for s in samples])
    return {"on": evaluation_loss(model, samples, shared, **kw),
            "off": evaluation_loss(model, samples, shared, ip_scale=0.0, **kw),
            "wrong": evaluation_loss(model, samples, shared, embeddings=emb.roll(4, 0), **kw)}


def test_tiny_model_learns_to_follow_identity(identity_data, tiny_base, tmp_path):
    # Reference dropped always: the identity reaches the model only through the ID-adapter.
    config = make_config(identity_data, tiny_base, tmp_path / "run", steps=150, drop_reference=1.0,
                         drop_text=0.0, drop_identity=0.1, gradient_checkpointing=False, save_every=150,
                         validation={"every": 150, "height": 32, "width": 32, "num_frames": 1,
                                     "num_inference_steps": 2, "format": ".gif"})
    result = train(config, progress=False)
    losses = np.array(result.losses)
    assert len(losses) == 150 and np.isfinite(losses).all()
    assert losses[-20:].mean() < 0.85 * losses[:20].mean()  # the loss falls
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 151))
    assert rows[-1]["tokens_per_s"] > 0 and rows[0]["lr"] == pytest.approx(3e-3 / 5)  # warm-up
    assert [p.name for p in result.samples] == ["step-00000150-0.gif"] and result.samples[0].stat().st_size > 0
    from lynx.io.provenance import read_mark

    mark = read_mark(result.samples[0])  # samples are generated videos too: marked (docs/safety.md)
    assert (mark["generator"], mark["adapter"], mark["model"]) == ("Lynx", "training-step-150", tiny_base.name)

    # Before training the ID branch is exactly off (zero-initialised values); after, it carries the person.
    ckpt.write_adapters(tmp_path / "init", *_fresh_adapters(config, tiny_base))
    before = identity_measure(config, tmp_path / "init", tiny_base)
    assert before["on"] == before["off"] == before["wrong"]
    after = identity_measure(config, result.final_dir, tiny_base)
    print("identity measure (loss): before", before, "after", after)
    assert after["on"] < 0.9 * after["off"]
    assert after["on"] < 0.9 * after["wrong"]  # it is this person's identity that helps, not any identity


def _fresh_adapters(config, base):
    from lynx.training.trainer import build_adapters

    transformer = load_transformer(Path(base), torch.float32)
    model = LynxTrainModel(transformer, build_adapters(config, transformer, None))
    return model, ckpt.full_adapter_state(model)


def test_checkpoints_load_in_the_pipeline(identity_data, tiny_base, tmp_path, face_embedding, reference_crop):
    from lynx.pipelines.pipeline_lynx import LynxPipeline

    config = make_config(identity_data, tiny_base, tmp_path / "run", steps=3, save_every=2, keep_last=5)
    result = train(config, progress=False)
    step2 = ckpt.checkpoint_dir(tmp_path / "run", 2)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == \
        ["latest", "step-00000002", "step-00000003"]
    assert result.checkpoint.name == "step-00000003"
    for directory in (step2, result.final_dir):
        assert {p.name for p in directory.glob("*.safetensors")} == \
            {"resampler.safetensors", "ip_layers.safetensors", "ref_layers.safetensors"}
        pipe = LynxPipeline.from_pretrained(tiny_base, adapter=directory)
        assert pipe.variant == "full"
        video = pipe("a person", face_embedding=face_embedding, reference_image=reference_crop, height=32,
                     width=32, num_frames=1, num_inference_steps=2).frames[0]
        assert video.shape == (1, 32, 32, 3) and np.isfinite(video).all()
    trained = adapter_files(result.final_dir)
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "to_v_ip" in k)  # moved off zero


@pytest.mark.parametrize("variant", ["full", "lite"])
def test_fine_tuning_starts_from_the_released_adapters(identity_data, tiny_base, adapter_dirs, tmp_path, variant):
    released = adapter_files(adapter_dirs[variant])
    unchanged = train(make_config(identity_data, tiny_base, tmp_path / "lr0", steps=1, learning_rate=0.0,
                                  init=str(adapter_dirs[variant])), progress=False)
    got = adapter_files(unchanged.final_dir)
    assert got.keys() == released.keys() and all(torch.equal(got[k], released[k]) for k in got)
    tuned = train(make_config(identity_data, tiny_base, tmp_path / "tuned", steps=2, learning_rate=1e-3,
                              init=str(adapter_dirs[variant])), progress=False)
    transformer, _ = load_tiny_adapters(tuned.final_dir)
    assert adapter_config(transformer).variant == variant
    assert (tuned.final_dir / "ref_layers.safetensors").exists() == (variant == "full")
    assert any(not torch.equal(v, released[k]) for k, v in adapter_files(tuned.final_dir).items())


def test_a_failed_save_keeps_the_last_checkpoint_and_resume_is_exact(identity_data, tiny_base, tmp_path,
                                                                        monkeypatch):
    reference = train(make_config(identity_data, tiny_base, tmp_path / "ref", steps=6, save_every=2),
                      progress=False)
    out = tmp_path / "run"
    config = make_config(identity_data, tiny_base, out, steps=6, save_every=2)
    real, calls = ckpt.write_adapters, []

    def dies_on_second_save(directory, *args):
        calls.append(directory)
        if len(calls) == 2:
            real(directory, *args)  # the files are half there when the process dies
            raise RuntimeError("killed during save")
        return real(directory, *args)

    monkeypatch.setattr(ckpt, "write_adapters", dies_on_second_save)
    with pytest.raises(RuntimeError, match="killed during save"):
        train(config, progress=False)
    monkeypatch.setattr(ckpt, "write_adapters", real)
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000002"
    assert (root / ".step-00000004.tmp").is_dir() and not (root / "step-00000004").exists()
    load_tiny_adapters(root / "step-00000002")  # the last good checkpoint is intact
    resumed = train(config, resume=True, progress=False)
    assert resumed.losses == reference.losses[2:]  # bit for bit
    assert [r["loss"] for r in read_metrics(out)] == reference.losses
    assert not (root / ".step-00000004.tmp").exists()
    a, b = (adapter_files(d) for d in (reference.final_dir, resumed.final_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((root / "step-00000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["packs_consumed"] == 6
    with pytest.raises(InputError, match="nothing to do"):
        train(config, resume=True, progress=False)


@pytest.mark.parametrize("damage,named", [
    (lambda c: shutil.rmtree(c / "optimizer"), "optimizer"),
    (lambda c: (c / "optimizer" / ".metadata").write_bytes((c / "optimizer" / ".metadata").read_bytes()[:100]),
     "optimizer"),
    (lambda c: (c / "rng" / "rank0.pt").write_bytes(b"not a torch file"), "rank0.pt"),
    (lambda c: (c / "ref_layers.safetensors").unlink(), "ref_layers.safetensors"),
], ids=["no optimizer", "truncated optimizer metadata", "damaged rng", "no ref layers"])
def test_resume_names_a_missing_or_damaged_checkpoint_part(identity_data, tiny_base, tmp_path, damage, named):
    config = make_config(identity_data, tiny_base, tmp_path / "run", steps=1)
    train(config, progress=False)
    damage(ckpt.checkpoint_dir(tmp_path / "run", 1))
    # DCP raises CheckpointException, a BaseException: it must still become the one-line error.
    with pytest.raises(CheckpointError, match=f"{named}.*earlier checkpoint") as e:
        train(make_config(identity_data, tiny_base, tmp_path / "run", steps=2), resume=True, progress=False)
    assert "\n" not in str(e.value)


def test_clear_errors(identity_data, tiny_base, tmp_path):
    with pytest.raises(InputError, match="train.precision"):
        train(make_config(identity_data, tiny_base, tmp_path, precision="fp8"), progress=False)
    with pytest.raises(InputError, match="lynx prepare"):
        train(make_config(dict(identity_data, cache_dir=str(tmp_path / "none")), tiny_base, tmp_path),
              progress=False)
    with pytest.raises(LynxError, match="not found"):
        train(make_config(identity_data, tmp_path / "nobase", tmp_path), progress=False)
    with pytest.raises(InputError, match="valid in \\[train\\]"):
        training_config_from_dict({"train": {"learnig_rate": 1}})
    with pytest.raises(InputError, match="validation prompt"):
        train(make_config(identity_data, tiny_base, tmp_path, validation={"every": 1, "prompts": ["not encoded"],
                                                                          "height": 32, "width": 32}),
              progress=False)
    with pytest.raises(InputError, match="--resume"):
        train(make_config(identity_data, tiny_base, tmp_path), resume=str(tmp_path / "nothing"), progress=False)


def test_a_nan_step_is_skipped_without_touching_the_weights(identity_data, tiny_base, tmp_path):
    from lynx.training.data import PackDataset
    from lynx.training.model import setup_runtime, teardown_runtime
    from lynx.training.trainer import Trainer

    def state(trainer):
        weights = ckpt.full_adapter_state(trainer.model)
        moments = {(i, k): v.full_tensor().clone() if hasattr(v, "full_tensor") else v.clone()
                   for i, s in enumerate(trainer.optimizer.state.values()) for k, v in s.items()}
        return weights, moments

    def same(a, b):
        return a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and \
            a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])

    runtime = setup_runtime()
    try:
        trainer = Trainer(make_config(identity_data, tiny_base, tmp_path / "run", steps=3), runtime, progress=False)
        packs = PackDataset(trainer.index, trainer.stream)
        first = trainer.train_step(0, [packs[0]])
        assert not first.skipped and first.grad_norm > 0
        before = state(trainer)
        g, samples = packs[1]
        poisoned = [dict(s) for s in samples]
        poisoned[0]["latent_mean"] = poisoned[0]["latent_mean"].clone()
        poisoned[0]["latent_mean"][0, 0, 0, 0] = float("nan")  # one element of one sample
        bad = trainer.train_step(1, [(g, poisoned)])
        assert bad.skipped and not torch.isfinite(bad.loss)
        assert same(state(trainer), before)  # weights and AdamW's moments and step counts untouched
        assert all(p.grad is None for p in trainer.params)  # and nothing carried into the next step
        after = trainer.train_step(2, [packs[2]])
        assert not after.skipped and not same(state(trainer), before)
    finally:
        teardown_runtime(runtime)


def test_non_finite_steps_are_logged_and_too_many_stop_the_run(identity_data, tiny_base, tmp_path, monkeypatch):
    from lynx.training import trainer as T

    real = T.make_step_inputs

    def nan_in_pack(bad_packs):
        def make(samples, shared, pack_index, *args, **kwargs):
            inputs = real(samples, shared, pack_index, *args, **kwargs)
            if pack_index in bad_packs:
                inputs.targets[0] = inputs.targets[0] * float("nan")
            return inputs
        return make

    monkeypatch.setattr(T, "make_step_inputs", nan_in_pack({1}))
    result = train(make_config(identity_data, tiny_base, tmp_path / "one", steps=4), progress=False)
    assert result.skipped_steps == [2]
    rows = read_metrics(tmp_path / "one")
    assert [r["skipped"] for r in rows] == [0, 1, 0, 0] and np.isnan(rows[1]["loss"])
    assert np.isfinite([r["loss"] for i, r in enumerate(rows) if i != 1]).all()

    monkeypatch.setattr(T, "make_step_inputs", nan_in_pack({1, 2}))
    with pytest.raises(LynxError, match="2 steps in a row up to step 3.*max_bad_steps = 1"):
        train(make_config(identity_data, tiny_base, tmp_path / "two", steps=4, max_bad_steps=1), progress=False)
