"""From a real photo to a video: face analysis wired into the pipeline and the CLI (random ArcFace weights)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lynx import LynxPipeline, face
from lynx.errors import NoFaceError


def test_image_argument_equals_precomputed_identity(tiny_base, adapter_dirs, face_models, photos):
    pipe = LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["full"])
    small = dict(height=32, width=32, num_frames=5, num_inference_steps=2, output_type="latent", seed=2)
    opts = {"models_dir": face_models, "detector": "dlib"}
    from_photo = pipe("a woman smiling", image=photos / "astronaut.jpg", face_options=opts, **small).frames
    ident = face.analyze(photos / "astronaut.jpg", **opts)
    assert ident.reference_crop.shape == (256, 256, 3) and abs(np.linalg.norm(ident.embedding) - 1) < 1e-5
    given = pipe("a woman smiling", face_embedding=ident.embedding, reference_image=ident.reference_crop,
                 **small).frames
    assert torch.equal(from_photo, given)
    # A FaceAnalyzer built once and passed in gives the same video.
    analyzer = face.FaceAnalyzer("dlib", models_dir=face_models)
    assert torch.equal(from_photo, pipe("a woman smiling", image=photos / "astronaut.jpg", face_analyzer=analyzer,
                                        **small).frames)
    with pytest.raises(NoFaceError, match="cat.jpg"):
        pipe("a cat", image=photos / "cat.jpg", face_options=opts, **small)


def test_cli_generate_from_photo(tiny_base, adapter_dirs, face_models, photos, tmp_path):
    out = tmp_path / "astronaut.gif"
    r = subprocess.run([sys.executable, "-m", "lynx", "generate", "--image", str(photos / "astronaut.jpg"),
                        "--prompt", "a woman smiling", "--base", str(tiny_base), "--adapter", str(adapter_dirs["full"]),
                        "--face-models", str(face_models), "--detector", "dlib", "--out", str(out),
                        "--height", "32", "--width", "32", "--frames", "5", "--steps", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert im.n_frames == 5


def test_cli_face_with_and_without_arcface_weights(face_models, photos, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "lynx", "face", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    r = run(photos / "astronaut.jpg", "--face-models", face_models, "--out-dir", tmp_path / "a", "--detector", "dlib")
    assert r.returncode == 0, r.stderr
    assert "faces found: 1" in r.stdout
    ident = face.FaceIdentity.load(tmp_path / "a" / "astronaut.identity")
    assert ident.embedding.shape == (512,) and ident.reference_crop.shape == (256, 256, 3)
    # No ArcFace file: the face check still runs and writes the crops, and says what to download.
    r = run(photos / "astronaut.jpg", "--face-models", tmp_path / "empty", "--out-dir", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    assert "faces found: 1" in r.stdout and "recognition_arcface_ir_se50.pth" in r.stdout
    assert (tmp_path / "b" / "astronaut-reference256.png").is_file()
    assert not (tmp_path / "b" / "astronaut.identity").exists()
    r = run(photos / "cat.jpg", "--face-models", face_models, "--out-dir", tmp_path / "c")
    assert r.returncode == 2 and "cat.jpg" in r.stderr and "Traceback" not in r.stderr


def test_pipeline_identity_is_the_face_identity_kept_as_given(tiny_base, adapter_dirs, face_embedding,
                                                               reference_crop):
    pipe = LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["full"])
    emb = (2.5 * np.asarray(face_embedding)).astype(np.float32)  # not unit length: used exactly as given
    ident = pipe.prepare_identity(face_embedding=emb, reference_image=reference_crop)
    assert isinstance(ident, face.FaceIdentity) and ident.detector == "precomputed"
    np.testing.assert_array_equal(ident.embedding, emb)
    np.testing.assert_array_equal(ident.reference_crop, reference_crop)
    np.testing.assert_array_equal(pipe.prepare_identity(face_embedding=torch.from_numpy(emb),
                                                        need_reference=False).embedding, emb)
    # A FaceIdentity goes through unchanged; reference_image= replaces its crop.
    other = np.zeros_like(reference_crop)
    swapped = pipe.prepare_identity(identity=ident, reference_image=other)
    np.testing.assert_array_equal(swapped.embedding, emb)
    np.testing.assert_array_equal(swapped.reference_crop, other)
    assert not hasattr(__import__("lynx"), "Identity")


@pytest.fixture(scope="module")
def group_photo() -> Path:
    """insightface's t1.jpg: six people (the wheel ships it; found without importing insightface)."""
    spec = importlib.util.find_spec("insightface")
    assert spec is not None, "insightface (a test dependency) is not installed; its sample photos are needed"
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / "t1.jpg"


