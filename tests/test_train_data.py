"""Training data: manifest parsing, sizing rules, `prepare` (skips with reasons, resume without redoing), packing."""

import json
import os

import numpy as np
import pytest
import torch

from lynx.constants import REFERENCE_PROMPT
from lynx.errors import InputError
from lynx.training import data as D
from lynx.training.config import training_config_from_dict
from lynx.training.objective import pad_text
from lynx.training.synthetic import make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def config(ds, cache, base, **data):
    values = {"manifest": str(ds.manifest), "cache_dir": str(cache), "buckets": [[64, 64], [48, 80]],
              "frames": [5], "cache_dtype": "fp32", "dtype": "fp32", "device": "cpu", **data}
    return training_config_from_dict({"data": values, "train": {"base": str(base)},
                                      "validation": {"prompts": ["a person dancing in rain"]}})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synthetic"), identities=2, images_per_identity=2,
                        videos_per_identity=1, video_frames=13)


@pytest.fixture(scope="module")
def encoders(tiny_base):
    return D.Encoders(tiny_base, "cpu", "fp32")


@pytest.fixture(scope="module")
def video_cache(dataset, encoders, tiny_base, tmp_path_factory):
    cfg = config(dataset, tmp_path_factory.mktemp("cache"), tiny_base)
    report = D.prepare(cfg, identity_fn=dataset.identity_fn, encoders=encoders, progress=False)
    return cfg, report


# ----- manifest -------------------------------------------------------------------------------------------------
def test_manifest_jsonl_and_csv(tmp_path):
    (tmp_path / "m.jsonl").write_text(
        '{"path": "a.png", "caption": "x", "id": "one"}\nnot json\n{"path": "b.png"}\n\n'
        '{"path": "c.mp4", "caption": "y", "reference": "r.jpg"}\n{"path": "d.png", "caption": "z", "id": "one"}\n')
    entries, skipped = D.read_manifest(tmp_path / "m.jsonl")
    assert [e.key for e in entries][0] == "one" and len(entries) == 2
    assert entries[1].reference == tmp_path / "r.jpg" and entries[1].path == tmp_path / "c.mp4"
    assert sorted(s["reason"] for s in skipped) == ["bad_entry", "bad_entry", "duplicate"]
    (tmp_path / "m.csv").write_text("path,caption\na.png,hello world\n,missing\n")
    entries, skipped = D.read_manifest(tmp_path / "m.csv")
    assert [e.caption for e in entries] == ["hello world"] and skipped[0]["reason"] == "bad_entry"
    (tmp_path / "bad.csv").write_text("file,text\na,b\n")
    with pytest.raises(InputError, match="header"):
        D.read_manifest(tmp_path / "bad.csv")
    with pytest.raises(InputError, match="does not exist"):
        D.read_manifest(tmp_path / "none.jsonl")


