"""Tests of lynx.face on real photos that ship in installed packages, checked against hand-read coordinates.

Photos: scikit-image's astronaut (one face) and chelsea (a cat, no human face); insightface's
t1.jpg (six people) and Tom_Hanks_54745.png (a face already aligned to the ArcFace template).
Keypoint coordinates below were read by eye from zoomed crops of these photos.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from skimage import transform as sktransform

import lynx.face as lf
from lynx.errors import CheckpointError, InputError, NoFaceError, WeightsNotFoundError
from lynx.face.alignment import estimate_transform, transform_points
from lynx.face.detection import ScrfdDetector, five_points_from_68, select_face
from lynx.runtime import face_models_dir

# Hand-read from the astronaut photo (x, y): pupils, nose tip, mouth corners; image-left first.
ASTRO_KPS = np.array([[204.0, 101.5], [246.0, 103.0], [224.0, 127.5], [203.0, 140.5], [244.5, 141.5]])
# Face centres in t1.jpg, left to right, and the eyes of the largest face (the man in the middle).
T1_CENTRES = np.array([[120, 335], [318, 220], [512, 360], [783, 418], [935, 135], [1168, 335]], float)
T1_LARGEST_EYES = np.array([[490.6, 318.8], [537.0, 330.6]])


def _insightface_images() -> Path:
    # Located without importing insightface (which pulls in OpenCV); it is a declared dependency.
    spec = importlib.util.find_spec("insightface")
    assert spec is not None, "insightface (a lynx dependency) is not installed; its sample photos are needed"
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "images"


@pytest.fixture(scope="module")
def t1_path() -> Path:
    return _insightface_images() / "t1.jpg"


@pytest.fixture(scope="module")
def hanks_path() -> Path:
    return _insightface_images() / "Tom_Hanks_54745.png"


@pytest.fixture(scope="module")
def dlib_detector():
    return lf.create_detector("dlib")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lf.ArcFaceIRSE50()


@pytest.fixture(scope="module")
def astro():
    return skdata.astronaut()


@pytest.fixture(scope="module")
def astro_identity(astro, dlib_detector, model):
    return lf.analyze(astro, detector=dlib_detector, arcface_weights=model)


# ------------------------------------------------------------------------------------ image loading


def test_load_image_grayscale_palette_and_modes(tmp_path):
    gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (5, 1))
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = lf.load_image(tmp_path / "g.png")
    assert out.shape == (5, 25, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], gray) and np.array_equal(out[..., 1], gray)

    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:, :3] = (200, 10, 30)
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=4).save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert np.array_equal(lf.load_image(tmp_path / "p.png"), rgb)
    bw = lf.load_image(Image.fromarray(gray).convert("1"))
    assert set(np.unique(bw).tolist()) == {0, 255} and np.array_equal(bw[..., 0], bw[..., 2])


def test_load_image_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (100, 50, 0)
    rgba[0, 0, 3] = 255   # opaque
    rgba[0, 1, 3] = 0     # transparent
    rgba[0, 2, 3] = 128   # half
    rgba[1, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = lf.load_image(tmp_path / "a.png")
    assert out[0, 0].tolist() == [100, 50, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    # 100 * 128/255 + 255 * 127/255 = 177.2; 50 -> 152.1; 0 -> 127.0
    assert out[0, 2].tolist() == [177, 152, 127]
    assert np.array_equal(lf.load_image(rgba), out)  # same rule for RGBA arrays


def test_load_image_cmyk_and_16bit(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:4] = (255, 0, 0)
    rgb[4:] = (0, 128, 255)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.tif")
    assert Image.open(tmp_path / "c.tif").mode == "CMYK"
    assert np.abs(lf.load_image(tmp_path / "c.tif").astype(int) - rgb).max() <= 2

    g16 = np.array([[0, 257, 32896, 65535]], np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    # The 16-bit range is scaled (v / 257), not clipped at 255.
    assert lf.load_image(tmp_path / "g16.png")[0, :, 0].tolist() == [0, 1, 128, 255]
    rgb16 = np.full((2, 2, 3), 65535, np.uint16)
    rgb16[0, 0] = (0, 32896, 65535)
    assert lf.load_image(rgb16)[0, 0].tolist() == [0, 128, 255]


def test_load_image_float_and_bad_arrays():
    f = np.zeros((3, 3, 3), np.float32)
    f[0, 0] = (1.0, 0.5, 0.0)
    assert lf.load_image(f)[0, 0].tolist() == [255, 128, 0]
    with pytest.raises(InputError, match="shape"):
        lf.load_image(np.zeros((3, 3, 2), np.uint8))
    with pytest.raises(InputError, match="NaN"):
        lf.load_image(np.full((3, 3, 3), np.nan, np.float32))
    with pytest.raises(InputError, match="int"):
        lf.load_image(5)


def test_load_image_applies_exif_rotation(tmp_path):
    img = np.zeros((40, 80, 3), np.uint8)  # wide; red on the left half, blue on the right
    img[:, :40] = (255, 0, 0)
    img[:, 40:] = (0, 0, 255)
    pil = Image.fromarray(img)
    exif = pil.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    pil.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = lf.load_image(tmp_path / "rot.jpg")
    assert out.shape == (80, 40, 3)  # now tall
    # Turned clockwise, the left (red) half ends up on top.
    assert out[10, 20, 0] > 200 and out[10, 20, 2] < 60
    assert out[70, 20, 2] > 200 and out[70, 20, 0] < 60


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="not found.*missing.jpg"):
        lf.load_image(tmp_path / "missing.jpg")
    with pytest.raises(InputError, match="directory"):
        lf.load_image(tmp_path)
    (tmp_path / "notes.jpg").write_text("this is not a picture")
    with pytest.raises(InputError, match="notes.jpg.*not an image"):
        lf.load_image(tmp_path / "notes.jpg")
    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(InputError, match="cut.jpg.*(corrupt|truncated)"):
        lf.load_image(tmp_path / "cut.jpg")
    with pytest.raises(InputError, match="notes.jpg"):
        lf.analyze(tmp_path / "notes.jpg", detector="dlib", arcface_weights=torch.nn.Linear(1, 1))


# ---------------------------------------------------------------------------------------- detection


def test_astronaut_box_and_keypoints(astro, dlib_detector):
    faces = dlib_detector.detect(astro)
    assert len(faces) == 1
    x1, y1, x2, y2 = faces[0].box
    assert x1 < 203 and x2 > 247 and y1 < 100 and y2 > 142  # the box holds eyes and mouth
    assert 60 < faces[0].size < 130
    assert np.abs(faces[0].keypoints - ASTRO_KPS).max() < 3.0


def test_group_photo_finds_all_six_and_picks_largest(t1_path, dlib_detector, caplog):
    img = lf.load_image(t1_path)
    faces = dlib_detector.detect(img)
    assert len(faces) == 6
    centres = np.array([[(f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2] for f in faces])
    for c in T1_CENTRES:
        assert np.min(np.linalg.norm(centres - c, axis=1)) < 20, c
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True)
    with caplog.at_level(logging.INFO, logger="lynx.face"):
        face = select_face(faces, source="t1.jpg")
    assert "6 faces found in t1.jpg" in caplog.text
    assert np.abs(face.keypoints[:2] - T1_LARGEST_EYES).max() < 4.0
    second = select_face(faces, face_index=1)
    assert second is faces[1] and second.area <= face.area
    with pytest.raises(InputError, match="6 face"):
        select_face(faces, face_index=6)


def test_aligned_face_photo_keypoints_land_on_template(hanks_path, dlib_detector):
    # This photo is itself an ArcFace-aligned 112x112 crop, so its keypoints are the template's.
    faces = dlib_detector.detect(lf.load_image(hanks_path))
    assert len(faces) == 1
    err = np.linalg.norm(faces[0].keypoints - lf.ARCFACE_TEMPLATE, axis=1)
    assert err[:2].max() < 3.0   # eyes
    assert err[3:].max() < 6.0   # mouth corners
    assert err[2] < 10.0         # dlib's nose-tip point sits lower than the template's nose


def test_cnn_detector_on_aligned_face(hanks_path):
    faces = lf.create_detector("dlib-cnn").detect(lf.load_image(hanks_path))
    assert len(faces) == 1 and faces[0].score > 0.5
    assert np.linalg.norm(faces[0].keypoints[:2] - lf.ARCFACE_TEMPLATE[:2], axis=1).max() < 4.0


def test_cat_photo_gives_no_face_error_naming_file(tmp_path, model):
    path = tmp_path / "chelsea.png"
    Image.fromarray(skdata.chelsea()).save(path)
    with pytest.raises(NoFaceError, match="no face found in .*chelsea.png"):
        lf.analyze(path, detector="dlib", arcface_weights=model)


def test_small_faces_give_a_clear_error(astro, dlib_detector, model):
    with pytest.raises(NoFaceError, match=r"only \d+ px wide; at least 100 px"):
        lf.analyze(astro, detector=dlib_detector, arcface_weights=model, min_face_size=100)
    tiny = np.asarray(Image.fromarray(astro).resize((150, 150), Image.BILINEAR))  # face ~26 px
    with pytest.raises(NoFaceError):
        lf.analyze(tiny, detector=dlib_detector, arcface_weights=model)


def test_large_photo_detects_downscaled_and_crops_from_original(astro, dlib_detector, astro_identity, model):
    big = np.full((3000, 4000, 3), 90, np.uint8)
    scaled = np.asarray(Image.fromarray(astro).resize((2048, 2048), Image.BICUBIC))
    big[500:2548, 1000:3048] = scaled
    ident = lf.analyze(big, detector=dlib_detector, arcface_weights=model)
    assert ident.image_size == (4000, 3000)
    # Resizing by 4 maps pixel centre x to 4x + 1.5.
    expected = ASTRO_KPS * 4 + 1.5 + np.array([1000, 500])
    assert np.abs(ident.keypoints - expected).max() < 12.0  # 3 px at the photo's own scale
    # The crop is taken from the full-resolution photo: it matches the small photo's crop.
    diff = np.abs(ident.arcface_crop.astype(int) - astro_identity.arcface_crop.astype(int)).mean()
    assert diff < 12


def test_five_points_from_68_landmarks():
    pts = np.zeros((68, 2))
    pts[36:42] = [[10, 20], [12, 18], [14, 18], [16, 20], [14, 22], [12, 22]]
    pts[42:48] = pts[36:42] + [30, 2]
    pts[30] = [28, 35]
    pts[48] = [15, 45]
    pts[54] = [41, 46]
    out = five_points_from_68(pts)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[13, 20], [43, 22], [28, 35], [15, 45], [41, 46]])


def test_unknown_detector_name():
    with pytest.raises(InputError, match="unknown face detector"):
        lf.create_detector("mtcnn")


# ------------------------------------------------------------------------------------------- SCRFD


def _fake_scrfd_outputs(in_w=640, in_h=640):
    """SCRFD-shaped outputs (strides 8/16/32, 2 anchors) with three known detections."""
    outs = {}
    for stride in (8, 16, 32):
        n = (in_h // stride) * (in_w // stride) * 2
        outs[stride] = [np.zeros((n, 1), np.float32), np.zeros((n, 4), np.float32), np.zeros((n, 10), np.float32)]

    def put(stride, gx, gy, anchor, score, dist, kps):
        idx = (gy * (in_w // stride) + gx) * 2 + anchor
        s, b, k = outs[stride]
        s[idx, 0] = score
        b[idx] = dist
        k[idx] = np.asarray(kps, np.float32).reshape(-1)

    kps = [[-1, -1], [1, -1], [0, 0.5], [-1, 2], [1, 2]]
    put(16, 20, 15, 1, 0.9, [3, 4, 5, 6], kps)               # centre (320, 240)
    put(16, 21, 15, 0, 0.8, [3, 4, 5, 6], kps)               # overlaps the first: removed by NMS
    put(8, 10, 10, 0, 0.7, [2, 2, 2, 2], np.zeros((5, 2)))   # small face at (80, 80)
    put(32, 2, 2, 0, 0.3, [1, 1, 1, 1], np.zeros((5, 2)))    # below the 0.5 threshold
    return [outs[s][0] for s in (8, 16, 32)] + [outs[s][1] for s in (8, 16, 32)] + \
        [outs[s][2] for s in (8, 16, 32)]


def _write_fake_scrfd(path: Path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    outs = _fake_scrfd_outputs()
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    nodes = [helper.make_node("Constant", [], [n], value=numpy_helper.from_array(o, n + "_v"))
             for n, o in zip(names, outs)]
    graph = helper.make_graph(
        nodes, "fake_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(o.shape)) for n, o in zip(names, outs)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def test_scrfd_decoding_with_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "buffalo_l" / "det_10g.onnx"
    _write_fake_scrfd(path)
    det = ScrfdDetector(path)
    assert det.input_size == (640, 640) and det.strides == (8, 16, 32) and det.num_anchors == 2
    # 1280x960 letterboxes to 640x480: network pixels are half the photo's.
    faces = det.detect(np.zeros((960, 1280, 3), np.uint8))
    assert len(faces) == 2
    big, small = faces
    np.testing.assert_allclose(big.box, [544, 352, 800, 672])  # (320-48, 240-64, 320+80, 240+96) * 2
    np.testing.assert_allclose(big.keypoints, [[608, 448], [672, 448], [640, 496], [608, 544], [672, 544]])
    assert big.score == pytest.approx(0.9)
    np.testing.assert_allclose(small.box, [128, 128, 192, 192])
    assert small.score == pytest.approx(0.7)


def test_scrfd_input_blob_matches_insightface_preprocessing():
    img = np.zeros((50, 100, 3), np.uint8)
    img[...] = (255, 0, 128)
    rec = _Recorder()
    ScrfdDetector(session=rec, channels="rgb").detect(img)
    assert rec.blob.shape == (1, 3, 640, 640) and rec.blob.dtype == np.float32
    # RGB order, (x - 127.5) / 128; the photo fills the top 320 rows, zero padding below.
    np.testing.assert_allclose(rec.blob[0, :, 100, 100], [127.5 / 128, -127.5 / 128, 0.5 / 128], atol=1e-6)
    np.testing.assert_allclose(rec.blob[0, :, 500, 100], [-127.5 / 128] * 3, atol=1e-6)
    # The default reproduces the authors' call: the network sees the channels swapped (BGR).
    rec = _Recorder()
    ScrfdDetector(session=rec).detect(img)
    np.testing.assert_allclose(rec.blob[0, :, 100, 100], [0.5 / 128, -127.5 / 128, 127.5 / 128], atol=1e-6)


def test_scrfd_letterbox_is_opencv_bilinear_as_insightface():
    # insightface shrinks with cv2.resize (bilinear, no antialiasing): at exactly half size each network
    # pixel is the mean of a 2x2 block (Pillow's antialiased bilinear would blend a 4x4 neighbourhood).
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (1280, 1280, 3), dtype=np.uint8)
    canvas, scale = ScrfdDetector(session=_Recorder(), channels="rgb")._letterbox(photo)
    assert scale == 0.5 and canvas.shape == (640, 640, 3)
    blocks = photo.reshape(640, 2, 640, 2, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(canvas - blocks).max() <= 0.75  # the mean's quarter fractions, rounded by fixed point


class _Recorder:
    """An onnxruntime session stand-in with SCRFD's 9 outputs (strides 8/16/32) that keeps its input."""

    def __init__(self):
        self.blob = None

    def get_inputs(self):
        return [type("I", (), {"name": "input.1", "shape": [1, 3, "?", "?"]})()]

    def get_outputs(self):
        return [None] * 9

    def run(self, names, feeds):
        self.blob = feeds["input.1"]
        return _fake_scrfd_outputs()


