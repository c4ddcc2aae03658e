"""Long videos: context windows over latent frames on the tiny model (coverage, blending parity, one
window's memory, identity shared by every window), the seam measurement and `lynx eval`'s drift over time."""

import json

import numpy as np
import pytest
import torch
from conftest import SMALL
from eval_media import insightface_images, moving_video
from PIL import Image
from skimage import data as skdata

from lynx import LynxPipeline
from lynx.errors import InputError
from lynx.evaluation import FaceEvaluator
from lynx.evaluation.metrics import format_evaluation, seam_report
from lynx.face import load_image
from lynx.io.video import save_video, sidecar_path
from lynx.pipelines.windows import ContextWindows

# 25 frames = 7 latent frames; windows of 9 frames (3 latent) sharing 4 frames (1 latent): 3 windows.
LONG = dict(height=32, width=32, num_frames=25, num_inference_steps=2)
WINDOWS = ContextWindows(frames=9, overlap=4)


@pytest.fixture(scope="module")
def full(tiny_base, adapter_dirs):
    return LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["full"])


def test_windows_cover_the_clip_and_options_are_checked():
    assert WINDOWS.windows(7) == [(0, 3), (2, 5), (4, 7)]
    assert WINDOWS.video_windows(25) == [(0, 9), (5, 17), (13, 25)]
    assert ContextWindows().windows(21) == [(0, 21)]  # 81 frames: one model window, the authors' sampling
    assert ContextWindows().windows(61) == [(0, 21), (17, 38), (34, 55), (40, 61)]  # 241 frames
    w = ContextWindows(frames=17, overlap=8).weights(2, 7, 12)  # 5 latent frames, ramps over 2
    torch.testing.assert_close(w, torch.tensor([1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3]))
    assert torch.equal(ContextWindows(frames=17, overlap=8, blend="uniform").weights(2, 7, 12), torch.ones(5))
    for bad, match in ((dict(frames=10), "4k\\+1"), (dict(overlap=6), "multiple of 4"),
                       (dict(frames=9, overlap=8), "under the window"), (dict(blend="cosine"), "linear, uniform")):
        with pytest.raises(InputError, match=match):
            ContextWindows(**bad)


@pytest.mark.parametrize("blend", ["linear", "uniform"])
def test_three_windows_blend_within_one_windows_memory(full, face_embedding, reference_crop, monkeypatch, blend):
    windows = ContextWindows(frames=13, overlap=8, blend=blend)  # 4 latent frames, 2 shared: ramps differ
    calls, noises, refs = [], [], []
    predict, step, reference = full.predict, full.scheduler.step, full.reference_features
    monkeypatch.setattr(full, "predict", lambda latents, t, text, cond, branch="c": calls.append(
        (latents.shape[2], cond, out := predict(latents, t, text, cond, branch))) or out)
    monkeypatch.setattr(full.scheduler, "step", lambda noise, t, latents, **kw: noises.append(noise) or
                        step(noise, t, latents, **kw))
    monkeypatch.setattr(full, "reference_features", lambda *a, **k: refs.append(1) or reference(*a, **k))
    seen = []
    hook = full.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].shape[2]),
                                                      with_kwargs=True)
    try:
        out = full("a man walks", face_embedding=face_embedding, reference_image=reference_crop, guidance_scale=1.0,
                   context_windows=windows, output_type="latent", **{**LONG, "num_frames": 37}).frames
    finally:
        hook.remove()
    assert out.shape[2] == 10 and windows.windows(10) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert len(refs) == 2 and seen[:2] == [1, 1]  # one reference pass (+ the empty one) for the whole video
    assert max(seen[2:]) == 4 and len(seen[2:]) == 2 * 4  # never more than one window's latent frames
    assert len({id(cond) for _, cond, _ in calls}) == 1  # the same identity tokens and features for every window
    # Step 0's noise is the windows' predictions blended with the window weights.
    total, num = torch.zeros_like(noises[0], dtype=torch.float32), torch.zeros(10)
    for (start, end), (_, _, pred) in zip(windows.windows(10), calls[:4]):
        w = windows.weights(start, end, 10)
        total[:, :, start:end] += pred * w.view(1, 1, -1, 1, 1)
        num[start:end] += w
    torch.testing.assert_close(noises[0], total / num.view(1, 1, -1, 1, 1), rtol=1e-6, atol=1e-6)
    if blend == "uniform":
        torch.testing.assert_close(noises[0][:, :, 2:4], (calls[0][2][:, :, 2:4] + calls[1][2][:, :, 0:2]) / 2)