def test_manifest_values_of_the_wrong_type_are_skipped_naming_the_field(tmp_path):
    rows = [{"path": 5, "caption": "x"}, {"path": ["a.png"], "caption": "x"}, {"path": None, "caption": "x"},
            {"path": "a.png", "caption": {"text": "x"}}, {"path": "a.png", "caption": "x", "reference": 3},
            {"path": "a.png", "caption": "x", "id": [1]}, 7, None, {"path": "b.png", "caption": "y", "id": 2}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    entries, skipped = D.read_manifest(tmp_path / "m.jsonl")
    assert [(e.key, e.path) for e in entries] == [("2", tmp_path / "b.png")]
    assert [s["detail"] for s in skipped] == [
        "line 1: path is 5, not text", 'line 2: path is ["a.png"], not text', "line 3: no path",
        'line 4: caption is {"text": "x"}, not text', "line 5: reference is 3, not text", "line 6: id is [1], not text",
        "line 7: not a JSON object", "line 8: not a JSON object"]
    assert {s["reason"] for s in skipped} == {"bad_entry"}


def test_manifest_encoding(tmp_path):
    # A spreadsheet's CSV starts with a byte-order mark; its header must still read as 'path'.
    (tmp_path / "m.csv").write_bytes("path,caption\na.png,caf\u00e9 au lait\n".encode("utf-8-sig"))
    entries, skipped = D.read_manifest(tmp_path / "m.csv")
    assert [e.caption for e in entries] == ["caf\u00e9 au lait"] and not skipped
    (tmp_path / "m.jsonl").write_bytes('{"path": "a.png", "caption": "x"}\n'.encode("utf-8-sig"))
    assert len(D.read_manifest(tmp_path / "m.jsonl")[0]) == 1
    for name, text in (("latin1.csv", "path,caption\na.png,caf\u00e9\n"),
                       ("latin1.jsonl", '{"path": "a.png", "caption": "caf\u00e9"}\n')):
        (tmp_path / name).write_bytes(text.encode("latin-1"))
        with pytest.raises(InputError, match=f"{name} is not UTF-8 text .*save it as UTF-8"):
            D.read_manifest(tmp_path / name)


# ----- sizing -------------------------------------------------------------------------------------------------------
def test_bucket_clip_and_reference_choice():
    buckets = [(480, 832), (832, 480), (624, 624)]
    assert D.choose_bucket(1080, 1920, buckets) == (480, 832)
    assert D.choose_bucket(1920, 1080, buckets) == (832, 480)
    assert D.choose_bucket(500, 520, buckets) == (624, 624)
    assert D.choose_clip_length(100, (81, 49, 1)) == 81
    assert D.choose_clip_length(60, (81, 49)) == 49
    assert D.choose_clip_length(10, (81, 49)) is None
    # Outside the clip where possible, so the model cannot copy the reference's pixels.
    assert D.choose_reference_frame(1, 0, 1) == (0, True)
    assert D.choose_reference_frame(81, 0, 81) == (40, True)
    index, inside = D.choose_reference_frame(120, 0, 81)
    assert not inside and 81 <= index < 120


def test_fit_to_bucket_covers_crops_and_refuses_upscaling():
    frames = np.zeros((2, 100, 200, 3), np.uint8)
    frames[:, :, :100] = 255
    out = D.fit_to_bucket(frames, (48, 80), 1.0)
    assert out.shape == (2, 48, 80, 3)
    assert out[0, :, 0].mean() > 200 and out[0, :, -1].mean() < 50  # centre crop keeps both halves
    with pytest.raises(D.SkipSample, match="enlargement") as e:
        D.fit_to_bucket(frames[:, :20, :30], (48, 80), 1.0)
    assert e.value.reason == "too_small"
    assert D.fit_to_bucket(frames[:, :40, :70], (48, 80), 1.5).shape == (2, 48, 80, 3)


# ----- prepare ------------------------------------------------------------------------------------------------------
def test_prepare_skips_bad_samples_with_reasons(video_cache, dataset):
    cfg, report = video_cache
    cache = D.Path(cfg.data.cache_dir)
    skipped = [json.loads(x) for x in (cache / D.SKIPPED_FILE).read_text().splitlines()]
    by_reason = {s["reason"]: s for s in skipped}
    # frames = [5]: one-frame images are "too short" in a video stage; the 2-frame video too.
    # (No face and too small are met in the image stage, test_prepare_resumes_...)
    assert set(by_reason) == {"unreadable", "too_short", "bad_entry"}
    assert by_reason["unreadable"]["key"] == "broken"
    assert {s["key"] for s in skipped if s["reason"] == "too_short"} >= {"short", "id0-img0", "dark"}
    assert all(s["detail"] for s in skipped)
    assert report.prepared == 2 and report.total == 2  # the two 13-frame videos
    assert "skipped" in report.summary()


def test_prepared_sample_contents(video_cache, encoders, dataset):
    cfg, _ = video_cache
    index = D.read_index(cfg.data.cache_dir)
    assert index.keys == ["id0-vid0", "id1-vid0"]
    sample = D.load_sample(cfg.data.cache_dir, "id1-vid0")
    # 5 frames -> 2 latent frames; 64x64 -> 8x8.
    assert tuple(sample["latent_mean"].shape) == (16, 2, 8, 8) == tuple(index.records[1]["latent_shape"])
    assert sample["latent_std"].min() > 0
    assert torch.allclose(sample["embedding"], torch.from_numpy(dataset.embeddings[1]))
    assert sample["reference_crop"].shape == (256, 256, 3) and sample["reference_crop"].dtype == torch.uint8
    assert tuple(sample["reference_mean"].shape) == (16, 1, 32, 32)
    meta = D._metadata(D.Path(cfg.data.cache_dir) / "samples" / "id1-vid0.safetensors")
    assert meta["reference_frame"] >= 5 and not meta["reference_from_target"]  # a frame after the clip
    # The trimmed caption, padded back, is exactly what the pipeline's text encoding gives.
    full = encoders.pipe._get_t5_prompt_embeds(["a person looking at the camera"], max_sequence_length=512,
                                               device="cpu", dtype=torch.float32)[0]
    assert torch.equal(pad_text(sample["text"]), full)
    shared = D.load_shared(cfg.data.cache_dir, cfg)
    assert torch.equal(pad_text(shared["reference_text"]), encoders.pipe._get_t5_prompt_embeds(
        [REFERENCE_PROMPT], max_sequence_length=512, device="cpu", dtype=torch.float32)[0])
    assert "a person dancing in rain" in shared["prompt_lookup"]


def test_prepare_resumes_without_redoing_finished_samples(dataset, encoders, tiny_base, tmp_path):
    cfg = config(dataset, tmp_path / "cache", tiny_base, frames=[1, 5])
    first = D.prepare(cfg, identity_fn=dataset.identity_fn, encoders=encoders, limit=3, progress=False)
    assert first.prepared == 3  # as if stopped after three samples
    files = sorted((tmp_path / "cache" / "samples").glob("*.safetensors"))
    stamps = {f.name: os.stat(f).st_mtime_ns for f in files}
    calls = []

    def counting(frame):
        calls.append(1)
        return dataset.identity_fn(frame)

    second = D.prepare(cfg, identity_fn=counting, encoders=encoders, progress=False)
    assert second.already == 3 and second.prepared == 4  # 4 images + 2 videos + the 2-frame video as one frame
    assert {f.name: os.stat(f).st_mtime_ns for f in files} == stamps
    assert len(calls) == 4 + 1  # four new samples and the faceless one (too small is known before face analysis)
    third = D.prepare(cfg, identity_fn=counting, encoders=encoders, progress=False)
    assert third.prepared == 0 and third.total == 7 and len(calls) == 5
    assert third.skipped == {"unreadable": 1, "no_face": 1, "too_small": 1, "bad_entry": 1}
    assert len(D.read_index(tmp_path / "cache").records) == 7
    # Changing how samples are sized would mix incompatible samples: refused, with the fix.
    with pytest.raises(InputError, match="other settings"):
        D.prepare(config(dataset, tmp_path / "cache", tiny_base, frames=[1]), identity_fn=counting,
                  encoders=encoders, progress=False)


def test_reading_a_cache_that_is_not_there(tmp_path):
    with pytest.raises(InputError, match="lynx prepare"):
        D.read_index(tmp_path)


# ----- packing ------------------------------------------------------------------------------------------------------
def test_packs_respect_the_budget_and_cover_every_sample_once():
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 300, 200).tolist()
    packs = D.plan_packs(tokens, 600, seed=1, epoch=0)
    assert sorted(i for p in packs for i in p) == list(range(200))
    assert all(sum(tokens[i] for i in p) <= 600 for p in packs)
    fill = sum(tokens) / (600 * len(packs))
    assert fill > 0.9  # first fit over a few open packs leaves little room unused
    assert packs == D.plan_packs(tokens, 600, seed=1, epoch=0)
    assert packs != D.plan_packs(tokens, 600, seed=1, epoch=1)