def test_auto_detector_uses_insightface_models_when_present(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    empty = tmp_path / "empty"
    assert lf.create_detector("auto", empty).name == "dlib"
    with pytest.raises(WeightsNotFoundError, match="buffalo_l/det_10g.onnx.*buffalo_l.zip"):
        lf.create_detector("insightface", empty)
    _write_fake_scrfd(tmp_path / "models" / "buffalo_l" / "det_10g.onnx")
    det = lf.create_detector("auto", tmp_path / "models")
    assert isinstance(det, ScrfdDetector) and det.name == "insightface"


def test_real_scrfd_model_if_available(astro):
    path = lf.find_scrfd_model(face_models_dir())
    if path is None or importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("no insightface buffalo_l/det_10g.onnx in the face models dir")
    faces = ScrfdDetector(path).detect(astro)
    assert len(faces) == 1
    assert np.abs(faces[0].keypoints[:2] - ASTRO_KPS[:2]).max() < 4.0


# ------------------------------------------------------------------------------------ choosing a face


def test_several_faces_warn_and_the_chosen_face_is_recorded(t1_path, dlib_detector, model, tmp_path):
    analyzer = lf.FaceAnalyzer(dlib_detector, model)
    faces = sorted(dlib_detector.detect(lf.load_image(t1_path)), key=lambda f: -f.area)
    expected = (r"t1.jpg: 6 faces found; using face 0 of 6 \(the largest\).*"
                r"pass face_index=N \(0 = the largest \.\.\. 5 = the smallest\)")
    with pytest.warns(lf.SeveralFacesWarning, match=expected) as w:
        largest = analyzer.analyze(t1_path)
    assert w[0].filename == __file__  # the caller's line, not one inside lynx
    with pytest.warns(lf.SeveralFacesWarning) as w:
        lf.analyze(t1_path, detector=dlib_detector, arcface_weights=model)
    assert w[0].filename == __file__
    assert largest.face_index == 0 and largest.num_faces == 6
    np.testing.assert_array_equal(largest.box, faces[0].box)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a face chosen on purpose: no warning
        third = analyzer.analyze(t1_path, face_index=2)
    np.testing.assert_array_equal(third.box, faces[2].box)
    (record,) = third.faces_used()
    x1, y1, x2, y2 = (float(v) for v in faces[2].box)
    assert record["face_index"] == 2 and record["num_faces"] == 6 and record["image_size"] == [1280, 886]
    assert record["box"] == [round(v, 1) for v in (x1, y1, x2, y2)]
    assert record["size"] == round(max(x2 - x1, y2 - y1), 1)
    json.dumps(record, allow_nan=False)
    assert "faces found: 6; using face 2 (0 is the largest)" in lf.describe(third)
    back = lf.FaceIdentity.load(third.save(tmp_path / "third.identity"))
    assert back.face_index == 2 and back.faces_used() == third.faces_used()
    for bad in (6, -1):
        with pytest.raises(InputError, match=r"face index -?\d is out of range: .*t1.jpg has 6 face\(s\); "
                                             r"valid: 0 \(the largest\) to 5 \(the smallest\)"):
            analyzer.analyze(t1_path, face_index=bad)
    # Several photos: each photo's face is recorded.
    both = analyzer.analyze([t1_path, t1_path], face_index=1)
    assert [r["face_index"] for r in both.faces_used()] == [1, 1]


def test_detection_runs_on_a_smaller_copy_and_crops_come_from_the_photo(astro, dlib_detector, model):
    analyzer = lf.FaceAnalyzer(dlib_detector, model, detect_max_side=256)
    found = analyzer.find(astro)
    # Detected at half size, mapped back to the photo's pixels.
    assert np.abs(found.face.keypoints - ASTRO_KPS).max() < 4.0
    np.testing.assert_array_equal(found.arcface_crop, lf.align_arcface(astro, found.face.keypoints))
    np.testing.assert_array_equal(found.reference_crop, lf.align_reference(astro, found.face.keypoints))


def test_analyzer_owns_its_models(dlib_detector, model, tmp_path):
    analyzer = lf.FaceAnalyzer(dlib_detector, model)
    assert analyzer.detector is dlib_detector and analyzer.arcface is model
    no_embedding = lf.FaceAnalyzer(dlib_detector, embedding=False, models_dir=tmp_path)
    assert no_embedding.arcface is None
    with pytest.raises(InputError, match="embedding=False"):
        no_embedding.analyze(skdata.astronaut())
    with pytest.raises(WeightsNotFoundError, match="recognition_arcface_ir_se50.pth"):
        lf.FaceAnalyzer(dlib_detector, models_dir=tmp_path)


_LARGE_PHOTO_SCRIPT = """
import logging, resource, sys, warnings
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
warnings.simplefilter("default")
import numpy as np, torch
from PIL import Image
import lynx.face as lf
Image.MAX_IMAGE_PIXELS = 20_000_000  # the 27 MP photo is then past Pillow's warning limit (below its error)
torch.manual_seed(0)
analyzer = lf.FaceAnalyzer("dlib", lf.ArcFaceIRSE50())
analyzer.analyze(sys.argv[1])  # everything allocated once
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ident = analyzer.analyze(sys.argv[2])
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
np.save(sys.argv[3], ident.keypoints)
print("grown", grown)
"""


def test_large_photo_is_detected_small_and_cropped_full_with_bounded_memory(astro, tmp_path):
    w, h = 6000, 4500
    big = np.full((h, w, 3), 90, np.uint8)
    big[1000:3048, 2000:4048] = np.asarray(Image.fromarray(astro).resize((2048, 2048), Image.BICUBIC))
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=92)
    del big
    Image.fromarray(astro).save(tmp_path / "small.png")
    r = subprocess.run([sys.executable, "-c", _LARGE_PHOTO_SCRIPT, str(tmp_path / "small.png"),
                        str(tmp_path / "big.jpg"), str(tmp_path / "kps.npy")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    grown = int(r.stdout.split("grown")[1])
    # Pillow's decoded image (4 bytes a pixel), our RGB array (3), the detection copy (at most 4096 px on the
    # longer side, 3 bytes a pixel), Pillow's 16 MB band and the models' own working memory (small photos).
    dw, dh = lf.DETECT_MAX_SIDE, round(h * lf.DETECT_MAX_SIDE / w)
    bound = w * h * 4 + w * h * 3 + dw * dh * 3 + (48 << 20)
    assert grown < bound, f"reading and analysing a {w}x{h} photo grew the process by {grown / 2**20:.0f} MB"
    # Keypoints in the full photo's pixels (the astronaut was enlarged 4x: x -> 4x + 1.5).
    expected = ASTRO_KPS * 4 + 1.5 + np.array([2000, 1000])
    assert np.abs(np.load(tmp_path / "kps.npy") - expected).max() < 12.0
    # Pillow's own warning is replaced by one line of ours.
    assert "DecompressionBomb" not in r.stderr
    assert "big.jpg is a very large photo (6000x4500, 27 megapixels" in r.stderr


# ---------------------------------------------------------------------------------------- alignment


def test_templates():
    np.testing.assert_allclose(lf.arcface_template(), lf.ARCFACE_TEMPLATE)
    ref = lf.reference_template()
    # Hand-computed for the image-left eye:
    # ((38.2946 - 56) * 0.8 + 56) * 256/112, ((51.6963 + 10 - 56) * 0.8 + 56) * 256/112
    np.testing.assert_allclose(ref[0], [95.62441, 138.41609], atol=1e-3)
    np.testing.assert_allclose(ref[4], [((70.7299 - 56) * 0.8 + 56) * 256 / 112,
                                        ((92.2041 + 10 - 56) * 0.8 + 56) * 256 / 112], atol=1e-3)


# The authors' crops, written out from their published code: insightface's estimate_norm/norm_crop for the
# 112x112 ArcFace crop, their face_utils.align_face(extend_face_crop=True, face_size=256) for the reference.
def _authors_template(extend: bool) -> np.ndarray:
    dst = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                    [70.7299, 92.2041]], dtype=np.float32)
    if extend:
        dst[:, 1] = dst[:, 1] + 10
        dst = (dst - 112 / 2) * 0.8 + 112 / 2
    return dst


