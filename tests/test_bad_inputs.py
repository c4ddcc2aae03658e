"""Bad input, refused up front: a table of mistakes through `lynx generate` and through Python.

Each CLI case runs `python -m lynx generate ...` as a process of its own and must exit 2 with one line on stderr
(no traceback), leave the output and input folders exactly as they were, and fail before the model loads: the
command prints `loading ...` just before it loads one (a correct command in the same table shows it does), so a
lone error line is the order of events, not a timing. The command imports torch and diffusers only when a check
needs them, so a mistyped setting is refused in a fraction of a second. Python cases must raise a `LynxError`
before the transformer runs. Then: strict JSON sidecars, and a failed encode that leaves nothing.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL
from PIL import Image

from lynx import LynxPipeline
from lynx.errors import LynxError, OutputError
from lynx.io.safety import unchecked
from lynx.pipelines.record import GenerationRecord, make_record, read_record, write_video
from lynx.pipelines.settings import GenerationSettings

REPO = Path(__file__).resolve().parent.parent
TINY = ["--height", "32", "--width", "48", "--frames", "9", "--steps", "2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_base, face_embedding, reference_crop):
    d = tmp_path_factory.mktemp("inputs")
    shutil.copytree(tiny_base, d / "bad-base")
    (d / "bad-base" / "transformer" / "config.json").write_text('{"num_layers": ')  # cut off mid-download
    np.save(d / "emb.npy", face_embedding)
    np.save(d / "short.npy", face_embedding[:10])
    np.save(d / "nan.npy", np.full(512, np.nan, np.float32))
    np.save(d / "text.npy", np.array(["a"] * 512))
    Image.fromarray(reference_crop).save(d / "crop.png")
    Image.fromarray(reference_crop).save(d / "photo.jpg")
    Image.fromarray(reference_crop[:100, :80]).save(d / "small.png")
    (d / "a-file").write_text("not a folder")
    (d / "latin1.txt").write_bytes("un caf\xe9 au soleil".encode("latin-1"))
    from safetensors.torch import save_file

    save_file({"blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 24)}, str(d / "lora.safetensors"))
    (d / "cut.safetensors").write_bytes((d / "lora.safetensors").read_bytes()[:-100])  # an interrupted download
    (d / "junk.safetensors").write_text("<html>404 Not Found</html>")
    return d


def _has_flash_attn() -> bool:
    from diffusers.models.attention_dispatch import _CAN_USE_FLASH_ATTN

    return bool(_CAN_USE_FLASH_ATTN)


# (case id, extra arguments, the expected message: a text its one line holds, or a tuple of texts the error holds,
# "!"-prefixed for texts it must not hold; ids in PARAGRAPHS may take several lines, a download per paragraph).
# `{in}` is the inputs folder, `{out}` the output folder (made fresh per case, with an earlier video and sidecar in
# it). Arguments replace the defaults (`--embedding`, `--reference`, `--out-dir`) when they name the same flag.
CASES = [
    ("fps-negative", ["--fps", "-5"], "--fps -5 must be between 1 and 240 (try 1)"),
    ("fps-zero", ["--fps", "0"], "--fps 0 must be between 1 and 240 (try 1)"),
    ("fps-high", ["--fps", "1000"], "--fps 1000 must be between 1 and 240 (try 240)"),
    ("fps-fraction", ["--fps", "2.5"], "--fps 2.5 must be a whole number (try 2 or 3)"),
    ("fps-text", ["--fps", "fast"], "--fps fast must be a whole number, not str"),
    ("guidance-inf", ["--guidance", "inf"], "--guidance inf must be a finite number"),
    ("guidance-nan", ["--guidance", "nan"], "--guidance nan must be a finite number"),
    ("guidance-negative", ["--guidance", "-1"], "--guidance -1 must be at least 0"),
    ("guidance-i-nan", ["--guidance-i", "nan"], "--guidance-i nan must be a finite number"),
    ("guidance-i-word", ["--guidance-i", "default"], "--guidance-i default must be a number (three-way guidance)"),
    ("ip-scale-nan", ["--ip-scale", "nan"], "--ip-scale nan must be a finite number"),
    ("ip-scale-inf", ["--ip-scale=-inf"], "--ip-scale -inf must be a finite number"),
    ("ref-scale-negative", ["--ref-scale", "-0.5"], "--ref-scale -0.5 must be at least 0 (try 0)"),
    ("seed-negative", ["--seed", "-1"], "--seed -1 must be in [0, 2**63) (try 0)"),
    ("seed-huge", ["--seed", str(2**63)], f"--seed {2**63} must be in [0, 2**63) (try {2**63 - 1})"),
    ("seed-fraction", ["--seed", "1.5"], "--seed 1.5 must be a whole number (try 1 or 2)"),
    ("steps-zero", ["--steps", "0"], "--steps 0 must be at least 1 (try 1)"),
    ("steps-fraction", ["--steps", "2.5"], "--steps 2.5 must be a whole number (try 2 or 3)"),
    ("steps-huge", ["--steps", "1000000"], "--steps 1000000 is above the limit of 200 (try 200, or pass "
                                           "--allow-large"),
    ("steps-zero-large", ["--steps", "0", "--allow-large"], "--steps 0 must be at least 1"),
    ("frames-zero", ["--frames", "0"], "invalid video size: --frames 0 is not 4k+1 (try 1 or 5)"),
    ("frames-not-4k1", ["--frames", "10"], "invalid video size: --frames 10 is not 4k+1 (try 9 or 13)"),
    ("frames-huge", ["--frames", "1001"], "invalid video size: --frames 1001 is above the limit of 241"),
    ("height-odd", ["--height", "30"], "invalid video size: --height 30 is not a positive multiple of 16"),
    ("width-zero", ["--width", "0"], "invalid video size: --width 0 is not a positive multiple of 16"),
    ("height-text", ["--height", "tall"], "--height tall must be a whole number, not str"),
    ("size-together", ["--frames", "6", "--width", "20"], "invalid video size: --frames 6 is not 4k+1 (try 5 or 9); "
                                                          "--width 20 is not a positive multiple of 16"),
    ("embedding-photo", ["--embedding", "{in}/photo.jpg"], "--embedding {in}/photo.jpg is not a NumPy .npy file"),
    ("embedding-short", ["--embedding", "{in}/short.npy"], "--embedding {in}/short.npy must hold 512 finite numbers"),
    ("embedding-nan", ["--embedding", "{in}/nan.npy"], "--embedding {in}/nan.npy must hold 512 finite numbers"),
    ("embedding-text", ["--embedding", "{in}/text.npy"], "--embedding {in}/text.npy must hold 512 finite numbers"),
    ("embedding-missing", ["--embedding", "{in}/none.npy"], "--embedding: input file {in}/none.npy does not exist"),
    ("embedding-folder", ["--embedding", "{in}/bad-base"], "--embedding: {in}/bad-base is a folder, not a file"),
    ("reference-missing", ["--reference", "{in}/none.png"], "--reference: input file {in}/none.png does not exist"),
    ("reference-folder", ["--reference", "{in}/bad-base"], "--reference: {in}/bad-base is a folder, not a file"),
    ("reference-small", ["--reference", "{in}/small.png"], "--reference {in}/small.png is 80x100; it must be the "
                                                           "256x256 aligned face crop"),
    ("reference-absent", ["--reference", ""], "also need --reference CROP.png, the 256x256 aligned face crop"),
    ("reference-not-image", ["--reference", "{in}/emb.npy"], "--reference {in}/emb.npy is not an image file"),
    ("device-bogus", ["--device", "toaster"], "--device toaster is not a device name"),
    ("device-absent", ["--device", "cuda:99"], "--device cuda:99: this machine has" if torch.cuda.is_available()
     else "--device cuda:99: CUDA is not available on this machine"),
    ("attention-bogus", ["--attention-backend", "bogus"], "--attention-backend bogus is not a diffusers attention "
                                                          "backend"),
    ("dtype-bogus", ["--dtype", "fp8"], "lynx generate: error: argument --dtype: invalid choice"),
    ("out-is-folder", ["--out", "{out}/folder.mp4"], "--out {out}/folder.mp4 is a folder"),
    ("out-under-file", ["--out", "{in}/a-file/x.mp4"], "--out {in}/a-file/x.mp4: {in}/a-file is a file"),
    ("out-dir-is-file", ["--out-dir", "{in}/a-file"], ("--out-dir {in}/a-file/", ": {in}/a-file is a file, not a "
                                                                                 "folder")),
    ("out-suffix", ["--out", "{out}/x.avi"], "--out must end in .mp4, .webp or .gif"),
    ("out-exists", ["--out", "{out}/old.mp4"], "{out}/old.mp4 already exists; pass --overwrite"),
    ("sidecar-exists", ["--out", "{out}/lone.mp4"], "{out}/lone.mp4.json already exists; pass --overwrite"),
    ("sidecar-is-folder", ["--out", "{out}/boxed.mp4", "--overwrite"], "{out}/boxed.mp4.json is a folder, but the "
                                                                       "video's record (sidecar) is written there"),
    ("lora-missing", ["--lora", "{in}/none.safetensors"], "--lora: input file {in}/none.safetensors does not exist"),
    ("lora-folder", ["--lora", "{in}/bad-base"], "--lora: {in}/bad-base is a folder, not a file"),
    ("lora-not-safetensors", ["--lora", "{in}/junk.safetensors"], "--lora {in}/junk.safetensors is not a safetensors "
                                                                  "file"),
    ("lora-cut-short", ["--lora", "{in}/cut.safetensors"], "--lora {in}/cut.safetensors is cut short"),
    ("lora-not-a-checkpoint", ["--lora", "{in}/photo.jpg"], "--lora {in}/photo.jpg is neither a safetensors file nor "
                                                            "a PyTorch checkpoint"),
    ("lora-scale-word", ["--lora", "{in}/lora.safetensors:abc"], ("--lora {in}/lora.safetensors:abc: the scale 'abc' "
                                                                  "is not a number", "!does not exist")),
    ("lora-scale-nan", ["--lora", "{in}/lora.safetensors:nan"], "the scale nan is not a finite number"),
    ("context-overlap-default", ["--frames", "17", "--context-frames", "9"], "--context-frames 9 is too short for "
                                                                            "the default --context-overlap 16"),
    ("base-is-file", ["--base", "{in}/a-file"], ("--base {in}/a-file is a file, not a folder", "!does not exist")),
    ("adapter-is-file", ["--adapter", "{in}/a-file"], ("--adapter {in}/a-file is a file, not a folder",
                                                       "!not found")),
    ("prompt-empty", ["--prompt", "  "], "--prompt is empty"),
    ("prompt-file-missing", ["--prompt", "@{in}/none.txt"], "prompt file {in}/none.txt does not exist"),
    ("prompt-file-folder", ["--prompt", "@{in}/bad-base"], "prompt file {in}/bad-base is a folder, not a file"),
    ("prompt-file-latin1", ["--prompt", "@{in}/latin1.txt"], "prompt file {in}/latin1.txt is not UTF-8 text (byte 7 "
                                                             "is not); save it as UTF-8"),
    ("two-people", ["--identity", "{in}/emb.npy"], "give the person with exactly one of"),
    ("unknown-flag", ["--guidence", "3"], "lynx: error: unrecognized arguments: --guidence 3"),
    ("variant-bogus", ["--variant", "medium"], "lynx generate: error: argument --variant: invalid choice"),
    ("weights-missing", ["--base", "{in}/no-base"], ("The Wan2.1-T2V base model was not found at {in}/no-base",
                                                      "hf download Wan-AI/Wan2.1-T2V-14B-Diffusers --local-dir "
                                                      "{in}/no-base")),
    ("base-config-corrupt", ["--base", "{in}/bad-base"], (
        "The Wan2.1-T2V base model at {in}/bad-base is incomplete or damaged", "transformer/config.json is not "
        "valid JSON", "--include 'transformer/*' --local-dir {in}/bad-base", "!ByteDance/lynx")),
]
PARAGRAPHS = {"weights-missing", "base-config-corrupt"}
if not torch.cuda.is_available():
    CASES.append(("cuda-absent", ["--device", "cuda"], "--device cuda: CUDA is not available on this machine"))
if not _has_flash_attn():
    CASES.append(("attention-flash-absent", ["--attention-backend", "flash"], "--attention-backend flash cannot "
                                                                              "run here"))


def _argv(extra, tiny_base, adapter, inputs, out):
    fill = lambda a: a.replace("{in}", str(inputs)).replace("{out}", str(out))  # noqa: E731
    extra = [fill(a) for a in extra]
    given = {a for a in extra if a.startswith("--")}
    defaults = {"--embedding": str(inputs / "emb.npy"), "--reference": str(inputs / "crop.png"),
                "--prompt": "a man walks", "--base": str(tiny_base), "--adapter": str(adapter),
                "--out-dir": str(out)}
    argv = ["generate"]
    for flag, value in defaults.items():
        if flag not in given:
            argv += [flag, value]
    return argv + TINY + extra, fill


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _output_folder(tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.mp4").write_bytes(b"an earlier video")
    (out / "old.mp4.json").write_text("{}")
    (out / "lone.mp4.json").write_text("{}")  # a sidecar whose video was deleted
    (out / "folder.mp4").mkdir()
    (out / "folder.mp4" / "inside").write_text("kept")
    (out / "boxed.mp4.json").mkdir()  # where a video's sidecar would go
    (out / "boxed.mp4.json" / "inside").write_text("kept")
    return out


def _lynx(argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "lynx", *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def runs(tiny_base, adapter_dirs, files, tmp_path_factory):
    """Every case of the table as `python -m lynx generate ...` in a process of its own, three at a time (each
    waits mostly on imports); plus one correct command on the same inputs, which must load and write a video."""
    cases = {"control-correct": ([], None), **{c[0]: (c[1], c[2]) for c in CASES}}
    before_inputs = _snapshot(files)
    jobs = {}
    for case_id, (extra, message) in cases.items():
        out = _output_folder(tmp_path_factory.mktemp(case_id))
        argv, fill = _argv(extra, tiny_base, adapter_dirs["full"], files, out)
        jobs[case_id] = (argv, fill, out, _snapshot(out), message)
    with ThreadPoolExecutor(3) as pool:
        done = dict(zip(jobs, pool.map(lambda job: _lynx(job[0]), jobs.values())))
    return {case_id: (done[case_id], *jobs[case_id][1:]) for case_id in jobs}, before_inputs, files


def test_a_correct_command_announces_loading_and_writes_the_video(runs):
    """The control that gives the table its meaning: `loading ...` is printed just before the model loads."""
    r, _, out, before, _ = runs[0]["control-correct"]
    assert r.returncode == 0, r.stderr
    assert any(line.startswith("loading ") for line in r.stderr.splitlines()), r.stderr
    written = Path(r.stdout.strip().splitlines()[-1])
    assert written.parent == out and written.stat().st_size > 0
    assert set(_snapshot(out)) == set(before) | {written.name, written.name + ".json"}


@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_cli_refuses_in_one_line_before_loading(runs, case_id):
    """Exit 2, nothing on stdout, one line on stderr and nothing else: no traceback, and no `loading ...` line, so
    the refusal came before any model loaded (the order of events, not a timing); the folders as they were."""
    assert len(CASES) >= 40
    results, before_inputs, inputs = runs
    r, fill, out, before, message = results[case_id]
    err = r.stderr
    lines = err.strip().splitlines()
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, err)
    assert "Traceback" not in err and lines and not any(line.startswith("loading ") for line in lines), err
    assert lines[0].startswith("lynx generate: error: ") or lines[0].startswith("lynx: error: ")
    assert len(lines) == 1 or case_id in PARAGRAPHS, err
    for text in (message,) if isinstance(message, str) else message:
        assert (fill(text.removeprefix("!")) in err) != text.startswith("!"), (text, err)
    assert _snapshot(out) == before and _snapshot(inputs) == before_inputs


def test_serve_refuses_a_port_out_of_range():
    r = _lynx(["serve", "--port", "99999"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("lynx serve: error: argument --port: 99999 is not a port number (0 to 65535; "
                                "0 picks a free port) (see lynx serve --help)")


# ----- Python: the same mistakes as keyword arguments -------------------------------------------------------
@pytest.fixture(scope="module")
def full(tiny_base, adapter_dirs):
    return LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["full"])


# (keyword arguments, start of the LynxError's message); "{in}" is the inputs folder.
PY_CASES = [
    (dict(guidance_scale=float("inf")), "guidance_scale=inf must be a finite number"),
    (dict(guidance_scale=float("nan")), "guidance_scale=nan must be a finite number"),
    (dict(guidance_scale=-1), "guidance_scale=-1 must be at least 0 (try 0)"),
    (dict(guidance_scale_i=float("nan")), "guidance_scale_i=nan must be a finite number"),
    (dict(guidance_scale_i=float("inf")), "guidance_scale_i=inf must be a finite number"),
    (dict(guidance_scale_i="default"), "guidance_scale_i='default' must be a number"),
    (dict(guidance_scale_2=2.0), "guidance_scale_2 is the low-noise expert's guidance; this base has one"),
    (dict(ip_scale=float("nan")), "ip_scale=nan must be a finite number"),
    (dict(ip_scale=float("inf")), "ip_scale=inf must be a finite number"),
    (dict(ref_scale=-1), "ref_scale=-1 must be at least 0 (try 0)"),
    (dict(ip_start=0.8, ip_end=0.2), "ip_start=0.8 is after ip_end=0.2"),
    (dict(ref_blocks="0-99"), "ref_blocks: '0-99' is outside the transformer's blocks 0-3"),
    (dict(num_inference_steps=2.5), "num_inference_steps=2.5 must be a whole number (try 2 or 3)"),
    (dict(num_inference_steps=0), "num_inference_steps=0 must be at least 1"),
    (dict(num_inference_steps=True), "num_inference_steps=True must be a whole number, not bool"),
    (dict(num_inference_steps=1000000), "num_inference_steps=1000000 is above the limit of 200 (try 200, or pass "
                                        "allow_large=True"),
    (dict(height="64"), "height='64' must be a whole number, not str"),
    (dict(height=0), "invalid video size: height=0 is not a positive multiple of 16"),
    (dict(width=20), "invalid video size: width=20 is not a positive multiple of 16 (try 16 or 32)"),
    (dict(num_frames=0), "invalid video size: num_frames=0 is not 4k+1"),
    (dict(num_frames=10), "invalid video size: num_frames=10 is not 4k+1 (try 9 or 13)"),
    (dict(num_frames=1001), "invalid video size: num_frames=1001 is above the limit of 241"),
    (dict(context_frames=10), "invalid video size: context_frames=10 is not 4k+1"),
    (dict(seed=-1), "seed=-1 must be in [0, 2**63)"),
    (dict(seed=2**64), f"seed={2**64} must be in [0, 2**63)"),
    (dict(seed=1.5), "seed=1.5 must be a whole number (try 1 or 2)"),
    (dict(fps=0), "fps=0 must be between 1 and 240"),
    (dict(fps=-5), "fps=-5 must be between 1 and 240 (try 1)"),
    (dict(fps=True), "fps=True must be a whole number, not bool"),
    (dict(face_index=-1), "face_index=-1 must be 0 or more"),
    (dict(negative_prompt=3), "negative_prompt=3 must be text, not int"),
    (dict(output_type="mp4"), "output_type must be 'np', 'pil' or 'latent'"),
    (dict(prompt=["a", "b"]), "prompt must be one string"),
    (dict(prompt=None), "give exactly one of prompt (text) or prompt_embeds"),
    (dict(face_embedding=np.zeros(10)), "face_embedding must be 512 finite numbers"),
    (dict(face_embedding=np.full(512, np.nan)), "face_embedding must be 512 finite numbers"),
    (dict(face_embedding=None), "give the person exactly one way"),
    (dict(reference_image="{in}/emb.npy"), "reference_image: {in}/emb.npy is not an image file"),
    (dict(reference_image=np.zeros((10, 10), np.uint8)), "reference_image must be the 256x256 aligned face crop"),
    (dict(generator=3), "generator must be a torch.Generator, not int (for a number, pass seed=)"),
    (dict(latents=torch.zeros(3)), "latents must be a tensor of shape [1, 16, 2, 4, 4] for these settings, not [3]"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs may only name"),
]


@pytest.mark.parametrize("kw,message", PY_CASES, ids=[",".join(c[0]) for c in PY_CASES])
def test_python_refuses_before_the_transformer_runs(full, face_embedding, reference_crop, files, monkeypatch, kw,
                                                    message):
    assert len(PY_CASES) >= 40
    calls = []
    monkeypatch.setattr(full, "predict", lambda *a, **k: calls.append(1) or pytest.fail("the transformer ran"))
    args = dict(prompt="a man walks", face_embedding=face_embedding, reference_image=reference_crop, **SMALL)
    kw = {k: v.replace("{in}", str(files)) if isinstance(v, str) else v for k, v in kw.items()}
    with pytest.raises(LynxError) as e:
        full(**{**args, **kw})
    message = message.replace("{in}", str(files))
    assert str(e.value).startswith(message) and "\n" not in str(e.value) and calls == []


@pytest.mark.parametrize("kw,message", [
    (dict(device="toaster"), "device='toaster' is not a device name (try cpu, cuda or cuda:0)"),
    (dict(device="cuda:99"), "device='cuda:99': this machine has" if torch.cuda.is_available() else
     "device='cuda:99': CUDA is not available on this machine"),
    (dict(experts="middle"), "experts must be one of high, both, not 'middle'"),
    (dict(transformer_file="{in}/emb.npy"), "{in}/emb.npy: a base transformer file must be a GGUF file (.gguf)"),
    (dict(base_dir="{in}/no-base"), "The Wan2.1-T2V base model was not found at {in}/no-base"),
    (dict(adapter="{in}/no-adapter"), "Adapter directory {in}/no-adapter not found."),
    (dict(), None),  # the control: correct arguments do reach the recorders
])
def test_from_pretrained_refuses_before_reading_a_weight(tiny_base, adapter_dirs, files, monkeypatch, kw, message):
    """Checked before any weight is read: the loaders are replaced by recorders that must not be called."""
    import transformers

    import lynx.pipelines.pipeline_lynx as module

    loads = []
    readers = ((module, "load_adapters"), (transformers.UMT5EncoderModel, "from_pretrained"),
               (module.AutoencoderKLWan, "from_pretrained"), (module.WanTransformer3DModel, "from_pretrained"))
    for owner, name in readers:
        monkeypatch.setattr(owner, name, lambda *a, name=name, **k: loads.append(name))
    fill = lambda v: v.replace("{in}", str(files)) if isinstance(v, str) else v  # noqa: E731
    args = {"base_dir": tiny_base, "adapter": adapter_dirs["full"], **{k: fill(v) for k, v in kw.items()}}
    if message is None:
        with pytest.raises(Exception):  # the recorders return no model, so the loading stops after them
            LynxPipeline.from_pretrained(**args)
        assert loads[:1] == ["load_adapters"] or "from_pretrained" in loads
        return
    with pytest.raises(LynxError) as e:
        LynxPipeline.from_pretrained(**args)
    assert str(e.value).startswith(fill(message)) and loads == []


def test_python_refuses_unknown_settings():
    with pytest.raises(LynxError, match="unknown setting 'steps'"):
        GenerationSettings(steps=3)


# ----- what is written: strict JSON, both files or neither ------------------------------------------------
def _record(video, **settings):
    return make_record(video, "a man walks", GenerationSettings(**settings).resolve("full"), variant="full",
                       base="base", adapter="adapter", dtype=torch.float32, device="cpu", source="python",
                       safety=unchecked("switched off"))


def test_sidecars_are_strict_json_and_bad_ones_are_skipped(tmp_path, caplog):
    frames = np.zeros((5, 16, 16, 3), np.uint8)
    video = write_video(frames, tmp_path / "a.mp4", _record(tmp_path / "a.mp4", seed=3))
    text = (tmp_path / "a.mp4.json").read_text()
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert record["seed"] == 3 and record["fps"] == 16 and record["provenance"]["seed"] == 3
    assert read_record(video) == GenerationRecord.from_json(text)
    assert "--seed 3" in record["command"] and record["command"].startswith("lynx generate")

    (tmp_path / "a.mp4.json").write_text(text.replace('"guidance_scale": 5.0', '"guidance_scale": NaN'))
    with caplog.at_level(logging.WARNING):
        assert read_record(video) is None
    assert "skipping" in caplog.text and "a.mp4.json" in caplog.text
    (tmp_path / "a.mp4.json").write_text("{")
    assert read_record(video) is None


def test_the_output_folder_is_proven_writable_with_room_before_any_work(tmp_path, monkeypatch):
    """No permission and a nearly full disk are refused up front (simulated: the suite may run as root, for whom
    every folder is writable, and on a disk of any size)."""
    import lynx.io.files as files_module
    from lynx.io.files import check_writable

    out = tmp_path / "out"
    out.mkdir()
    check_writable(out / "a.mp4")  # a writable folder with room passes
    real_access = os.access
    monkeypatch.setattr(files_module.os, "access", lambda p, mode: False if Path(p) == out else real_access(p, mode))
    with pytest.raises(OutputError) as e:
        check_writable(out / "sub" / "a.mp4", flag="--out-dir")
    assert str(e.value) == f"--out-dir {out}/sub/a.mp4: no permission to write in {out}"
    monkeypatch.undo()

    class Full:
        f_bavail, f_frsize = 256, 4096  # 1 MB left

    monkeypatch.setattr(files_module.os, "statvfs", lambda p: Full)
    with pytest.raises(OutputError) as e:
        check_writable(out / "a.mp4")
    assert str(e.value) == f"--out {out}/a.mp4: only 1 MB free in {out}"
    assert list(out.iterdir()) == []


def test_no_message_or_doc_names_huggingface_cli():
    """The installed huggingface_hub ships `hf`, not `huggingface-cli`: every download instruction says `hf`."""
    texts = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "lynx").rglob("*.py"))]
    assert len(texts) > 20
    assert [str(p) for p in texts if "huggingface-cli" in p.read_text()] == []
    from lynx.models.loading import download_instructions

    assert "hf download Wan-AI/Wan2.1-T2V-14B-Diffusers --local-dir" in download_instructions(Path("models/x"))


def test_a_failed_encode_leaves_nothing_and_keeps_the_earlier_video(tmp_path, monkeypatch):
    import lynx.pipelines.record as record_module

    frames = np.zeros((5, 16, 16, 3), np.uint8)
    path = tmp_path / "a.mp4"
    write_video(frames, path, _record(path, seed=1))
    before = _snapshot(tmp_path)

    def broken(frames, tmp, fps, **kw):
        Path(tmp).write_bytes(b"half a video")
        raise OutputError("could not encode a.mp4: ffmpeg exited with status 1")

    monkeypatch.setattr(record_module, "encode_video", broken)
    with pytest.raises(OutputError, match="could not encode"):
        write_video(frames, path, _record(path, seed=2))
    assert _snapshot(tmp_path) == before  # no temporary left, the earlier video and sidecar intact
    monkeypatch.undo()
    # The encoder itself: an impossible rate is an OutputError, not an empty file reported as written.
    from lynx.io.video import encode_video

    with pytest.raises(OutputError, match="frames per second"):
        encode_video(frames, tmp_path / "b.mp4", float("inf"))
    assert not (tmp_path / "b.mp4").exists()