def test_a_clip_within_the_window_is_sampled_as_before(full, face_embedding, reference_crop):
    kw = dict(face_embedding=face_embedding, reference_image=reference_crop, seed=2, output_type="latent", **SMALL)
    plain = full("a man walks", **kw).frames
    assert torch.equal(plain, full("a man walks", context_windows={"frames": 5, "overlap": 0}, **kw).frames)


def test_seam_report_finds_a_cut_at_a_window_edge():
    t = np.linspace(0, 1, 25)[:, None, None, None]
    smooth = np.broadcast_to(t, (25, 8, 8, 3)).copy()
    windows = [(0, 9), (5, 17), (13, 25)]
    assert seam_report(smooth, windows)["ratio"] == pytest.approx(1.0)
    cut = smooth.copy()
    cut[13:] += 0.3  # window 3 starts elsewhere: a jump between frames 12 and 13
    report = seam_report(cut, windows)
    step = 1 / 24  # the change between neighbouring frames of the smooth clip
    assert report["seams"] == [4, 8, 12, 16]
    assert report["ratio"] == pytest.approx((4 * step + 0.3) / 4 / step, rel=1e-5)  # one of four edges jumps


def test_long_clip_from_the_cli_seams_measured_by_lynx_eval(tiny_base, adapter_dirs, face_embedding, reference_crop,
                                                           tmp_path, photos):
    from test_cli import lynx

    np.save(tmp_path / "emb.npy", face_embedding)
    Image.fromarray(reference_crop).save(tmp_path / "crop.png")
    out = tmp_path / "long.mp4"
    r = lynx("generate", "--embedding", tmp_path / "emb.npy", "--reference", tmp_path / "crop.png", "--prompt",
             "a man walks", "--base", tiny_base, "--adapter", adapter_dirs["full"], "--height", "32", "--width", "32",
             "--frames", "25", "--steps", "2", "--context-frames", "9", "--context-overlap", "4", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "long video: 3 context windows of 9 frames, overlap 4, linear blending" in r.stderr
    record = json.loads(sidecar_path(out).read_text())
    assert record["num_frames"] == 25 and record["context_windows"] == [[0, 9], [5, 17], [13, 25]]
    scores = tmp_path / "scores.json"
    r = lynx("eval", out, "--reference", photos / "astronaut.jpg", "--recognizers", "dlib", "--detector", "dlib",
             "--json", scores)
    assert r.returncode == 0, r.stderr
    seams = json.loads(scores.read_text())["seams"]
    assert "window seams: change" in r.stdout and seams["seams"] == [4, 8, 12, 16]
    # Random tiny weights make frame-noise videos: no seam stands out (measured ratio about 1.1).
    assert 0.5 < seams["ratio"] < 2.0
    r = lynx("generate", "--embedding", tmp_path / "emb.npy", "--prompt", "a man walks", "--base", tiny_base,
             "--adapter", adapter_dirs["full"], "--frames", "25", "--context-overlap", "6", "--out", tmp_path / "x.mp4")
    assert r.returncode == 2 and "multiple of 4" in r.stderr


def test_lynx_eval_reports_identity_drift_window_by_window(tmp_path):
    from lynx.apps.cli import main

    astronaut = skdata.astronaut()[30:270, 110:340]
    hanks = load_image(insightface_images() / "Tom_Hanks_54745.png")
    frames = np.concatenate([moving_video(astronaut, n=13), moving_video(hanks, n=12)])  # the person changes
    video = save_video(frames, tmp_path / "long.mp4", fps=8)
    Image.fromarray(astronaut).save(tmp_path / "astronaut.png")
    from lynx.pipelines.record import make_record, write_record
    from lynx.pipelines.settings import GenerationSettings

    settings = GenerationSettings(num_frames=25, context_frames=9, context_overlap=4, fps=8).resolve("full")
    write_record(video, make_record(video, "a person", settings, variant="full", base=tmp_path, adapter=tmp_path,
                                    dtype="fp32", device="cpu", source="python", safety={"checked": False},
                                    context_windows=[[0, 9], [5, 17], [13, 25]]))
    ev = FaceEvaluator(["dlib"], detector="dlib")
    result = ev.evaluate(video, [str(tmp_path / "astronaut.png")], windows=[[0, 9], [5, 17], [13, 25]])
    first, middle, last = result.recognizers["dlib"]["segments"]
    assert first > 0.95 and last < first - 0.05 and last < middle < first  # dlib: other people score ~0.87
    assert "last - first -" in format_evaluation(result)
    assert main(["eval", str(video), "--reference", str(tmp_path / "astronaut.png"), "--recognizers", "dlib",
                 "--detector", "dlib", "--json", str(tmp_path / "s.json")]) == 0
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["segments"] == [[0, 9], [5, 17], [13, 25]]
    assert saved["recognizers"]["dlib"]["segments"] == pytest.approx([first, middle, last], abs=1e-6)