def _authors_crop(image: np.ndarray, kps: np.ndarray, size: int) -> np.ndarray:
    dst = _authors_template(size == 256) * (float(size) / 112.0)
    tform = sktransform.SimilarityTransform()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # estimate() is deprecated in scikit-image 0.26
        tform.estimate(kps, dst)
    if size == 112:  # norm_crop: straight on the RGB array
        return cv2.warpAffine(image, tform.params[0:2, :], (size, size), borderValue=0.0)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)  # align_face goes through BGR and back
    return cv2.cvtColor(cv2.warpAffine(bgr, tform.params[0:2, :], (size, size), borderValue=0.0), cv2.COLOR_BGR2RGB)


def _keypoint_sets() -> dict[str, np.ndarray]:
    kps = ASTRO_KPS.astype(np.float32)  # detectors give float32 keypoints
    theta, centre = 0.3, kps.mean(axis=0)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return {
        "astronaut": kps,
        # Turned, enlarged and moved: the crop resamples between pixels everywhere.
        "rotated": ((kps - centre) @ rot.T * 1.7 + centre + [13.25, -40.6]).astype(np.float32),
        # The face at the photo's corner: the crops run past its edges into the black border.
        "border": (kps - [200, 95]).astype(np.float32),
    }


# sha256 of the crops of skimage's astronaut made by the authors' recipe above with opencv-python-headless
# 4.11.0.86, the version in their requirements.txt (4.10 to 4.14 give the same bytes; OpenCV 5.0 does not).
AUTHORS_CROP_SHA256 = {
    ("astronaut", 112): "f315d0bcc271e1342514733450ca9c2912b69b8dcad31dd3c0d8308693693a15",
    ("astronaut", 256): "964de92d1187c9d842af4def87e22989f25c924f293348e980b9accb63911102",
    ("rotated", 112): "ef107a87ee6de42155448a162ecb7d7f042845ed5f7f833e5b7a36f35b8b70d5",
    ("rotated", 256): "20a1981247d3bd41afbcb39f0c7bd50e51793640aa6b3be774baa26c88b284ab",
    ("border", 112): "cf6e41b8f5ca3e142fd691076d3338f0ad5aedd1cef95b0583696bfabbd79870",
    ("border", 256): "620fa1dd26bb7188e2414d7e3b3668747cdee3c90745e2ff2f80e28354cf2544",
}