def test_pack_stream_runs_over_epochs_and_leaves_out_oversized_samples():
    tokens = [100] * 10 + [5000]
    stream = D.PackStream(tokens, 300, seed=0)
    assert stream.excluded == [10]
    epoch0 = [stream[g] for g in range(4)]  # 10 samples of 100 in packs of 300 -> 4 packs
    assert sorted(i for p in epoch0 for i in p) == list(range(10))
    assert stream.locate(4) == (1, 0)
    assert sorted(i for g in range(4, 8) for i in stream[g]) == list(range(10))
    with pytest.raises(InputError, match="token_budget"):
        D.PackStream([5000, 6000], 300, seed=0)


# ----- long high-resolution videos ------------------------------------------------------------------------------
def _write_long_1080p(path, frames: int, fps: int = 30):
    """An H.264 1080p clip of alternating checkerboards, encoded fast (two pictures, converted once)."""
    import av

    h, w = 1080, 1920
    yy, xx = np.mgrid[:h, :w]
    pictures = []
    for k in range(2):
        f = np.empty((h, w, 3), np.uint8)
        f[...] = (180, 120, 90)
        f[(yy // 60 + xx // 60 + k) % 2 == 0] = 200
        pictures.append(av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p"))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "30"}
        for i in range(frames):
            picture = pictures[i % 2]
            picture.pts = None
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    return h * w * 3


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_prepare_decodes_only_the_frames_it_keeps(tiny_base, tmp_path):
    """A 15 s 1080p30 clip: decoding it whole would take 2.6 GiB; prepare keeps 81 frames at bucket size and one
    full-size reference frame, decoded one at a time, so its peak memory stays far below even 81 full frames."""
    from lynx.training.synthetic import pixel_encoders

    frame_bytes = _write_long_1080p(tmp_path / "long.mp4", frames=450)
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "long.mp4", "caption": "a person", "id": "long"}) + "\n")
    cfg = training_config_from_dict({
        "data": {"manifest": str(tmp_path / "m.jsonl"), "cache_dir": str(tmp_path / "cache"), "buckets": [[240, 432]],
                 "frames": [81], "cache_dtype": "fp32", "dtype": "fp32", "device": "cpu"},
        "train": {"base": str(tiny_base)}, "validation": {"prompts": []}})
    encoders = pixel_encoders(tiny_base)
    seen = []

    def identity(frame):
        seen.append(frame.shape)
        return np.full(512, 512 ** -0.5, np.float32), np.full((256, 256, 3), 128, np.uint8)

    D.prepare(cfg, identity_fn=identity, encoders=encoders, progress=False)  # shared tensors, warm code paths
    (tmp_path / "cache" / "samples" / "long.safetensors").unlink()

    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    report = D.prepare(cfg, identity_fn=identity, encoders=encoders, progress=False)
    peak = status("VmHWM:") - before
    clip = 81 * 240 * 432 * 3
    whole = 450 * frame_bytes
    print(f"prepare of a 450-frame 1080p clip: peak {peak / 2**20:.0f} MiB; the whole clip decoded would be "
          f"{whole / 2**30:.2f} GiB, its 81 kept frames at full size {81 * frame_bytes / 2**20:.0f} MiB")
    assert report.prepared == 1
    sample = D.load_sample(tmp_path / "cache", "long")
    assert tuple(sample["latent_mean"].shape) == (16, 21, 30, 54)  # 81 frames of 240x432
    meta = D._metadata(tmp_path / "cache" / "samples" / "long.safetensors")
    assert meta["reference_frame"] >= 81 and seen[-1] == (1080, 1920, 3)  # a full-size frame after the clip
    # What prepare holds: the clip at bucket size, as uint8 and as float32 for the encoder, and a few frames of
    # the decoder at full size; nothing grows with the clip's length.
    budget = clip * (1 + 4 + 4) + 16 * frame_bytes
    assert peak < budget < 81 * frame_bytes
