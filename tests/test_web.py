"""`lynx serve` on the tiny model, driven as people and scripts drive it: gradio_client for the API (face check,
generate, progress, a queue of two, cancel, gallery, saved identities, refusals), `lynx serve` as a subprocess
without weights, and the page itself in headless Chromium (through playwright, on the system's browser).
"""

import hashlib
import json
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import Status
from PIL import Image

from lynx import face
from lynx.apps.web.app import LynxWebApp, ServeConfig, build_page
from lynx.apps.web.cli import open_page
from lynx.io.video import read_video
from lynx.pipelines.speed import TURBO

REPO = Path(__file__).resolve().parent.parent
# Gradio's queue statistics use pandas options that pandas 3 deprecates: not ours to fix, and noisy.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")
TINY = {"height": 32, "width": 48, "num_frames": 5, "num_inference_steps": 3}


# ----- fixtures and helpers -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def web(tiny_base, adapter_dirs, face_models, tmp_path_factory):
    """The page on 127.0.0.1 (a free port), in this process so tests can hold a run between two steps."""
    out = tmp_path_factory.mktemp("web_out")
    app = LynxWebApp(ServeConfig(base=tiny_base, adapter=adapter_dirs["full"], out_dir=out, face_models=face_models,
                                 detector="dlib"))
    app.start()
    assert app.loaded.wait(120) and app.model_state == "ready", app.model_error
    page = build_page(app)
    url = open_page(page, allowed=[out])
    downloads = tmp_path_factory.mktemp("downloads")
    app.client = lambda: Client(url, verbose=False, download_files=str(downloads))
    app.url = url
    yield app
    page.close()


def generate(client, photos, prompt, person="", **settings):
    """/generate with the tiny sizes; returns (status line, sidecar, command, video path as served)."""
    out = client.predict(photos=[handle_file(p) for p in photos], person=person, prompt=prompt,
                         **{**TINY, **settings}, api_name="/generate")
    served = out[1]["value"] if out[1].get("visible") else out[2]["value"]
    return out[0], json.loads(out[4]), out[5], served


def submit(client, prompt, photos):
    return client.submit(photos=[handle_file(p) for p in photos], person="", prompt=prompt, **TINY,
                         api_name="/generate")