def test_crops_equal_the_authors_pixel_for_pixel(astro, t1_path, dlib_detector):
    cases = [(astro, name, kps) for name, kps in _keypoint_sets().items()]
    t1 = lf.load_image(t1_path)
    cases += [(t1, f"t1 face {i}", f.keypoints) for i, f in enumerate(dlib_detector.detect(t1))]
    for image, name, kps in cases:
        for size, ours in ((112, lf.align_arcface(image, kps)), (256, lf.align_reference(image, kps))):
            theirs = _authors_crop(image, kps, size)
            diff = np.abs(ours.astype(int) - theirs.astype(int))
            assert diff.max() == 0, f"{name} {size}: {(diff > 0).mean():.1%} of values differ, by up to {diff.max()}"


def test_crops_equal_the_authors_opencv_4_bytes(astro):
    assert int(cv2.__version__.split(".")[0]) == 4, \
        f"OpenCV {cv2.__version__} resamples differently from the authors' 4.x: pip install 'opencv-python-headless<5'"
    for name, kps in _keypoint_sets().items():
        for size, crop in ((112, lf.align_arcface(astro, kps)), (256, lf.align_reference(astro, kps))):
            digest = hashlib.sha256(np.ascontiguousarray(crop).tobytes()).hexdigest()
            assert digest == AUTHORS_CROP_SHA256[(name, size)], (name, size)


