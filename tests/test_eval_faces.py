"""Identity scoring on real photos that ship in packages (scikit-image's astronaut and cat, insightface's
six-person t1.jpg and Tom Hanks): a "video" of one face photo, shifted and scaled frame by frame, must
score near 1 against that photo and clearly lower against other people; covered frames must lower the
face-found share; recognisers without weights must be skipped with a message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from eval_media import insightface_images, moving_video
from PIL import Image
from skimage import data as skdata

from lynx.errors import WeightsNotFoundError
from lynx.evaluation import FaceEvaluator, load_recognizers, summarize
from lynx.evaluation.metrics import format_evaluation, sample_indices
from lynx.evaluation.recognizers import FacexlibRecognizer, InsightfaceRecognizer
from lynx.face import align_arcface, create_detector, load_image
from lynx.io.video import read_video, save_video


@pytest.fixture(scope="module")
def evaluator():
    return FaceEvaluator(["dlib"], detector="dlib")


@pytest.fixture(scope="module")
def astronaut():
    return skdata.astronaut()[30:270, 110:340]  # head and shoulders, face about 90 px


@pytest.fixture(scope="module")
def t1_people():
    """The six people of t1.jpg, each cut out with a margin, left to right."""
    t1 = load_image(insightface_images() / "t1.jpg")
    faces = create_detector("dlib").detect(t1)
    assert len(faces) == 6
    crops = []
    for f in sorted(faces, key=lambda f: f.box[0]):
        x1, y1, x2, y2 = f.box.astype(int)
        m = (x2 - x1) // 2
        crops.append(t1[max(0, y1 - m):y2 + m, max(0, x1 - m):x2 + m])
    return crops


@pytest.fixture(scope="module")
def hanks():
    return load_image(insightface_images() / "Tom_Hanks_54745.png")


def test_same_face_scores_near_one_and_other_people_clearly_lower(evaluator, astronaut, t1_people, hanks):
    frames = evaluator.embed_frames(moving_video(astronaut))
    assert all(frames.face_found)
    own = evaluator.score(frames, evaluator.reference(astronaut))
    s = own.recognizers["dlib"]
    assert own.face_found_share == 1.0 and s["frames_scored"] == 8
    assert s["mean"] > 0.95 and s["min"] > 0.9
    others = [evaluator.score(frames, evaluator.reference(p)).recognizers["dlib"]["mean"] for p in t1_people + [hanks]]
    assert max(others) < s["mean"] - 0.05, (s["mean"], others)


@pytest.mark.parametrize("who", [0, 3])
def test_picks_out_the_right_person_among_several(evaluator, t1_people, who):
    frames = evaluator.embed_frames(moving_video(t1_people[who], n=6))
    assert all(frames.face_found)
    means = [evaluator.score(frames, evaluator.reference(p)).recognizers["dlib"]["mean"] for p in t1_people]
    order = np.argsort(means)[::-1]
    assert order[0] == who, means
    assert means[who] > 0.95
    assert means[who] - means[order[1]] > 0.05, means


def test_covered_frames_lower_the_face_found_share(evaluator, astronaut):
    video = moving_video(astronaut)
    covered = [2, 5, 6]
    det = create_detector("dlib")
    for k in covered:
        x1, y1, x2, y2 = det.detect(video[k])[0].box.astype(int)
        video[k, max(0, y1 - 10):y2 + 10, max(0, x1 - 10):x2 + 10] = 90  # a grey card over the face
    ref = evaluator.reference(astronaut)
    result = evaluator.evaluate(video, ref)
    assert result.face_found == [k not in covered for k in range(8)]
    assert result.face_found_share == pytest.approx(5 / 8)
    sims = result.recognizers["dlib"]["similarities"]
    assert [s is None for s in sims] == [k in covered for k in range(8)]
    # Frames without a face are left out of the mean, never counted as zero.
    assert result.recognizers["dlib"]["mean"] > 0.95
    assert result.recognizers["dlib"]["frames_scored"] == 5


def test_no_face_at_all_measures_no_similarity(evaluator, astronaut):
    cat = skdata.chelsea()
    result = evaluator.evaluate(np.stack([cat] * 3), evaluator.reference(astronaut))
    assert result.face_found == [False] * 3 and result.face_found_share == 0.0
    s = result.recognizers["dlib"]
    assert s["mean"] is None and s["min"] is None and s["drift"] is None and s["similarities"] == [None] * 3
    assert "no similarity was measured" in format_evaluation(result)


def test_summary_mean_min_and_drift():
    idx = list(range(0, 11))
    sims = [1.0 - 0.05 * i for i in idx]
    sims[4] = None  # a frame without a face
    out = summarize(sims, idx, num_frames=11)
    vals = [v for v in sims if v is not None]
    assert out["mean"] == pytest.approx(np.mean(vals)) and out["min"] == pytest.approx(0.5)
    assert out["drift"] == pytest.approx(-0.5)  # lost 0.5 similarity from first to last frame
    assert out["frames_scored"] == 10
    assert summarize([0.8], [0], 1)["drift"] is None
    assert sample_indices(10, every=3) == [0, 3, 6, 9]
    assert sample_indices(81, every=1, max_frames=5) == [0, 20, 40, 60, 80]


def test_video_files_every_kth_frame_and_cli(tmp_path, evaluator, astronaut, capsys):
    from lynx.apps.cli import main

    frames = moving_video(astronaut, n=6)
    mp4 = save_video(frames, tmp_path / "a.mp4", fps=8)
    webp = save_video(frames, tmp_path / "a.webp", fps=8)
    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(photo)
    decoded, fps = read_video(webp)
    assert decoded.shape == frames.shape and fps == pytest.approx(8, rel=0.05)
    r = evaluator.evaluate(mp4, [str(photo)], every=2)
    assert r.frame_indices == [0, 2, 4] and r.num_frames == 6 and r.fps == pytest.approx(8)
    assert r.recognizers["dlib"]["mean"] > 0.95

    # No --reference: the photos named in the sidecar are used.
    import torch

    from lynx.io.safety import unchecked
    from lynx.pipelines.record import make_record, write_record
    from lynx.pipelines.settings import GenerationSettings

    write_record(webp, make_record(webp, "a woman", GenerationSettings(fps=8).resolve("full"), variant="full",
                                   base="base", adapter="adapter", dtype=torch.float32, device="cpu",
                                   source="python", safety=unchecked("switched off"), photos=[photo]))
    out = tmp_path / "scores.json"
    assert main(["eval", str(mp4), str(webp), "--reference", str(photo), "--recognizers", "dlib",
                 "--detector", "dlib", "--every", "3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "a.mp4: 2 of 6 frames scored" in text and "mean over 2 videos" in text
    saved = json.loads(out.read_text())
    assert [s["recognizers"]["dlib"]["frames_scored"] for s in saved] == [2, 2]
    assert main(["eval", str(webp), "--recognizers", "dlib", "--detector", "dlib", "--max-frames", "2"]) == 0
    assert "a.webp: 2 of 6 frames scored" in capsys.readouterr().out


@pytest.mark.parametrize("args,words", [
    (["--reference", "{tmp}/missing.png"], "--reference: image file not found"),
    (["--reference", "{tmp}/not-an-image.png"], "--reference: {tmp}/not-an-image.png is not an image file"),
    (["--reference", "{tmp}"], "--reference: expected an image file, got a directory"),
    (["--reference", "{tmp}/p.png", "--every", "0"], "--every 0"),
    (["--reference", "{tmp}/p.png", "--max-frames", "0"], "--max-frames 0"),
    (["--reference", "{tmp}/p.png", "--max-frames", "-3"], "--max-frames -3"),
    (["--reference", "{tmp}/p.png", "--segment-frames", "-1"], "--segment-frames -1"),
], ids=["missing reference", "reference not an image", "reference a folder", "every 0", "max-frames 0",
        "negative max-frames", "negative segment-frames"])
def test_eval_refuses_bad_arguments_before_the_recognisers_load(tmp_path, monkeypatch, capsys, args, words):
    from lynx.apps.cli import main
    from lynx.evaluation import metrics

    monkeypatch.setattr(metrics, "FaceEvaluator", lambda *a, **k: pytest.fail("the recognisers were loaded"))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "p.png")
    (tmp_path / "not-an-image.png").write_text("text")
    save_video(np.zeros((2, 32, 32, 3), np.uint8), tmp_path / "v.mp4", fps=8)
    assert main(["eval", str(tmp_path / "v.mp4"), *(a.replace("{tmp}", str(tmp_path)) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lynx eval: error: " + words.replace("{tmp}", str(tmp_path))), err
    assert len(err.strip().splitlines()) == 1


def test_recognisers_without_weights_are_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.insightface/models either
    empty = tmp_path / "models"
    empty.mkdir()
    told = {}
    loaded, skipped = load_recognizers(models_dir=empty, on_skip=lambda n, m: told.setdefault(n, m))
    assert [r.name for r in loaded] == ["dlib"]
    assert set(skipped) == set(told) == {"facexlib", "insightface"}
    assert "recognition_arcface_ir_se50.pth" in told["facexlib"] and str(empty) in told["facexlib"]
    assert "w600k_r50.onnx" in told["insightface"]
    # Asked for by name, a missing recogniser is an error, not a skip.
    with pytest.raises(WeightsNotFoundError, match="recognition_arcface_ir_se50.pth"):
        load_recognizers(["facexlib"], models_dir=empty)

    from lynx.apps.cli import main

    photo = tmp_path / "p.png"
    Image.fromarray(skdata.astronaut()).save(photo)
    save_video(np.stack([skdata.astronaut()] * 2), tmp_path / "v.mp4", fps=8)
    assert main(["eval", str(tmp_path / "v.mp4"), "--reference", str(photo), "--face-models", str(empty),
                 "--recognizers", "insightface"]) == 2
    err = capsys.readouterr().err
    assert "lynx eval: error:" in err and "w600k_r50.onnx" in err and "Traceback" not in err
    assert main(["eval", str(tmp_path / "v.mp4"), "--reference", str(photo), "--face-models", str(empty),
                 "--detector", "dlib"]) == 0
    captured = capsys.readouterr()
    assert "skipping the facexlib recogniser" in captured.err and "skipping the insightface recogniser" in captured.err
    assert "dlib" in captured.out


def test_facexlib_column_runs_arcface_on_the_aligned_crop(astronaut):
    import torch

    from lynx.face import ArcFaceIRSE50, embed

    torch.manual_seed(0)
    model = ArcFaceIRSE50()  # random weights: checks the plumbing, not the numbers
    rec = FacexlibRecognizer(model=model)
    face = create_detector("dlib").detect(astronaut)[0]
    e = rec.embed(astronaut, [face])  # one forward pass of IR-SE50 costs seconds on CPU: keep them few
    assert e.shape == (1, 512) and np.linalg.norm(e[0]) == pytest.approx(1, abs=1e-5)
    want = embed(model, align_arcface(astronaut, face.keypoints))
    assert np.allclose(e[0], want / np.linalg.norm(want), atol=1e-5)
    ev = FaceEvaluator([rec], detector="dlib")
    assert ev.names == ["facexlib"] and not ev.skipped


def _tiny_recognition_onnx(path: Path, mxnet_style: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A small ONNX network with the input/output contract of insightface's recognition models."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(0)
    conv = rng.randn(8, 3, 8, 8).astype(np.float32) * 0.05
    fc = rng.randn(8 * 14 * 14, 32).astype(np.float32) * 0.05
    nodes, inits, src = [], [numpy_helper.from_array(conv, "conv_w"), numpy_helper.from_array(fc, "fc_w")], "data"
    if mxnet_style:  # MXNet exports normalise inside the graph; insightface then feeds raw pixels
        inits += [numpy_helper.from_array(np.array(127.5, np.float32), "m"),
                  numpy_helper.from_array(np.array(1 / 127.5, np.float32), "s")]
        nodes += [helper.make_node("Sub", ["data", "m"], ["sub"], name="Sub_0"),
                  helper.make_node("Mul", ["sub", "s"], ["mul"], name="Mul_1")]
        src = "mul"
    nodes += [helper.make_node("Conv", [src, "conv_w"], ["c"], strides=[8, 8], name="conv"),
              helper.make_node("Flatten", ["c"], ["f"], axis=1, name="flat"),
              helper.make_node("MatMul", ["f", "fc_w"], ["fc1"], name="fc")]
    graph = helper.make_graph(nodes, "rec", [helper.make_tensor_value_info("data", TensorProto.FLOAT,
                                                                           ["N", 3, 112, 112])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return conv, fc


def _numpy_forward(x: np.ndarray, conv: np.ndarray, fc: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    patches = x.reshape(n, 3, 14, 8, 14, 8).transpose(0, 2, 4, 1, 3, 5).reshape(n, 14, 14, -1)
    c = patches @ conv.reshape(8, -1).T  # (n, 14, 14, 8)
    return c.transpose(0, 3, 1, 2).reshape(n, -1) @ fc


@pytest.mark.parametrize("mxnet_style", [False, True])
def test_insightface_column_feeds_the_pack_model_as_insightface_does(tmp_path, monkeypatch, astronaut, mxnet_style):
    monkeypatch.setenv("HOME", str(tmp_path))
    conv, fc = _tiny_recognition_onnx(tmp_path / "models" / "buffalo_l" / "w600k_r50.onnx", mxnet_style)
    (rec,), skipped = load_recognizers(["insightface"], models_dir=tmp_path / "models")
    assert isinstance(rec, InsightfaceRecognizer) and not skipped
    face = create_detector("dlib").detect(astronaut)[0]
    got = rec.embed(astronaut, [face])[0]
    crop = align_arcface(astronaut, face.keypoints).astype(np.float32)  # RGB, as insightface's swapRB gives
    x = (crop if mxnet_style else (crop - 127.5) / 127.5).transpose(2, 0, 1)[None]
    if mxnet_style:
        x = (x - 127.5) / 127.5  # what the graph's own Sub/Mul do
    want = _numpy_forward(x, conv, fc)[0]
    assert np.allclose(got, want / np.linalg.norm(want), atol=1e-4)
