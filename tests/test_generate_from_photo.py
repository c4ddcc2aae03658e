"""From a real photo to a video: face analysis wired into the pipeline and the CLI (random ArcFace weights)."""

import subprocess
import sys

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
