"""The `lynx` command run as a subprocess on tiny saved models: videos, sidecars, refusals and messages."""

import contextlib
import io
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lynx.apps.cli import main, output_path
from lynx.errors import InputError
from lynx.io.video import read_video

TINY = ["--height", "32", "--width", "48", "--frames", "9", "--steps", "2"]


REPO = Path(__file__).resolve().parent.parent


def lynx(*args, cwd=None, env=None):
    # PYTHONPATH: this checkout's package, whatever the working directory (and an installed copy) would give.
    return subprocess.run([sys.executable, "-m", "lynx", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=300)


def run_command(*args) -> subprocess.CompletedProcess:
    """`lynx ARGS` in this process, its exit code, stdout and stderr captured as a subprocess's would be: for
    refusals, which end before any model loads (a subprocess spends seconds importing torch and diffusers).
    Tests that load models or exercise the process itself (signals, exit paths) run the real command."""
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's refusals
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(["lynx", *argv], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def identity_files(tmp_path_factory, face_embedding, reference_crop):
    d = tmp_path_factory.mktemp("identity")
    np.save(d / "emb.npy", face_embedding)
    Image.fromarray(reference_crop).save(d / "crop.png")
    return d / "emb.npy", d / "crop.png"


def test_generate_full_mp4_with_sidecar(tiny_base, adapter_dirs, identity_files, tmp_path):
    emb, crop = identity_files
    out = tmp_path / "out" / "clip.mp4"
    r = lynx("generate", "--embedding", emb, "--reference", crop, "--prompt", "a man walks on the beach",
             "--base", tiny_base, "--adapter", adapter_dirs["full"], "--out", out, "--seed", 5, *TINY)
    assert r.returncode == 0, r.stderr
    assert "2/2" in r.stderr  # the denoising progress bar
    frames, fps = read_video(out)
    assert frames.shape == (9, 32, 48, 3) and fps == 16
    import av

    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
    meta = json.loads((tmp_path / "out" / "clip.mp4.json").read_text())
    assert meta["prompt"] == "a man walks on the beach" and meta["seed"] == 5 and meta["variant"] == "full"
    assert (meta["num_frames"], meta["height"], meta["width"], meta["fps"]) == (9, 32, 48, 16)
    assert meta["guidance_scale"] == 5.0 and meta["guidance_scale_i"] == 2.0
    assert meta["versions"]["diffusers"].startswith("0.42") and meta["adapter"].endswith("lynx_full")

    # The same seed reproduces the same video (decoded frames identical), under a memory preset too: block-level
    # group offloading with the CPU as the onload device moves nothing, so every number is the same.
    again = tmp_path / "again.mp4"
    r = lynx("generate", "--embedding", emb, "--reference", crop, "--prompt", "a man walks on the beach",
             "--base", tiny_base, "--adapter", adapter_dirs["full"], "--out", again, "--seed", 5,
             "--memory", "24gb-blocks", *TINY)
    assert r.returncode == 0 and "memory preset 24gb-blocks" in r.stderr, r.stderr
    assert np.array_equal(read_video(again)[0], frames)

    # An existing output is never overwritten without --overwrite.
    before = out.read_bytes()
    r = lynx("generate", "--embedding", emb, "--reference", crop, "--prompt", "other", "--base", tiny_base,
             "--adapter", adapter_dirs["full"], "--out", out, *TINY)
    assert r.returncode == 2 and "already exists; pass --overwrite" in r.stderr and out.read_bytes() == before


def test_generate_lite_webp_at_24_fps(tiny_base, adapter_dirs, identity_files, tmp_path):
    emb, _ = identity_files
    r = lynx("generate", "--embedding", emb, "--prompt", "a woman dancing in rain", "--base", tiny_base,
             "--adapter", adapter_dirs["lite"], "--out-dir", tmp_path, "--format", ".webp", "--offload",
             "--vae-tiling", *TINY)
    assert r.returncode == 0, r.stderr
    path = tmp_path / "emb-a-woman-dancing-in-rain-s42.webp"
    assert r.stdout.strip().endswith(path.name)
    with Image.open(path) as im:
        im.load()  # Pillow fills in frame timing on load
        assert im.n_frames == 9 and im.size == (48, 32) and im.info["duration"] == round(1000 / 24)
    assert json.loads((tmp_path / (path.name + ".json")).read_text())["fps"] == 24


def test_missing_weights_say_what_to_download(tmp_path):
    # The README's main command on a machine with no weights: every download is listed at once.
    photo = Path(__file__).parent.parent / "assets" / "astronaut.jpg"
    r = lynx("generate", "--image", photo, "--prompt", "hi", cwd=tmp_path,
             env={"LYNX_MODELS": str(tmp_path / "models"), "LYNX_FACE_MODELS": str(tmp_path / "face")})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "recognition_arcface_ir_se50.pth" in r.stderr and str(tmp_path / "face") in r.stderr
    assert "hf download Wan-AI/Wan2.1-T2V-14B-Diffusers --local-dir" in r.stderr
    assert "hf download ByteDance/lynx --include 'lynx_full/*'" in r.stderr
    assert str(tmp_path / "models" / "Wan2.1-T2V-14B-Diffusers") in r.stderr


def test_every_command_prints_its_help():
    # argparse %-formats help texts: one "60% of the steps" among the settings made `lynx generate --help` raise.
    import argparse

    from lynx.apps.cli import build_parser

    commands = next(a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in ["", *commands]:
        r = lynx(*([name] if name else []), "--help")
        assert r.returncode == 0 and r.stderr == "" and "usage: lynx" in r.stdout, (name, r.stderr[-500:])
    assert "the first 60% of the steps" in lynx("generate", "--help").stdout


@pytest.mark.parametrize("extra,message", [
    (["--frames", "10"], "--frames 10 is not 4k+1"),
    (["--out", "x.avi"], "must end in .mp4, .webp or .gif"),
    (["--prompt", "@/nonexistent/prompt.txt"], "prompt file /nonexistent/prompt.txt does not exist"),
    (["--memory", "huge"], "invalid choice: 'huge'"),
    (["--offload", "--memory", "12gb"], "--offload is the 48gb preset; give either --offload or --memory 12gb"),
])
def test_bad_arguments_get_clear_errors(tiny_base, adapter_dirs, identity_files, tmp_path, extra, message):
    emb, crop = identity_files
    args = ["--embedding", emb, "--reference", crop, "--prompt", "hi", "--base", tiny_base,
            "--adapter", adapter_dirs["full"], "--out-dir", tmp_path, *extra]
    r = lynx("generate", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not any(line.startswith("loading ") for line in r.stderr.splitlines())  # refused before any model loads


def test_names_from_inputs_stay_inside_the_output_dir(tmp_path):
    args = Namespace(out=None, out_dir=str(tmp_path), image=["../../../etc/passwd"], identity=None,
                     prompt="../../x/../y", seed=1, format=".mp4", overwrite=False)
    path = output_path(args)
    assert path.parent == tmp_path and path.name == "passwd-x-y-s1.mp4"
    args.out = str(tmp_path / "exists.mp4")
    (tmp_path / "exists.mp4").write_bytes(b"keep")
    with pytest.raises(InputError, match="already exists"):
        output_path(args)


def test_info_reports_models_and_problems(tiny_base, adapter_dirs, tmp_path):
    r = lynx("info", "--base", tiny_base, "--adapter", adapter_dirs["full"], adapter_dirs["lite"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "transformer: 4 blocks, 2 heads x 12 = 24 wide" in r.stdout
    assert "variant full: ID branch on 4 blocks" in r.stdout and "variant lite: ID branch on 2 blocks" in r.stdout
    r = lynx("info", "--base", tmp_path / "none")
    assert r.returncode == 1 and "does not exist" in r.stdout and "hf download" in r.stdout
    # Files where the model folders go: said so, with no download offered over them.
    (tmp_path / "a-file").write_text("not a folder")
    r = lynx("info", "--base", tmp_path / "a-file", "--adapter", tmp_path / "a-file")
    assert r.returncode == 1 and r.stdout.count(f"problem: {tmp_path}/a-file is a file, not a folder") == 2, r.stdout
    assert "does not exist" not in r.stdout and "hf download ByteDance" not in r.stdout and "Wan-AI" not in r.stdout


def test_info_reports_missing_adapters_with_downloads_to_the_folders_given(tiny_base, tmp_path):
    # No adapters where the defaults point: missing, exit 1, and only the adapters to download (the base is fine).
    r = lynx("info", "--base", tiny_base, env={"LYNX_MODELS": str(tmp_path / "models")})
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"adapter: none found ({tmp_path}/models/lynx_full or {tmp_path}/models/lynx_lite)" in r.stdout
    assert f"hf download ByteDance/lynx --include 'lynx_full/*' --local-dir {tmp_path}/models\n" in r.stdout
    assert "Wan-AI/Wan2.1-T2V-14B-Diffusers" not in r.stdout
    # A folder of the user's own naming: the download goes into it (hf makes lynx_full/ there), and --adapter
    # then names that subfolder; not the folder's parent, where the files would never reach it.
    r = lynx("info", "--base", tiny_base, "--adapter", tmp_path / "my-adapters")
    assert r.returncode == 1 and f"problem: {tmp_path}/my-adapters does not exist" in r.stdout, r.stdout
    assert f"--include 'lynx_full/*' --local-dir {tmp_path}/my-adapters\n" in r.stdout
    assert f"so that {tmp_path}/my-adapters/lynx_full holds" in r.stdout
    assert f"pass --adapter {tmp_path}/my-adapters/lynx_full" in r.stdout
    # generate says the same (the loader's own instructions, shared by every front end).
    r = lynx("generate", "--prompt", "x", "--embedding", tmp_path / "e.npy", "--base", tiny_base, "--adapter",
             tmp_path / "my-adapters", "--no-safety-check")
    assert r.returncode == 2 and f"--local-dir {tmp_path}/my-adapters\n" in r.stderr, r.stderr
    assert f"pass --adapter {tmp_path}/my-adapters/lynx_full" in r.stderr


def test_face_checks_every_output_before_a_face_model_runs(face_models, photos, tmp_path):
    """The photo is a cat: a face model that ran would refuse it (no face), so a refusal naming the output shows
    the outputs were checked first. Nothing is written."""
    cat = photos / "cat.jpg"
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "out"
    (out / "cat.identity").mkdir(parents=True)
    (out / "cat-reference256.png").write_bytes(b"an earlier crop")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "cat.jpg").write_bytes(cat.read_bytes())
    no_arcface = ("--face-models", tmp_path / "empty")
    for more_photos, args, message in [
        ((), ("--out-dir", tmp_path / "a-file"), f"--out-dir {tmp_path}/a-file/cat.identity: {tmp_path}/a-file is a "
                                                 "file, not a folder"),
        ((), ("--out-dir", out), f"{out}/cat.identity is a folder where the identity goes"),
        ((), ("--out-dir", out, *no_arcface), f"{out}/cat-reference256.png already exists; pass --overwrite"),
        ((tmp_path / "other" / "cat.jpg",), ("--out-dir", tmp_path / "new", *no_arcface),
         "would both be written to " + str(tmp_path / "new" / "cat-arcface112.png")),
    ]:
        r = lynx("face", cat, *more_photos, "--face-models", face_models, "--detector", "dlib", *args)
        assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stdout + r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["cat-reference256.png", "cat.identity"]
    assert not (tmp_path / "new").exists()


def test_a_prompt_starting_with_at_is_written_and_read_back_as_text(tiny_base, adapter_dirs, identity_files,
                                                                    tmp_path):
    """`--prompt @x` reads the file x, so the sidecar's command writes the prompt "@home, a man" as "@@home, a man",
    which generate reads back as the text; running that command makes the same prompt again."""
    import shlex

    emb, crop = identity_files
    r = lynx("generate", "--embedding", emb, "--reference", crop, "--prompt", "@@home, a man", "--base", tiny_base,
             "--adapter", adapter_dirs["full"], "--out", tmp_path / "a.mp4", *TINY)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "a.mp4.json").read_text())
    argv = shlex.split(meta["command"])
    assert meta["prompt"] == "@home, a man" and argv[argv.index("--prompt") + 1] == "@@home, a man"
    argv[argv.index("--out") + 1] = str(tmp_path / "b.mp4")
    r = lynx(*argv[1:])
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "b.mp4.json").read_text())["prompt"] == "@home, a man"


def test_the_sidecar_command_names_model_files_by_absolute_path(tiny_base, adapter_dirs, identity_files, tmp_path):
    """Paths typed relative to the folder generate ran in are written absolute: the command runs from any folder."""
    import shlex

    from test_lora import write_layout

    emb, crop = identity_files
    work = tmp_path / "work"
    work.mkdir()
    write_layout(work / "style.safetensors", "kohya")
    r = lynx("generate", "--embedding", emb, "--reference", crop, "--prompt", "a man walks", "--base", tiny_base,
             "--adapter", adapter_dirs["full"], "--out", tmp_path / "a.mp4", "--lora", "style.safetensors:0.5",
             "--face-models", "faces", "--safety-model", "nsfw", *TINY, cwd=work)
    assert r.returncode == 0, r.stderr
    argv = shlex.split(json.loads((tmp_path / "a.mp4.json").read_text())["command"])
    value = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
    assert value("--lora") == f"{work}/style.safetensors:0.5"
    assert value("--face-models") == f"{work}/faces" and value("--safety-model") == f"{work}/nsfw"
    argv[argv.index("--out") + 1] = str(tmp_path / "b.mp4")
    r = lynx(*argv[1:], cwd=tmp_path)  # another folder
    assert r.returncode == 0, r.stderr
    assert np.array_equal(read_video(tmp_path / "b.mp4")[0], read_video(tmp_path / "a.mp4")[0])