def wait_for(condition, what, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ----- face check -----------------------------------------------------------------------------------------
def test_face_check_draws_the_face_counts_it_and_shows_the_crop(web, photos):
    gallery, report = web.client().predict([handle_file(photos / "astronaut.jpg"), handle_file(photos / "cat.jpg")],
                                           api_name="/check_faces")
    # The same detection, done here independently, says where the box and the crop must be.
    image = face.load_image(photos / "astronaut.jpg")
    faces = face.create_detector("dlib").detect(image)
    assert len(faces) == 1
    x1, y1, x2, y2 = (round(float(v)) for v in faces[0].box)
    boxed, crop = (np.asarray(Image.open(item["image"]).convert("RGB")) for item in gallery)
    assert [item["caption"] for item in gallery] == ["astronaut.jpg: 1 face(s)",
                                                     "astronaut.jpg: the 256x256 crop the model sees"]
    assert boxed.shape == image.shape and (boxed[y1 + 10, x1] == [0, 200, 0]).all()  # the green box edge
    assert (boxed[5:60, 5:60] == image[5:60, 5:60]).all()  # untouched away from the box
    assert crop.shape == (256, 256, 3) and (crop == face.align_reference(image, faces[0].keypoints)).all()
    assert f"**astronaut.jpg**: 1 face(s) found; box x {x1}-{x2}, y {y1}-{y2}" in report
    assert "**cat.jpg**: no face found in cat.jpg; use a photo where one face is clearly visible" in report
    # Kept by content, never by the name it was uploaded as; a refused photo is not kept.
    jpeg = (photos / "astronaut.jpg").read_bytes()
    assert (web.out_dir / "photos" / f"{hashlib.sha256(jpeg).hexdigest()}.jpg").read_bytes() == jpeg
    cat = hashlib.sha256((photos / "cat.jpg").read_bytes()).hexdigest()
    assert not list((web.out_dir / "photos").glob(f"{cat}.*"))


def _png_header(path, width, height):
    """A PNG file that claims `width` x `height` pixels (a real 1x1 image with its header rewritten)."""
    Image.new("L", (1, 1)).save(path)
    raw = bytearray(path.read_bytes())
    ihdr = struct.pack(">II", width, height) + raw[24:29]
    raw[16:33] = ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(bytes(raw))
    return path


def test_uploads_are_checked_by_content_size_and_pixels(web, photos, tmp_path):
    (tmp_path / "notes.jpg").write_text("not a photo at all")
    _png_header(tmp_path / "huge.png", 8000, 8000)  # 64 MP: more than any photo needs
    _png_header(tmp_path / "bomb.png", 60000, 60000)  # 3.6 GP in a few bytes: a decompression bomb
    _, report = web.client().predict([handle_file(tmp_path / n) for n in ("notes.jpg", "huge.png", "bomb.png")],
                                     api_name="/check_faces")
    assert "**notes.jpg**: notes.jpg is not a JPEG, PNG, WebP or BMP photo" in report
    assert "**huge.png**: huge.png is 8000x8000 pixels; at most 50 million are accepted" in report
    assert "**bomb.png**: bomb.png claims more pixels than any photo has; it is not decoded" in report
    assert not any(p.name.startswith(("notes", "huge", "bomb")) for p in (web.out_dir / "photos").glob("*"))
    # A cut-off photo passes the header checks; decoding it fails, and the message names it as uploaded.
    jpeg = (photos / "astronaut.jpg").read_bytes()
    (tmp_path / "half.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    _, report = web.client().predict([handle_file(tmp_path / "half.jpg")], api_name="/check_faces")
    assert report.startswith("- **half.jpg**: half.jpg is a corrupt or truncated image") and "photos/" not in report
    with pytest.raises(AppError, match=r"^half\.jpg is a corrupt or truncated image"):
        generate(web.client(), [tmp_path / "half.jpg"], "a woman smiling")
    with pytest.raises(AppError, match=r"^half\.jpg is a corrupt or truncated image"):
        web.client().predict([handle_file(tmp_path / "half.jpg")], "half", api_name="/save_identity")
    half = hashlib.sha256((tmp_path / "half.jpg").read_bytes()).hexdigest()
    assert not list((web.out_dir / "photos").glob(f"{half}.*"))
    with pytest.raises(AppError, match="at most 8 photos of one person, got 9"):
        web.client().predict([handle_file(tmp_path / "notes.jpg")] * 9, api_name="/check_faces")
    # The content decides, not the name: a JPEG under any name is a JPEG.
    for name in ("astronaut.txt", "astronaut"):
        (tmp_path / name).write_bytes(jpeg)
        _, report = web.client().predict([handle_file(tmp_path / name)], api_name="/check_faces")
        assert report.startswith(f"- **{name}**: 1 face(s) found"), report


# ----- generation -----------------------------------------------------------------------------------------
def test_generate_writes_video_and_sidecar_never_overwriting_and_the_command_remakes_it(web, photos, tmp_path):
    squatter = web.out_dir / "person-a-woman-smiling-s7.mp4"  # e.g. made by the CLI earlier, no sidecar
    squatter.write_bytes(b"keep me")
    client = web.client()
    runs = [generate(client, [photos / "astronaut.jpg"], "a woman smiling", seed=7, format=fmt)
            for fmt in (".mp4", ".mp4", ".gif")]
    names = [side["video"] for _, side, _, _ in runs]
    assert names == ["person-a-woman-smiling-s7-2.mp4", "person-a-woman-smiling-s7-3.mp4",
                     "person-a-woman-smiling-s7.gif"]
    assert squatter.read_bytes() == b"keep me"
    assert runs[0][0].startswith("done in ")

    frames, fps = read_video(web.out_dir / names[0])
    assert frames.shape == (5, 32, 48, 3) and fps == 16
    assert (read_video(runs[0][3])[0] == frames).all()  # what the page plays is that file
    assert read_video(web.out_dir / names[2])[0].shape == (5, 32, 48, 3)
    side = json.loads((web.out_dir / (names[0] + ".json")).read_text())
    assert side == runs[0][1] and side["source"] == "lynx serve"
    assert (side["prompt"], side["seed"], side["num_frames"], side["height"], side["width"]) == \
        ("a woman smiling", 7, 5, 32, 48)
    assert side["guidance_scale"] == 5.0 and side["guidance_scale_i"] == 2.0 and side["variant"] == "full"
    digest = hashlib.sha256((photos / "astronaut.jpg").read_bytes()).hexdigest()
    assert side["identity"]["images"][0]["sha256"] == digest
    # Same seed, same settings: the same video.
    assert (read_video(web.out_dir / names[1])[0] == frames).all()

    # The equivalent command, run from a terminal, makes the same video.
    command = runs[0][2]
    assert command == side["command"] and command.startswith(f"lynx generate --image {web.out_dir}/photos/{digest}.jpg")
    argv = shlex.split(command)
    argv[argv.index("--out") + 1] = str(tmp_path / "again.mp4")
    proc = subprocess.run([sys.executable, "-m", "lynx", *argv[1:]], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert (read_video(tmp_path / "again.mp4")[0] == frames).all()


@pytest.mark.parametrize("change,message", [
    ({"num_frames": 6, "height": 30}, "invalid video size: num_frames=6 is not 4k+1 (try 5 or 9); height=30 is not "
                                      "a positive multiple of 16 (try 16 or 32)"),
    ({"num_inference_steps": 1000000}, "num_inference_steps=1000000 is above the limit of 200"),
    ({"num_inference_steps": 0}, "num_inference_steps=0 must be at least 1 (try 1)"),
    ({"num_frames": 0}, "invalid video size: num_frames=0 is not 4k+1 (try 1 or 5)"),
    ({"height": 0, "width": -16}, "invalid video size: height=0 is not a positive multiple of 16 (try 16 or 32); "
                                  "width=-16 is not a positive multiple of 16"),
    ({"fps": 0}, "fps=0 must be between 1 and 240"),
    ({"seed": -1}, "seed=-1 must be in [0, 2**63)"),
    ({"prompt": "  "}, "the prompt is empty"),
    ({"photos": []}, "no photo: upload a photo of the person, or pick a saved identity"),
    ({"person": "nobody"}, "no saved identity named 'nobody'"),
    ({"guidance_scale": None}, "guidance_scale needs a value (default 5.0)"),
    ({"ip_end": 1.5}, "ip_end=1.5 is a fraction of the denoising steps, 0 to 1"),
])
def test_bad_requests_get_the_cli_messages(web, photos, change, message):
    request = {"photos": [handle_file(photos / "astronaut.jpg")], "person": "", "prompt": "a woman smiling",
               **TINY, **change}
    with pytest.raises(AppError) as caught:
        web.client().predict(**request, api_name="/generate")
    assert str(caught.value).startswith(message)


def test_strength_windows_reach_the_pipeline_sidecar_and_command(web, photos):
    photo = [photos / "astronaut.jpg"]
    client = web.client()
    _, plain, plain_command, plain_video = generate(client, photo, "a woman waving", seed=3)
    _, side, command, video = generate(client, photo, "a woman waving", seed=3, ref_end=0.5, guidance_i_end=0.5,
                                       ref_blocks="0-1")
    assert plain["speed"]["preset"] == "exact" and "--ref-end" not in plain_command
    assert (plain["ref_end"], plain["guidance_i_end"], plain["ref_blocks"]) == (1.0, 1.0, "all")
    assert side["speed"]["preset"] == "exact"
    assert (side["ref_end"], side["guidance_i_end"], side["ref_blocks"]) == (0.5, 0.5, "0-1")
    assert "--guidance-i-end 0.5 --ref-end 0.5 --ref-blocks 0-1" in command
    assert not (read_video(video)[0] == read_video(plain_video)[0]).all()  # the pipeline got them


def test_a_speed_preset_and_lora_set_the_page_defaults_the_sidecar_and_the_command(tiny_base, adapter_dirs,
                                                                                    face_models, photos, tmp_path):
    """`lynx serve --speed turbo --lora FILE:0.8`: the form starts from the preset's values (a request that gives
    only the sizes gets them), the status says the preset, the sidecar records it and the command remakes the video."""
    from test_lora import write_layout

    lora = write_layout(tmp_path / "distill.safetensors", "kohya")
    out = tmp_path / "out"
    app = LynxWebApp(ServeConfig(base=tiny_base, adapter=adapter_dirs["full"], out_dir=out, face_models=face_models,
                                 detector="dlib", speed="turbo", loras=[(str(lora), 0.8)]))
    app.start()
    assert app.loaded.wait(120) and app.model_state == "ready", app.model_error
    page = build_page(app)
    try:
        client = Client(open_page(page, allowed=[out]), verbose=False, download_files=str(tmp_path / "dl"))
        status = client.predict(api_name="/status")[0]
        assert "Speed preset **turbo**, memory preset **none**, LoRA distill.safetensors at 0.8" in status
        params = {p["parameter_name"]: p for p in client.view_api(print_info=False, return_format="dict")
                  ["named_endpoints"]["/generate"]["parameters"]}
        assert {k: params[k]["parameter_default"] for k in TURBO if k != "guidance_scale_i"} == \
            {k: v for k, v in TURBO.items() if k != "guidance_scale_i"}
        assert params["ip_end"]["parameter_default"] == 1.0  # a knob the preset leaves: the variant's default

        steps = []
        app.on_step = lambda run: steps.append((run.step, run.total))
        sizes = {k: TINY[k] for k in ("height", "width", "num_frames")}
        side = json.loads(client.predict(photos=[handle_file(photos / "astronaut.jpg")], person="",
                                         prompt="a man walks", seed=11, **sizes, guidance_scale_i=None,
                                         api_name="/generate")[4])  # None: the empty field (gradio_client needs it)
        assert steps == [(i, 4) for i in range(1, 5)]  # the preset's 4 steps, on its grid of 4
        assert (side["num_inference_steps"], side["guidance_scale"], side["guidance_scale_i"]) == (4, 1.0, "two-way")
        assert (side["ip_scale"], side["ref_scale"], side["ref_end"]) == (0.8, 0.6, 0.5)
        assert side["speed"] == {"preset": "turbo", "loras": [{"path": str(lora.resolve()), "scale": 0.8}],
                                 "compile": False}
        assert f"--speed turbo --lora {lora.resolve()}:0.8" in side["command"]

        # The equivalent command loads the same LoRA and preset and makes the same video.
        argv = shlex.split(side["command"])
        argv[argv.index("--out") + 1] = str(tmp_path / "again.mp4")
        proc = subprocess.run([sys.executable, "-m", "lynx", *argv[1:]], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr
        assert "speed turbo: 4 steps of FlowMatchLCM" in proc.stderr
        assert (read_video(tmp_path / "again.mp4")[0] == read_video(out / side["video"])[0]).all()
    finally:
        page.close()


def test_serve_checks_the_speed_options_before_anything_starts(tmp_path):
    missing = tmp_path / "nope.safetensors"
    for args, message in [(["--speed", "turbo"], "--speed turbo needs a step-distill LoRA"),
                          (["--lora", missing], f"input file {missing} does not exist"),
                          (["--memory", "12gb", "--compile"], "--compile does not combine with --memory 12gb"),
                          (["--max-upload-mb", "0"], "--max-upload-mb: 0 MB accepts no upload; give at least 1")]:
        proc = subprocess.run([sys.executable, "-m", "lynx", "serve", "--port", "0", "--out-dir", tmp_path / "out",
                               *map(str, args)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 2 and message in proc.stderr and "open http" not in proc.stderr, proc.stderr


def test_progress_a_queue_of_two_and_cancel(web, photos):
    """A runs and is held after step 2 (its progress is visible), B waits in the queue and sees its place; A is
    cancelled between two steps, its claimed name is given back, and B then runs to the end."""
    steps, held, gate = [], threading.Event(), threading.Event()

    def hold(run):
        steps.append((run.prompt, run.step))
        if run.prompt == "first" and run.step == 2:
            held.set()
            assert gate.wait(60)

    web.on_step = hold
    try:
        a, b = web.client(), web.client()
        job_a = submit(a, "first", [photos / "astronaut.jpg"])
        assert held.wait(60)
        status = wait_for(lambda: (s := job_a.status()).progress_data and s.progress_data[0].index == 2 and s,
                          "A's progress at step 2")
        unit = status.progress_data[0]
        assert (unit.index, unit.length, unit.unit) == (2, 3, "steps")
        assert re.fullmatch(r"step 2 of 3, [\d.]+ s per step, about \d+ s left", unit.desc)
        assert wait_for(lambda: job_a.outputs() and job_a.outputs()[-1][0] == unit.desc, "A's progress line")
        assert (web.out_dir / "person-first-s42.mp4").stat().st_size == 0  # claimed, not yet written

        job_b = submit(b, "second", [photos / "astronaut.jpg"])
        queued = wait_for(lambda: (s := job_b.status()).code == Status.IN_QUEUE and s, "B in the queue")
        assert queued.rank == 0 and queued.queue_size == 1  # first in line, one waiting
        job_a.cancel()
        wait_for(lambda: job_a.status().code == Status.CANCELLED, "A cancelled")
    finally:
        gate.set()
    try:
        result = job_b.result(timeout=120)
    finally:
        web.on_step = lambda run: None
    assert result[0].startswith("done in ") and json.loads(result[4])["video"] == "person-second-s42.mp4"
    # A stopped between steps 2 and 3; B ran all three steps, only after A had stopped.
    assert steps == [("first", 1), ("first", 2), ("second", 1), ("second", 2), ("second", 3)]
    assert not (web.out_dir / "person-first-s42.mp4").exists()
    assert (web.out_dir / "person-second-s42.mp4").stat().st_size > 0


# ----- gallery and saved identities -------------------------------------------------------------------------
def test_gallery_lists_the_output_directory_and_shows_each_sidecar(web, photos):
    client = web.client()
    _, side, _, _ = generate(client, [photos / "astronaut.jpg"], "a man running in the park", seed=3)
    (web.out_dir / "stray.mp4").write_bytes(b"no sidecar")
    items, choices = client.predict(api_name="/gallery")
    names = [item["caption"] for item in items]
    assert names[0] == side["video"]  # newest first
    on_disk = sorted(p.name[:-5] for p in web.out_dir.glob("*.json"))
    assert sorted(names) == on_disk and "stray.mp4" not in names
    assert [c[0] for c in choices["choices"]] == names

    shown = client.predict(side["video"], api_name="/show")
    assert json.loads(shown[3]) == json.loads((web.out_dir / (side["video"] + ".json")).read_text())
    assert shown[4] == side["command"] and "48x32, 5 frames at 16 fps, seed 3" in shown[2]
    assert Path(shown[5]["value"]).read_bytes() == (web.out_dir / side["video"]).read_bytes()  # the download
    for name in ("stray.mp4", "../" + side["video"], "photos"):
        with pytest.raises(AppError, match="with a sidecar in the output directory"):
            client.predict(name, api_name="/show")


def test_gallery_skips_a_sidecar_that_is_not_a_record_with_a_warning(web, photos, caplog):
    client = web.client()
    _, side, _, _ = generate(client, [photos / "astronaut.jpg"], "a man reading", seed=4)
    broken = web.out_dir / "broken.mp4"
    broken.write_bytes((web.out_dir / side["video"]).read_bytes())
    (web.out_dir / "broken.mp4.json").write_text('{"prompt": "hand-edited", "seed": NaN}')
    with caplog.at_level("WARNING", logger="lynx.pipelines.record"):
        items, _ = client.predict(api_name="/gallery")
    names = [item["caption"] for item in items]
    assert side["video"] in names and "broken.mp4" not in names  # the rest of the list is still there
    assert any("broken.mp4.json" in r.getMessage() and "not a readable" in r.getMessage() for r in caplog.records)
    with pytest.raises(AppError, match="with a sidecar in the output directory"):
        client.predict("broken.mp4", api_name="/show")
    broken.unlink()
    (web.out_dir / "broken.mp4.json").unlink()


def test_a_photo_the_face_check_refuses_is_refused_by_generate_before_the_queue(web, photos):
    listing = sorted(p.name for p in web.out_dir.iterdir())
    photo_listing = sorted(p.name for p in (web.out_dir / "photos").iterdir())
    with pytest.raises(AppError, match="no face found in cat.jpg"):
        generate(web.client(), [photos / "astronaut.jpg", photos / "cat.jpg"], "a cat and a woman", seed=9)
    assert sorted(p.name for p in web.out_dir.iterdir()) == listing  # no name claimed, nothing written
    assert sorted(p.name for p in (web.out_dir / "photos").iterdir()) == photo_listing  # nor the refused photo


def test_claimed_names_are_given_back_when_the_server_stops(web, photos):
    """What SIGTERM and Ctrl+C run before `lynx serve` exits: no 0-byte video stays behind."""
    run = web.prepare([str(photos / "astronaut.jpg")], "", "a stopped run", {**TINY, "seed": 11})
    assert run.settings.num_inference_steps == 3 and run.format == ".mp4"
    path = web.claim_output(run)
    assert path.is_file() and path.stat().st_size == 0
    web.shutdown()
    assert not path.exists() and not web.claimed


def test_saved_identity_is_reused_from_the_dropdown(web, photos, face_models):
    client = web.client()
    person, note = client.predict([handle_file(photos / "astronaut.jpg")], "Astro Naut!", api_name="/save_identity")
    assert person["value"] == "astro-naut" and ["astro-naut", "astro-naut"] in person["choices"]
    saved = face.FaceIdentity.load(web.out_dir / "faces" / "astro-naut.identity")
    direct = face.analyze(photos / "astronaut.jpg", detector="dlib", models_dir=face_models)
    assert np.array_equal(saved.embedding, direct.embedding)
    assert np.array_equal(saved.reference_crop, direct.reference_crop)
    with pytest.raises(AppError, match="an identity named 'astro-naut' exists already"):
        client.predict([handle_file(photos / "astronaut.jpg")], "astro naut", api_name="/save_identity")

    _, from_photo, _, _ = generate(client, [photos / "astronaut.jpg"], "a close up portrait", seed=5)
    _, from_identity, command, _ = generate(client, [], "a close up portrait", person="astro-naut", seed=5)
    assert from_identity["video"] == "astro-naut-a-close-up-portrait-s5.mp4"
    assert command.startswith(f"lynx generate --identity {web.out_dir}/faces/astro-naut.identity ")
    assert from_identity["identity"]["identity_file"]["path"].endswith("faces/astro-naut.identity")
    # One photo's identity, analysed now or saved before: the same video.
    frames = [read_video(web.out_dir / side["video"])[0] for side in (from_identity, from_photo)]
    assert (frames[0] == frames[1]).all()


def test_identity_names_in_any_script_are_saved_and_used(web, photos):
    client = web.client()
    for typed, name in [("Zoë", "zoë"), ("李雷", "李雷"), ("Ana\u202eMaria", "ana-maria")]:
        person, note = client.predict([handle_file(photos / "astronaut.jpg")], typed, api_name="/save_identity")
        assert person["value"] == name and [name, name] in person["choices"] and f"faces/{name}.identity" in note
        assert (web.out_dir / "faces" / f"{name}.identity").is_file()
    _, side, command, _ = generate(client, [], "a man waves", person="李雷", seed=6)
    assert side["video"] == "李雷-a-man-waves-s6.mp4" and (web.out_dir / side["video"]).stat().st_size > 0
    assert shlex.split(command)[3] == str(web.out_dir / "faces" / "李雷.identity")
    with pytest.raises(AppError, match=r"give the identity a name \(letters and digits, in any script\)"):
        client.predict([handle_file(photos / "astronaut.jpg")], "?!", api_name="/save_identity")


# ----- without weights: `lynx serve` as a subprocess --------------------------------------------------------
def start_command(*args, cwd, env):
    proc = subprocess.Popen([sys.executable, "-m", "lynx", *map(str, args)], cwd=cwd, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO), **env})
    lines, end = [], time.time() + 120
    while time.time() < end:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if ": open http://" in line:
            # Keep draining stderr so the server never blocks on a full pipe.
            threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
            return proc, line.split("open ", 1)[1].split()[0], lines
    proc.kill()
    raise AssertionError("the server did not start:\n" + "".join(lines))


def stop(proc, log, how=signal.SIGINT):
    proc.send_signal(how)
    assert proc.wait(30) == 0, "".join(log)
    assert "Traceback" not in "".join(log)


def test_serve_without_weights_says_what_to_download_and_checks_faces(photos, tmp_path, browser, screenshots):
    proc, url, log = start_command("serve", "--port", "0", "--out-dir", tmp_path / "out", "--face-models",
                                   tmp_path / "face", "--detector", "dlib", "--max-upload-mb", "30", cwd=tmp_path,
                                   env={"LYNX_MODELS": str(tmp_path / "models")})
    try:
        assert url.startswith("http://127.0.0.1:")
        client = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
        status, missing, _ = client.predict(api_name="/status")
        assert status.startswith("**Weights missing**") and missing["visible"]
        text = missing["value"]
        assert "hf download Wan-AI/Wan2.1-T2V-14B-Diffusers --local-dir" in text
        assert "hf download ByteDance/lynx --include 'lynx_full/*'" in text
        assert str(tmp_path / "models" / "Wan2.1-T2V-14B-Diffusers") in text
        assert "recognition_arcface_ir_se50.pth" in text and str(tmp_path / "face") in text

        # The face check needs no download: the box and the reference crop still come.
        gallery, report = client.predict([handle_file(photos / "astronaut.jpg")], api_name="/check_faces")
        assert len(gallery) == 2 and Image.open(gallery[1]["image"]).size == (256, 256)
        assert "1 face(s) found" in report and "a video also needs the face embedding" in report
        assert "recognition_arcface_ir_se50.pth" in report
        # --max-upload-mb 30 takes a photo above the default 25 MB (noise: PNG cannot shrink it).
        noise = np.random.default_rng(0).integers(0, 256, (3000, 3000, 3), np.uint8)
        Image.fromarray(noise).save(tmp_path / "big.png", compress_level=1)
        assert (tmp_path / "big.png").stat().st_size > 25 << 20
        _, report = client.predict([handle_file(tmp_path / "big.png")], api_name="/check_faces")
        assert report.startswith("- **big.png**: no face found in big.png"), report

        with pytest.raises(AppError) as caught:
            client.predict(photos=[handle_file(photos / "astronaut.jpg")], person="", prompt="a woman smiling",
                           **TINY, api_name="/generate")
        assert "hf download Wan-AI/Wan2.1-T2V-14B-Diffusers" in str(caught.value)

        if browser is not None:  # and the page shows the same instructions
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_text("What to download, and where").wait_for(timeout=60_000)
            assert "hf download Wan-AI/Wan2.1-T2V-14B-Diffusers" in page.inner_text("body")
            page.screenshot(path=screenshots / "web-missing.png", full_page=True)
            page.close()
    finally:
        stop(proc, log, signal.SIGTERM)  # as systemd or docker stop it
    assert "cannot generate yet" in "".join(log)


def test_sigterm_during_a_run_stops_the_server_and_leaves_no_empty_video(tiny_base, adapter_dirs, face_models,
                                                                       photos, tmp_path):
    """A real `lynx serve` with a run under way (its output name claimed as a 0-byte file) is sent SIGTERM, as
    systemd or `docker stop` would: it exits 0, without a traceback, and the claimed name is gone."""
    out = tmp_path / "out"
    proc, url, log = start_command("serve", "--port", "0", "--out-dir", out, "--base", tiny_base, "--adapter",
                                   adapter_dirs["full"], "--face-models", face_models, "--detector", "dlib",
                                   "--no-safety-check", cwd=tmp_path, env={})
    try:
        client = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
        client.submit(photos=[handle_file(photos / "astronaut.jpg")], person="", prompt="a long run",
                      **{**TINY, "height": 64, "width": 96, "num_frames": 9, "num_inference_steps": 200},
                      api_name="/generate")
        claimed = wait_for(lambda: [p for p in out.glob("*.mp4") if p.stat().st_size == 0], "a claimed name", 120)
    finally:
        stop(proc, log, signal.SIGTERM)
    assert claimed and not any(p.exists() for p in claimed), "".join(log)
    assert not list(out.glob("*.mp4")) and not list(out.glob("*.json"))


def test_the_command_serve_records_names_each_file_absolute_and_once(tiny_base, adapter_dirs, face_models, tmp_path,
                                                                     monkeypatch):
    """`lynx serve` typed with relative paths: the model flags it adds to each record's command leave --base,
    --adapter, --dtype and --device to the record (which writes them resolved) and name every file absolute, so
    the command runs from any folder. (test_generate_writes_video... runs such a command end to end.)"""
    from lynx.apps.cli import build_parser
    from lynx.apps.web.cli import model_flags

    monkeypatch.chdir(tmp_path)
    rel = lambda p: os.path.relpath(p, tmp_path)  # noqa: E731
    lora = tmp_path / "sub" / "x.gguf"
    args = build_parser().parse_args(["serve", "--base", rel(tiny_base), "--adapter", rel(adapter_dirs["full"]),
                                      "--face-models", rel(face_models), "--base-transformer", "sub/x.gguf",
                                      "--dtype", "fp32", "--device", "cpu", "--detector", "dlib"])
    flags = model_flags(args)
    assert not {"--base", "--adapter", "--dtype", "--device"} & set(flags), flags
    assert flags[flags.index("--face-models") + 1] == str(face_models.resolve())
    assert flags[flags.index("--base-transformer") + 1] == str(lora)
    app = LynxWebApp(ServeConfig(base=tiny_base, adapter=adapter_dirs["full"], out_dir=tmp_path / "out",
                                 face_models=rel(face_models), detector="dlib", model_flags=flags))
    command = app.command_flags()
    assert command.count("--face-models") == 1 and command.count("--detector") == 1, command


# ----- the page in a real browser ---------------------------------------------------------------------------
def test_page_checks_a_photo_generates_and_plays_the_video(web, photos, browser, screenshots):
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium): the page was not opened")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(web.url)
    page.wait_for_selector("#generate")
    page.set_input_files("#photos input[type=file]", [str(photos / "astronaut.jpg")])
    page.wait_for_selector("#face-report >> text=1 face(s) found", timeout=60_000)
    assert page.locator("#faces img").count() == 2
    page.screenshot(path=screenshots / "web-face-check.png", full_page=True)

    page.fill("#prompt textarea", "a woman walks on the beach")
    page.get_by_role("button", name=re.compile(r"^Settings")).click()
    for label, value in {"Frames": 5, "Height": 32, "Width": 48, "Steps": 3, "Seed": 11}.items():
        page.get_by_label(label, exact=True).fill(str(value))
    assert page.get_by_label("Text guidance", exact=True).input_value() == "5"  # the variant's defaults

    # Hold the video after step 2 so the live progress can be seen, then let it finish.
    gate = threading.Event()
    web.on_step = lambda run: gate.wait(60) if run.step == 2 else None
    try:
        page.click("#generate")
        page.wait_for_selector("#progress >> text=/step 2 of 3, .* s per step/", timeout=60_000)
        page.screenshot(path=screenshots / "web-progress.png", full_page=True)
    finally:
        gate.set()
        web.on_step = lambda run: None
    page.wait_for_selector("#progress >> text=done in", timeout=60_000)
    video = page.wait_for_selector("#result-video video", timeout=60_000)
    page.wait_for_function("v => v.readyState >= 2", arg=video, timeout=30_000)
    assert video.evaluate("v => [v.videoWidth, v.videoHeight]") == [48, 32]
    played = video.evaluate("v => new Promise(done => { v.muted = true; v.currentTime = 0; "
                            "v.addEventListener('timeupdate', () => done(v.currentTime), {once: true}); v.play(); })")
    assert played > 0 and video.evaluate("v => v.played.length") >= 1
    name = "person-a-woman-walks-on-the-beach-s11.mp4"
    assert name in page.inner_text("#result-settings") and (web.out_dir / name).is_file()
    assert "lynx generate --image" in page.inner_text("body")
    page.wait_for_function(f"() => document.querySelector('#gallery').innerText.includes({json.dumps(name)})",
                           timeout=30_000)
    page.screenshot(path=screenshots / "web-result.png", full_page=True)
    for shot in screenshots.glob("web-*.png"):
        assert Image.open(shot).size[0] == 1400
    page.close()
