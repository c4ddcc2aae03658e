"""The benchmark runner on the tiny fixture model: manifests, shards, kill-and-resume, the report's tables,
plots and HTML (opened in a real headless browser), and videos from another model scored on equal terms."""

from __future__ import annotations

import csv
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from eval_judge_server import JudgeServer
from eval_media import insightface_images, moving_video
from PIL import Image
from skimage import data as skdata
from test_cli import run_command

from lynx.errors import InputError
from lynx.evaluation import bench
from lynx.evaluation.bench import load_manifest, parse_setting_arg, parse_shard, shard_cases
from lynx.face import load_image
from lynx.io.video import save_video

GENERATION = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}
PROMPTS = [{"id": "beach", "text": "a person walks on the beach"}, "a man dancing in rain"]
CASES = ["astro__beach", "astro__p02-a-man-dancing-in-rain", "hanks__beach", "hanks__p02-a-man-dancing-in-rain"]


def _subjects_dir(root: Path) -> Path:
    """Two people (the astronaut, Tom Hanks) with photos, a precomputed embedding and reference crop each,
    and a folder of 'videos from another model' (their photos moving) named subject__prompt.mp4."""
    root.mkdir(parents=True, exist_ok=True)
    photos = {"astro": skdata.astronaut()[30:270, 110:340],
              "hanks": load_image(insightface_images() / "Tom_Hanks_54745.png")}
    rng = np.random.RandomState(0)
    crop = np.zeros((256, 256, 3), np.uint8)
    crop[64:192, 80:176] = 150
    Image.fromarray(crop).save(root / "crop.png")
    for name, img in photos.items():
        Image.fromarray(img).save(root / f"{name}.png")
        e = rng.randn(512).astype(np.float32)
        np.save(root / f"{name}.npy", e / np.linalg.norm(e))
        for pid in ("beach", "p02-a-man-dancing-in-rain"):
            save_video(moving_video(img, n=4, size=220), root / "other" / f"{name}__{pid}.mp4", fps=8)
    return root


def _manifest(root: Path, base: Path, adapter: Path, settings: list[dict]) -> Path:
    m = {"name": "tiny", "base": str(base), "adapter": str(adapter), "generation": GENERATION,
         "subjects": [{"id": n, "photo": f"{n}.png", "embedding": f"{n}.npy", "reference": "crop.png"}
                      for n in ("astro", "hanks")],
         "prompts": PROMPTS, "settings": settings}
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(m))
    return path


# ---------------------------------------------------------------------------------- the runner, killed

@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, tiny_base, adapter_dirs):
    root = _subjects_dir(tmp_path_factory.mktemp("bench"))
    manifest = _manifest(root, tiny_base, adapter_dirs["full"],
                         [{"name": "lynx-tiny", "fps": 8}, {"name": "other-model", "videos": "other"}])
    out = root / "out"
    cmd = [sys.executable, "-m", "lynx", "bench", str(manifest), "--out", str(out), "--every", "2",
           "--detector", "dlib", "--recognizers", "dlib"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LYNX_JUDGE", None)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    deadline, seen = time.time() + 240, []
    try:
        while time.time() < deadline:
            if not sel.select(timeout=max(0.1, deadline - time.time())):
                continue
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("generated 1/4"):
                proc.send_signal(signal.SIGKILL)  # as a lost machine would: no cleanup runs
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        sel.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    videos = out / "videos" / "lynx-tiny"
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in videos.glob("*.mp4")
              if p.with_suffix(".mp4.json").is_file()}
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"root": root, "out": out, "before": before, "log": resumed.stderr, "cases": 8}