def test_cli_generate_reports_and_records_the_face_used(tiny_base, adapter_dirs, face_models, group_photo, tmp_path):
    def run(*extra):
        return subprocess.run([sys.executable, "-m", "lynx", "generate", "--image", str(group_photo),
                               "--prompt", "people talking", "--base", str(tiny_base),
                               "--adapter", str(adapter_dirs["full"]), "--face-models", str(face_models),
                               "--detector", "dlib", "--height", "32", "--width", "32", "--frames", "5",
                               "--steps", "1", *map(str, extra)], capture_output=True, text=True, timeout=300)

    # No choice made: the largest face, with a warning that names the flag.
    r = run("--out", tmp_path / "largest.gif")
    assert r.returncode == 0, r.stderr
    assert "lynx generate: warning: " in r.stderr and "6 faces found; using face 0 of 6 (the largest)" in r.stderr
    assert "pass --face-index N (0 = the largest ... 5 = the smallest)" in r.stderr and "face_index=" not in r.stderr
    (record,) = json.loads((tmp_path / "largest.gif.json").read_text())["identity"]["faces"]
    assert record["face_index"] == 0 and record["num_faces"] == 6 and record["source"] == str(group_photo)
    x1, y1, x2, y2 = record["box"]
    assert record["size"] == round(max(x2 - x1, y2 - y1), 1) > 40
    # A face chosen: no warning, the choice reported and recorded.
    r = run("--face-index", 3, "--out", tmp_path / "fourth.gif")
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr and "t1.jpg: face 3 of 6, box x " in r.stderr
    (chosen,) = json.loads((tmp_path / "fourth.gif.json").read_text())["identity"]["faces"]
    assert chosen["face_index"] == 3 and chosen["box"] != record["box"] and chosen["size"] <= record["size"]
    # Refused before the model loads, in one line, nothing written.
    for bad, message in ((7, "face index 7 is out of range: " + str(group_photo) + " has 6 face(s); valid: 0 "
                              "(the largest) to 5 (the smallest)"),
                         (-1, "--face-index -1 must be 0 or more (0 = the largest face)")):
        r = run("--face-index", bad, "--out", tmp_path / "bad.gif")
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not any(line.startswith("loading ") for line in r.stderr.splitlines())
        assert not (tmp_path / "bad.gif").exists() and not (tmp_path / "bad.gif.json").exists()


def test_cli_face_index_on_a_group_photo(face_models, group_photo, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "lynx", "face", str(group_photo), "--no-save",  # noqa: E731
                                     "--face-models", str(face_models), "--detector", "dlib", *map(str, a)],
                                    capture_output=True, text=True, timeout=300)
    r = run("--face-index", 2)
    assert r.returncode == 0, r.stderr
    assert "faces found: 6; using face 2 (0 is the largest)" in r.stdout and "using the largest" not in r.stdout
    assert "warning" not in r.stderr
    r = run("--face-index", -1)
    assert r.returncode == 2 and "--face-index must be 0 or more" in r.stderr
    # Without the ArcFace file the face check still reports the face it would use.
    r = run("--face-models", tmp_path / "empty")
    assert r.returncode == 0, r.stderr
    assert "faces found: 6; using face 0 (the largest)" in r.stdout and "--face-index N" in r.stderr
