"""Shared fixtures: tiny random Wan bases and Lynx adapters, saved once per session in the real layouts."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lynx import LynxPipeline
from lynx.testing import save_tiny_adapters, save_tiny_base


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker per core, at most four, since each worker builds the session's
    fixtures again and most tests are one thread of Python around tiny tensors."""
    return min(_cores(), 4)


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers share the cores: each gets its share of intra-op threads, in this process and in the commands its
    # tests spawn (they read OMP_NUM_THREADS), so in-process and spawned results keep one reduction order.
    threads = max(1, _cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("models") / "Wan2.1-T2V-14B-Diffusers")


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "full": save_tiny_adapters(root / "lynx_full", "full"),
        "registers": save_tiny_adapters(root / "lynx_full_registers", "full", num_registers=3),
        "lite": save_tiny_adapters(root / "lynx_lite", "lite"),
    }


@pytest.fixture(scope="session")
def face_embedding():
    g = torch.Generator().manual_seed(7)
    e = torch.randn(512, generator=g)
    return (e / e.norm()).numpy()


@pytest.fixture(scope="session")
def reference_crop():
    rng = np.random.RandomState(3)
    img = np.zeros((256, 256, 3), np.uint8)
    img[64:192, 80:176] = rng.randint(90, 220, (128, 96, 3))  # a face-sized blob on black, like a real crop
    return img


@pytest.fixture(scope="session")
def face_models(tmp_path_factory):
    """A face-model directory holding ArcFace IR-SE50 with random weights under the released file name."""
    from lynx import face

    d = tmp_path_factory.mktemp("face_models")
    torch.manual_seed(0)
    torch.save(face.ArcFaceIRSE50().eval().state_dict(), d / face.ARCFACE_FILE)
    return d


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """Real photos that ship in scikit-image: one face (astronaut.jpg) and a cat (cat.jpg)."""
    from PIL import Image
    from skimage import data

    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.astronaut()).save(d / "astronaut.jpg")
    Image.fromarray(data.chelsea()).save(d / "cat.jpg")
    return d


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine: a second thread only adds contention; spawned training
    ranks get one thread each (as under torchrun), and in-process runs compared with them must too."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium: the system's browser, driven by playwright (which downloads nothing this way);
    None when there is no chromium (Debian: apt-get install -y chromium). Per module: playwright's loop
    does not outlive the tests that use it."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary is None:
        yield None
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=binary,
                              args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        yield b
        b.close()



@pytest.fixture
def screenshots(tmp_path):
    """Where the browser tests put their screenshots: docs/images when LYNX_DOCS_SCREENSHOTS=1 (how the ones in
    docs/web.md are made), else a temporary directory."""
    if os.environ.get("LYNX_DOCS_SCREENSHOTS") == "1":
        folder = Path(__file__).resolve().parent.parent / "docs" / "images"
        folder.mkdir(exist_ok=True)
        return folder
    return tmp_path

SMALL = dict(height=32, width=32, num_frames=5, num_inference_steps=3)


# The tiny full and lite pipelines, loaded once per test module (tests may patch them with monkeypatch).
@pytest.fixture(scope="module")
def full(tiny_base, adapter_dirs):
    return LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["full"])


@pytest.fixture(scope="module")
def lite(tiny_base, adapter_dirs):
    return LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["lite"])


def person(face_embedding, reference_crop):
    """The pipeline's keywords for a person given by embedding and reference crop."""
    return dict(face_embedding=face_embedding, reference_image=reference_crop)