def test_crops_put_the_eyes_on_the_template(astro, astro_identity):
    ident = astro_identity
    # Hand-read eye positions, mapped by the estimated transforms, land on the template eyes.
    m = estimate_transform(ident.keypoints, lf.ARCFACE_TEMPLATE)
    assert np.abs(transform_points(m, ASTRO_KPS[:2]) - lf.ARCFACE_TEMPLATE[:2]).max() < 3.0
    m = estimate_transform(ident.keypoints, lf.reference_template())
    assert np.abs(transform_points(m, ASTRO_KPS[:2]) - lf.reference_template()[:2]).max() < 3.0 * 256 / 112
    # And in the pixels: the pupils there are dark against the skin of the cheeks.
    for crop, tpl in ((ident.arcface_crop, lf.ARCFACE_TEMPLATE), (ident.reference_crop, lf.reference_template())):
        gray = crop.astype(float).mean(axis=2)
        r = max(1, crop.shape[0] // 112)
        eyes = [gray[int(y) - r:int(y) + r + 1, int(x) - r:int(x) + r + 1].mean() for x, y in tpl[:2]]
        cheek = gray[int(tpl[2, 1]) - r:int(tpl[2, 1]) + r + 1, int(tpl[0, 0]) - r:int(tpl[0, 0]) + r + 1].mean()
        assert max(eyes) < cheek - 40, (eyes, cheek)


def test_reference_crop_border_is_black():
    img = np.full((112, 112, 3), 200, np.uint8)
    kps = lf.ARCFACE_TEMPLATE  # an aligned photo: the wider reference crop reaches past its edges
    arc = lf.align_arcface(img, kps)
    ref = lf.align_reference(img, kps)
    assert arc.shape == (112, 112, 3) and (arc == 200).all()
    m = estimate_transform(kps, lf.reference_template())
    corner = transform_points(np.linalg.inv(m), [[0, 0]])[0]
    assert corner[0] < 0 and corner[1] < 0  # hand check: ref pixel (0, 0) lies outside the photo
    assert ref.shape == (256, 256, 3)
    assert ref[0, 0].tolist() == [0, 0, 0] and ref[128, 128].tolist() == [200, 200, 200]
    with pytest.raises(InputError, match="degenerate"):
        lf.align_arcface(img, np.zeros((5, 2)))


# ------------------------------------------------------------------------------------------ ArcFace


def _facexlib_ir_se50_keys() -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of facexlib's Backbone(50, mode='ir_se'), written out independently."""
    keys: dict[str, tuple[int, ...]] = {}

    def bn(prefix, c):
        for n in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{n}"] = (c,)

    keys["input_layer.0.weight"] = (64, 3, 3, 3)
    bn("input_layer.1", 64)
    keys["input_layer.2.weight"] = (64,)
    i = 0
    for in_c, depth, units in ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3)):
        for u in range(units):
            c_in = in_c if u == 0 else depth
            p = f"body.{i}"
            if c_in != depth:
                keys[f"{p}.shortcut_layer.0.weight"] = (depth, c_in, 1, 1)
                bn(f"{p}.shortcut_layer.1", depth)
            bn(f"{p}.res_layer.0", c_in)
            keys[f"{p}.res_layer.1.weight"] = (depth, c_in, 3, 3)
            keys[f"{p}.res_layer.2.weight"] = (depth,)
            keys[f"{p}.res_layer.3.weight"] = (depth, depth, 3, 3)
            bn(f"{p}.res_layer.4", depth)
            keys[f"{p}.res_layer.5.fc1.weight"] = (depth // 16, depth, 1, 1)
            keys[f"{p}.res_layer.5.fc2.weight"] = (depth, depth // 16, 1, 1)
            i += 1
    bn("output_layer.0", 512)
    keys["output_layer.3.weight"] = (512, 512 * 7 * 7)
    keys["output_layer.3.bias"] = (512,)
    bn("output_layer.4", 512)
    return keys


def test_parameter_names_match_facexlib(model):
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert ours == _facexlib_ir_se50_keys()


def test_published_names_load_strictly(tmp_path, model):
    torch.manual_seed(1)
    # As the released file was written by an old torch: no num_batches_tracked entries.
    state = {k: torch.randn(s) for k, s in _facexlib_ir_se50_keys().items()}
    for k in state:
        if k.endswith("running_var"):
            state[k] = state[k].abs() + 0.5
    path = tmp_path / lf.ARCFACE_FILE
    torch.save(state, path)
    loaded = lf.load_arcface(path)
    assert not loaded.training
    assert torch.equal(loaded.state_dict()["body.23.res_layer.5.fc2.weight"], state["body.23.res_layer.5.fc2.weight"])
    assert torch.equal(loaded.state_dict()["output_layer.3.weight"], state["output_layer.3.weight"])
    # A state dict re-saved by a current torch (with num_batches_tracked) loads too.
    torch.save(loaded.state_dict(), tmp_path / "resaved.pth")
    lf.load_arcface(tmp_path / "resaved.pth")

    broken = dict(state)
    del broken["body.5.res_layer.1.weight"]
    torch.save(broken, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing keys.*body.5.res_layer.1.weight"):
        lf.load_arcface(tmp_path / "missing.pth")
    torch.save({**state, "fc.weight": torch.zeros(3)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected keys.*fc.weight"):
        lf.load_arcface(tmp_path / "extra.pth")
    torch.save({**state, "output_layer.3.bias": torch.zeros(256)}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="shape mismatch.*output_layer.3.bias"):
        lf.load_arcface(tmp_path / "shape.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="junk.pth"):
        lf.load_arcface(tmp_path / "junk.pth")


def test_missing_weights_message(tmp_path, astro):
    with pytest.raises(WeightsNotFoundError) as err:
        lf.analyze(astro, detector="dlib", models_dir=tmp_path)
    msg = str(err.value)
    assert "recognition_arcface_ir_se50.pth" in msg and str(tmp_path) in msg and lf.ARCFACE_URL in msg


def test_preprocessing_hand_computed():
    crop = np.zeros((112, 112, 3), np.uint8)
    crop[...] = (255, 0, 128)
    crop[0, 0] = (10, 20, 30)
    x = lf.preprocess(crop)
    assert x.shape == (1, 3, 112, 112) and x.dtype == torch.float32
    # BGR order; v / 127.5 - 1 (= (v/255 - 0.5) / 0.5)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), [30 / 127.5 - 1, 20 / 127.5 - 1, 10 / 127.5 - 1], atol=1e-6)
    np.testing.assert_allclose(x[0, :, 5, 7].numpy(), [0.00392157, -1.0, 1.0], atol=1e-6)
    with pytest.raises(InputError):
        lf.preprocess(np.zeros((100, 100, 3), np.uint8))


def test_random_weights_give_unit_512_vector(model, astro_identity):
    crop = astro_identity.arcface_crop
    e = lf.embed(model, crop)
    assert e.shape == (512,) and e.dtype == np.float32
    assert np.linalg.norm(e) == pytest.approx(1.0, abs=1e-5)
    batch = lf.embed(model, np.stack([crop, crop[:, ::-1]]))
    assert batch.shape == (2, 512)
    np.testing.assert_allclose(batch[0], e, atol=1e-5)
    # The same as running the network by hand on the preprocessed tensor, in eval mode.
    with torch.no_grad():
        ref = model.eval()(lf.preprocess(crop))[0].numpy()
    np.testing.assert_allclose(e, ref, atol=1e-6)
    # Normalisation is the network's last step, whatever the scale before it.
    scaled = lf.ArcFaceIRSE50()
    scaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        scaled.output_layer[4].weight.mul_(100.0)
    assert np.linalg.norm(lf.embed(scaled, crop)) == pytest.approx(1.0, abs=1e-5)


def test_embed_uses_eval_mode_batchnorm(model, astro_identity):
    model.train()
    try:
        e = lf.embed(model, astro_identity.arcface_crop)  # one sample: would fail in train-mode BN
    finally:
        model.eval()
    np.testing.assert_allclose(e, astro_identity.embedding, atol=1e-5)


# ----------------------------------------------------------------------------------------- identity


def test_identity_fields(astro_identity):
    ident = astro_identity
    assert ident.embedding.shape == (512,) and ident.embedding.dtype == np.float32
    assert np.linalg.norm(ident.embedding) == pytest.approx(1.0, abs=1e-5)
    assert ident.keypoints.shape == (5, 2) and ident.keypoints.dtype == np.float32
    assert ident.arcface_crop.shape == (112, 112, 3) and ident.arcface_crop.dtype == np.uint8
    assert ident.reference_crop.shape == (256, 256, 3) and ident.reference_crop.dtype == np.uint8
    assert ident.image_size == (512, 512) and ident.num_faces == 1 and ident.detector == "dlib"
    assert ident.score > 0 and ident.source == ""
    text = lf.describe(ident)
    assert "faces found: 1" in text and "dlib" in text and "x 179-267" in text


def test_same_face_twice_and_shifted_copy(astro, astro_identity, model, dlib_detector, t1_path):
    again = lf.analyze(astro, detector=dlib_detector, arcface_weights=model)
    np.testing.assert_array_equal(again.embedding, astro_identity.embedding)
    np.testing.assert_array_equal(again.reference_crop, astro_identity.reference_crop)
    shifted = np.pad(astro, ((0, 0), (37, 0), (0, 0)), mode="edge")
    moved = lf.analyze(shifted, detector=dlib_detector, arcface_weights=model)
    np.testing.assert_allclose(moved.keypoints - [37, 0], astro_identity.keypoints, atol=2.0)
    # Landmark jitter of up to a pixel turns the crop slightly; it stays the same picture.
    assert np.abs(moved.arcface_crop.astype(int) - astro_identity.arcface_crop).mean() < 10
    other = lf.analyze(t1_path, detector=dlib_detector, arcface_weights=model, face_index=0)
    same, different = astro_identity.similarity(moved), astro_identity.similarity(other)
    # Even with random weights the shifted copy stays much closer than another person's face.
    assert same > 0.97 and different < 0.8, (same, different)


def test_save_and_load_roundtrip(tmp_path, astro_identity):
    path = astro_identity.save(tmp_path / "astronaut.identity")
    assert path == tmp_path / "astronaut.identity" and path.is_file()
    back = lf.FaceIdentity.load(path)
    for name in ("embedding", "keypoints", "arcface_crop", "reference_crop", "box"):
        np.testing.assert_array_equal(getattr(back, name), getattr(astro_identity, name))
    assert (back.image_size, back.score, back.source, back.num_faces, back.detector) == (
        astro_identity.image_size, pytest.approx(astro_identity.score), "", 1, "dlib")
    with pytest.raises(InputError, match="not found"):
        lf.FaceIdentity.load(tmp_path / "nobody.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        lf.FaceIdentity.load(tmp_path / "bad.safetensors")


def test_from_embedding(astro_identity):
    ident = lf.FaceIdentity.from_embedding(np.full(512, 3.0))
    np.testing.assert_allclose(ident.embedding, np.full(512, 1 / np.sqrt(512)), rtol=1e-5)
    assert ident.reference_crop is None and ident.keypoints is None
    assert "precomputed" in lf.describe(ident) and "Ref-adapter will be skipped" in lf.describe(ident)
    with_ref = lf.FaceIdentity.from_embedding(astro_identity.embedding, astro_identity.reference_crop)
    np.testing.assert_array_equal(with_ref.reference_crop, astro_identity.reference_crop)
    with pytest.raises(InputError, match="512"):
        lf.FaceIdentity.from_embedding(np.ones(128))
    with pytest.raises(InputError, match="256x256"):
        lf.FaceIdentity.from_embedding(np.ones(512), astro_identity.arcface_crop)
    with pytest.raises(InputError, match="zero"):
        lf.FaceIdentity.from_embedding(np.zeros(512))


def _identity(vec, score, source):
    crop = np.full((256, 256, 3), int(score * 10), np.uint8)
    return lf.FaceIdentity(embedding=np.asarray(vec, float), reference_crop=crop, score=score, source=source)


def test_combine_several_photos():
    base = np.zeros(512)
    base[0] = 1.0
    near = np.zeros(512)
    near[:2] = [0.8, 0.6]
    a, b = _identity(base, 1.0, "a.jpg"), _identity(near, 2.0, "b.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        both = lf.combine([a, b])
    expected = (base + near) / np.linalg.norm(base + near)
    np.testing.assert_allclose(both.embedding, expected, atol=1e-6)
    assert both.source == "b.jpg" and both.reference_crop[0, 0, 0] == 20  # best-scoring photo's crop
    assert both.num_images == 2 and both.extra["sources"] == ["a.jpg", "b.jpg"]

    other = np.zeros(512)
    other[5] = 1.0
    with pytest.warns(lf.IdentityMismatchWarning, match="c.jpg"):
        lf.combine([a, b, _identity(other, 0.5, "c.jpg")])


def test_analyze_list_of_photos(tmp_path, astro, model, dlib_detector):
    p1 = tmp_path / "one.png"
    Image.fromarray(astro).save(p1)
    p2 = tmp_path / "two.jpg"
    Image.fromarray(np.pad(astro, ((20, 0), (0, 15), (0, 0)), mode="edge")).save(p2, quality=95)
    ident = lf.analyze([p1, p2], detector=dlib_detector, arcface_weights=model)
    assert ident.num_images == 2 and ident.source in (str(p1), str(p2))
    assert np.linalg.norm(ident.embedding) == pytest.approx(1.0, abs=1e-5)
    assert "combined from 2 photos" in lf.describe(ident)
    with pytest.raises(InputError, match="empty"):
        lf.analyze([], detector=dlib_detector, arcface_weights=model)


def test_default_models_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LYNX_FACE_MODELS", str(tmp_path / "faces"))
    assert face_models_dir() == tmp_path / "faces"
    monkeypatch.delenv("LYNX_FACE_MODELS")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert face_models_dir() == tmp_path / ".cache" / "lynx" / "face"