def test_killed_run_resumes_without_regenerating_finished_videos(killed_and_resumed):
    before, out, log = killed_and_resumed["before"], killed_and_resumed["out"], killed_and_resumed["log"]
    assert 1 <= len(before) < 4, before  # killed after its first video, before its last
    assert f"generate: {len(before)} finished video(s) kept, {4 - len(before)} to make" in log
    assert log.count("generated ") == 4 - len(before)
    videos = out / "videos" / "lynx-tiny"
    for name, (ino, mtime) in before.items():
        st = (videos / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == (ino, mtime), f"{name} was made again"
    assert sorted(p.stem for p in videos.glob("*.mp4")) == CASES
    side = json.loads((videos / "astro__beach.mp4.json").read_text())
    assert side["bench"]["setting"] == "lynx-tiny" and side["num_frames"] == 5 and side["fps"] == 8
    assert side["prompt"] == "a person walks on the beach"


def test_results_table_in_the_papers_layout(killed_and_resumed):
    out = killed_and_resumed["out"]
    md = (out / "results.md").read_text()
    rows = _main_table(md)
    assert rows["Setting"] == ["dlib", "face found", "videos scored"]
    # The tiny model makes 32x32 noise: no face, so no similarity -- shown as not measured, never a number.
    assert rows["lynx-tiny"] == ["—", "0%", "4/4"]
    # Another model's videos of the same people, scored the same way: near 1 under dlib.
    assert float(rows["other-model"][0]) > 0.95 and rows["other-model"][1:] == ["100%", "4/4"]
    assert "The facexlib recogniser" not in md  # only dlib was asked for, so nothing was skipped
    assert "Judge metrics (PF, AQ, MN, VQ) were not measured" in md
    gen = next(line for line in md.splitlines() if line.startswith("| lynx-tiny | 4 |"))
    cells = [c.strip() for c in gen.strip("|").split("|")]
    assert float(cells[2]) > 0 and cells[3:] == ["—", "5x32x32", "2", "cpu"]  # no GPU, so no GPU peak
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [r["setting"] for r in table] == ["lynx-tiny", "other-model"]
    assert table[0]["dlib"] == "" and float(table[1]["dlib"]) == pytest.approx(float(rows["other-model"][0]), abs=1e-3)
    res = json.loads((out / "results.json").read_text())
    assert len(res["cases"]) == 8 and res["recognizers"] == ["dlib"] and res["missing"] == []
    cases = list(csv.DictReader((out / "cases.csv").open()))
    assert len(cases) == 8 and all(float(c["dlib_mean"]) > 0.9 for c in cases if c["setting"] == "other-model")
    for name in ("per_subject", "similarity_over_frames", "settings"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def _main_table(md: str) -> dict[str, list[str]]:
    """The first Markdown table, as {first cell: other cells}."""
    rows, started = {}, False
    for line in md.splitlines():
        if line.startswith("|"):
            started = True
            if "---" not in line:
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                rows[cells[0]] = cells[1:]
        elif started:
            break
    return rows


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_html_report_shows_every_case_in_a_headless_browser(killed_and_resumed):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install -y chromium); the HTML report was "
                    "written but could not be opened in a browser")
    out = killed_and_resumed["out"]
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
             (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    labels = re.findall(r'data-case="([^"]+)"', dom)
    assert sorted(labels) == sorted(f"{s}/{c}" for s in ("lynx-tiny", "other-model") for c in CASES)
    # The page's own check: every video and reference image decoded in the browser.
    assert 'data-media-failed="0"' in dom and 'data-media-loaded="16"' in dom, dom[-2000:]
    assert "all 16 media loaded" in dom
    assert dom.count("<video") == 8 and dom.count("alt=\"reference ") == 8


# ---------------------------------------------------------------------------------- in process: shards, judge

def test_shards_identity_source_and_judge_in_process(tmp_path, tiny_base, adapter_dirs, monkeypatch):
    from lynx.face import FaceIdentity
    from lynx.pipelines.pipeline_lynx import LynxPipeline

    root = _subjects_dir(tmp_path / "m")
    manifest_path = _manifest(root, tiny_base, adapter_dirs["full"],
                              [{"name": "g5"}, {"name": "lite", "adapter": str(adapter_dirs["lite"]),
                                                "format": ".webp", "ip_scale": 0.5}])
    manifest = load_manifest(manifest_path)
    out = tmp_path / "out"
    loads, asked = [], []

    def factory(base, adapter, device, dtype):
        loads.append(Path(adapter).name)
        return LynxPipeline.from_pretrained(base, adapter=adapter, torch_dtype=dtype, device=device)

    def identity(subject):  # generation from a precomputed identity, no face analysis
        asked.append(subject.id)
        return {"identity": FaceIdentity.from_embedding(np.load(subject.embedding), load_image(subject.reference))}

    gen = dict(pipeline_factory=factory, identity_source=identity, device="cpu")
    logs = []
    a = bench.generate(manifest, out, shard=(0, 2), echo=logs.append, **gen)
    b = bench.generate(manifest, out, shard=(1, 2), echo=logs.append, **gen)
    assert a["generated"] == b["generated"] == 4 and a["skipped"] == b["skipped"] == 0
    made = sorted(str(p.relative_to(out / "videos")) for p in (out / "videos").rglob("*.*") if p.suffix != ".json")
    assert made == sorted([f"g5/{c}.mp4" for c in CASES] + [f"lite/{c}.webp" for c in CASES])
    assert loads == ["lynx_full", "lynx_full"] and set(asked) == {"astro", "hanks"}
    sides = {p.name: json.loads(p.read_text()) for p in (out / "videos" / "lite").glob("*.json")}
    assert {s["variant"] for s in sides.values()} == {"lite"} and {s["ip_scale"] for s in sides.values()} == {0.5}
    # Nothing left: the pipeline is not even loaded.
    again = bench.generate(manifest, out, echo=logs.append, **gen)
    assert again == {"generated": 0, "skipped": 8, "external": 0} and len(loads) == 2
    # A changed knob under the same setting name is refused, not silently mixed into one row.
    changed = load_manifest(manifest_path, [parse_setting_arg("g5:guidance_scale=3")])
    with pytest.raises(InputError, match="other settings"):
        bench.generate(changed, out, echo=logs.append, **gen)

    # Judge metrics from a loopback server in Gemini's format, alongside the face scores.
    from lynx.evaluation.judge import Judge, JudgeConfig

    monkeypatch.setenv("GEMINI_API_KEY", "k")
    with JudgeServer() as server:
        judge = Judge(JudgeConfig(url=server.url + "/v1beta", timeout=5, num_frames=3))
        summary = bench.run(manifest, out, stages=("evaluate", "judge", "report"), judge_client=judge,
                            echo=logs.append, evaluate_kwargs={"recognizers": ["dlib"], "detector": "dlib"})
        assert summary["judge"] == {"judged": 8, "failed": 0, "missing": 0} and len(server.requests) == 32
        bench.run(manifest, out, stages=("judge",), judge_client=judge, echo=logs.append)
        assert len(server.requests) == 32  # cached per video
    rows = _main_table((out / "results.md").read_text())
    assert rows["Setting"] == ["dlib", "PF", "AQ", "MN", "VQ", "face found", "videos scored"]
    assert rows["g5"] == ["—", "0.750", "0.500", "0.250", "1.000", "0%", "4/4"]
    assert rows["lite"] == ["—", "0.750", "0.500", "0.250", "1.000", "0%", "4/4"]
    cached = bench.evaluate(manifest, out, echo=logs.append, recognizers=["dlib"], detector="dlib")
    assert cached == {"evaluated": 0, "cached": 8, "missing": 0}


# ---------------------------------------------------------------------------------- manifests

def test_manifest_formats_and_errors(tmp_path):
    root = tmp_path
    for n in ("a", "b"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / f"{n}.png")
    subjects = [{"id": "a", "photo": "a.png"}, {"id": "b", "photos": ["b.png"]}]
    (root / "m.json").write_text(json.dumps({"subjects": subjects,
                                             "prompts": ["walks", {"id": "run", "text": "runs in a park"}]}))
    (root / "m.csv").write_text("subject,photo,prompt_id,prompt\na,a.png,,walks\nb,b.png,run,runs in a park\n")
    j, c = load_manifest(root / "m.json"), load_manifest(root / "m.csv")
    assert [x.label for x in j.cases()] == [x.label for x in c.cases()] == [
        "default/a__p01-walks", "default/a__run", "default/b__p01-walks", "default/b__run"]
    assert c.subjects[1].photos == [root / "b.png"]

    s = parse_setting_arg("fast:num_inference_steps=20,guidance_scale=4.5,guidance_scale_i=two-way,format=webp")
    assert s.params == {"num_inference_steps": 20, "guidance_scale": 4.5, "guidance_scale_i": "two-way"}
    assert s.format == ".webp"
    assert [x.setting.name for x in load_manifest(root / "m.json", [s]).cases()] == ["fast"] * 4

    cases = j.cases() * 3
    shards = [shard_cases(cases, (i, 3)) for i in range(3)]
    assert sum(len(x) for x in shards) == len(cases) and parse_shard("2/3") == (2, 3)
    for bad, msg in [({"subjects": [{"id": "a", "photo": "missing.png"}], "prompts": ["x"]}, "does not exist"),
                     ({"subjects": [{"id": "a b", "photo": "a.png"}], "prompts": ["x"]}, "letters, digits"),
                     ({"subjects": [{"id": "a", "photo": "a.png"}] * 2, "prompts": ["x"]}, "duplicate subject"),
                     ({"subjects": [{"id": "a", "photo": "a.png"}], "prompts": []}, "at least one"),
                     ({"subjects": [{"id": "a", "photo": "a.png"}], "prompts": ["x"],
                       "settings": [{"name": "s", "cfg": 3}]}, "unknown key"),
                     ({"subjects": [{"id": "a", "photo": "a.png"}], "prompts": ["x"],
                       "settings": [{"name": "s", "videos": "d", "ip_scale": 1}]}, "made elsewhere")]:
        (root / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(InputError, match=msg):
            load_manifest(root / "bad.json")
    for text in ("1/1", "3/2", "x"):
        with pytest.raises(InputError, match="--shard"):
            parse_shard(text)


@pytest.mark.parametrize("change,msg", [
    ({"subjects": 5}, "subjects must be a list, got 5"),
    ({"subjects": [5]}, "subject must be a mapping"),
    ({"subjects": [{"id": None, "photo": "a.png"}]}, "subject id null must be text"),
    ({"subjects": [{"id": "a", "photos": 5}]}, "subject a: photos must be a list, got 5"),
    ({"subjects": [{"id": "a", "photos": [3]}]}, "subject a: photo must be a file path"),
    ({"subjects": [{"id": "a", "photo": "a.png", "embedding": ["e.npy"]}]}, "subject a: embedding must be a file"),
    ({"prompts": 5}, "prompts must be a list"),
    ({"prompts": [{"text": ["x"]}]}, "prompt 1's text must be text"),
    ({"prompts": [{"text": "x", "id": [1]}]}, "prompt id \\[1\\] must be text"),
    ({"settings": {"name": "s"}}, "settings must be a list"),
    ({"settings": [{"name": "s", "adapter": 3}]}, "adapter must be a file path"),
    ({"generation": ["a"]}, "generation must be a mapping"),
    ({"base": 5}, "base must be a file path"),
])
def test_manifest_values_of_the_wrong_type_are_named(tmp_path, change, msg):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "m.json").write_text(json.dumps({"subjects": [{"id": "a", "photo": "a.png"}], "prompts": ["x"],
                                                 **change}))
    with pytest.raises(InputError, match=msg):
        load_manifest(tmp_path / "m.json")


def test_manifest_encoding(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    # A spreadsheet's CSV starts with a byte-order mark; its header must still read as 'subject'.
    (tmp_path / "m.csv").write_bytes("subject,photo,prompt\na,a.png,caf\u00e9\n".encode("utf-8-sig"))
    assert [p.text for p in load_manifest(tmp_path / "m.csv").prompts] == ["caf\u00e9"]
    (tmp_path / "latin1.csv").write_bytes("subject,photo,prompt\na,a.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(InputError, match="latin1.csv is not UTF-8 text .*save it as UTF-8"):
        load_manifest(tmp_path / "latin1.csv")


@pytest.mark.parametrize("only", [",", ""])
def test_bench_refuses_an_empty_stage_selection(tmp_path, only):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "m.json").write_text(json.dumps({"subjects": [{"id": "a", "photo": "a.png"}], "prompts": ["x"]}))
    r = run_command("bench", tmp_path / "m.json", "--out", tmp_path / "out", "--only", only)
    assert r.returncode == 2 and r.stderr.startswith(f"lynx bench: error: --only {only!r} names no stage"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--every", "0"], ["--max-frames", "0"]])
def test_bench_refuses_bad_frame_sampling_before_it_starts(tmp_path, args):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "m.json").write_text(json.dumps({"subjects": [{"id": "a", "photo": "a.png"}], "prompts": ["x"]}))
    r = run_command("bench", tmp_path / "m.json", "--out", tmp_path / "out", *args)
    assert r.returncode == 2 and r.stderr.startswith(f"lynx bench: error: {' '.join(args)}:"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_ids_are_letters_and_digits_of_any_script_and_never_a_path():
    from lynx.evaluation.bench import _check_id

    assert [_check_id(v, "prompt") for v in ("p01-café", "李雷", "ok.1", 7)] == ["p01-café", "李雷", "ok.1", "7"]
    for bad in ("a b", "../x", "_a", "a__b", "x" * 65, "", "a/b", "a\u202eb"):
        with pytest.raises(InputError, match="becomes part of file names"):
            _check_id(bad, "prompt")
