"""Benchmark runner: a manifest of subjects x prompts x settings -> generated videos -> scores -> report.

A manifest (YAML, JSON or CSV) names subjects (reference photos, optionally a precomputed identity) and
prompts; settings (YAML/JSON, or `--setting` on the command line) name the methods compared, each a
set of `LynxPipeline` knobs or, for other models, a folder of videos made elsewhere. Every
(setting, subject, prompt) is a case with a fixed output path, so a run can be killed and started
again (finished videos are kept) and several machines can take disjoint shards (`shard=(i, n)`).

Output folder:
    videos/<setting>/<subject>__<prompt>.mp4 (+ .json sidecar)    generated videos
    scores/<setting>/<subject>__<prompt>.json                      face-similarity cache
    judge/<setting>/<subject>__<prompt>.json                       judge cache
    references/<subject>.jpg                                       thumbnails for the report
    results.md / results.csv / results.json, plots/*.png, report.html
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..errors import InputError, SettingsError
from ..io.files import slug
from ..pipelines.record import BenchRecord, make_record, read_record, write_video
from ..pipelines.settings import GenerationSettings

log = logging.getLogger("lynx.evaluation")

# A setting may set the generation knobs (the fields of GenerationSettings) and what the runner itself reads.
RUNNER_KEYS = ("adapter", "format", "videos", "pattern", "description")
VIDEO_SUFFIXES = (".mp4", ".webp", ".gif")
def _id_char(c: str, first: bool) -> bool:
    # Letters, digits and their marks of any script, as lynx.io.files.slug keeps them (a prompt id is made by it).
    kind = unicodedata.category(c)[0]
    return kind in "LN" or (not first and (kind == "M" or c in "._-"))


def _shown(value) -> str:
    return json.dumps(value, default=str)[:60]


def _check_id(value, what: str) -> str:
    if not isinstance(value, str) and type(value) is not int:
        raise InputError(f"{what} id {_shown(value)} must be text (letters, digits, '.', '_' or '-')")
    value = str(value).strip()
    if not 1 <= len(value) <= 64 or not all(_id_char(c, i == 0) for i, c in enumerate(value)) or "__" in value:
        raise InputError(f"{what} id {value!r} must be 1-64 letters, digits, '.', '_' or '-' (no '__'), "
                         f"starting with a letter or digit: it becomes part of file names")
    return value


@dataclass
class Subject:
    """A person: reference photo(s) for scoring; optionally a precomputed identity for generation."""

    id: str
    photos: list[Path] = field(default_factory=list)
    identity: Path | None = None  # a FaceIdentity file (`lynx face`)
    embedding: Path | None = None  # .npy with a 512-d ArcFace embedding
    reference: Path | None = None  # 256x256 aligned reference crop (with `embedding`, full model)


@dataclass
class Prompt:
    id: str
    text: str


@dataclass
class Setting:
    """One row of the results table: pipeline knobs for Lynx, or `videos=DIR` for videos made elsewhere."""

    name: str
    params: dict = field(default_factory=dict)
    adapter: Path | None = None
    format: str = ".mp4"
    videos: Path | None = None
    pattern: str = "{subject}__{prompt}"
    description: str = ""

    @property
    def external(self) -> bool:
        return self.videos is not None

    def key(self, generation: dict) -> str:
        """Hash of everything that shapes this setting's videos; a finished video must match it to be reused."""
        blob = json.dumps({"params": {**generation, **self.params}, "adapter": str(self.adapter or ""),
                           "format": self.format}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Manifest:
    subjects: list[Subject]
    prompts: list[Prompt]
    settings: list[Setting]
    generation: dict = field(default_factory=dict)  # knobs shared by all settings
    name: str = "benchmark"
    base: Path | None = None
    adapter: Path | None = None
    source: Path | None = None

    def cases(self) -> list["Case"]:
        return [Case(st, su, p) for st in self.settings for su in self.subjects for p in self.prompts]


@dataclass(frozen=True)
class Case:
    setting: Setting
    subject: Subject
    prompt: Prompt

    @property
    def name(self) -> str:
        return f"{self.subject.id}__{self.prompt.id}"

    @property
    def label(self) -> str:
        return f"{self.setting.name}/{self.name}"

    def __hash__(self):
        return hash(self.label)


# ----------------------------------------------------------------------------------------------- manifest


def _path(value, root: Path, what: str) -> Path:
    if not isinstance(value, (str, Path)):
        raise InputError(f"{what} must be a file path (text), got {_shown(value)}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else root / p


def _list(value, what: str) -> list:
    """A manifest's list (absent: empty); one item alone, or a mapping, is a mistake worth naming."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InputError(f"{what} must be a list, got {_shown(value)}")
    return value


def _split_params(raw: dict, where: str) -> tuple[dict, dict]:
    if not isinstance(raw, dict):
        raise InputError(f"{where} must be a mapping of key: value, got {_shown(raw)}")
    knobs = tuple(GenerationSettings.model_fields)
    unknown = set(raw) - set(knobs) - set(RUNNER_KEYS) - {"name"}
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; a setting may set "
                         f"{', '.join(knobs + RUNNER_KEYS)}")
    params = {k: v for k, v in raw.items() if k in knobs}
    _settings(params, where)
    return params, {k: v for k, v in raw.items() if k in RUNNER_KEYS}


def _settings(knobs: dict, where: str) -> GenerationSettings:
    try:
        return GenerationSettings(**knobs)
    except SettingsError as e:
        raise SettingsError(f"{where}: {e}") from None


def make_setting(raw: dict, root: Path, where: str = "setting") -> Setting:
    if not isinstance(raw, dict) or "name" not in raw:
        raise InputError(f"{where} must be a mapping with a name, got {raw!r}")
    params, runner = _split_params(raw, where)
    fmt = str(runner.get("format", ".mp4"))
    fmt = fmt if fmt.startswith(".") else "." + fmt
    if fmt not in VIDEO_SUFFIXES:
        raise InputError(f"{where}: format must be one of {', '.join(VIDEO_SUFFIXES)}")
    s = Setting(name=_check_id(raw["name"], "setting"), params=params,
                adapter=_path(runner["adapter"], root, f"{where}: adapter") if runner.get("adapter") else None,
                format=fmt, videos=_path(runner["videos"], root, f"{where}: videos") if runner.get("videos") else None,
                pattern=str(runner.get("pattern", "{subject}__{prompt}")),
                description=str(runner.get("description", "")))
    if s.external and (params or s.adapter):
        raise InputError(f"{where} {s.name}: a setting with `videos` evaluates videos made elsewhere and "
                         f"cannot also set generation knobs")
    return s


def parse_setting_arg(text: str, root: Path = Path(".")) -> Setting:
    """`NAME` or `NAME:key=value,key=value` from the command line (values parsed as YAML scalars)."""
    import yaml

    name, _, rest = text.partition(":")
    raw: dict[str, Any] = {"name": name}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        if "=" not in part:
            raise InputError(f"--setting {text!r}: expected key=value, got {part!r}")
        k, v = part.split("=", 1)
        raw[k.strip().replace("-", "_")] = yaml.safe_load(v)
    return make_setting(raw, root, f"--setting {name}")


def _subject(raw: dict, root: Path, where: str) -> Subject:
    if not isinstance(raw, dict):
        raise InputError(f"{where} must be a mapping with an id and photo(s), got {_shown(raw)}")
    if "id" not in raw:
        raise InputError(f"{where}: every subject needs an id")
    sid = _check_id(raw["id"], "subject")
    photos = raw.get("photos", raw.get("photo")) or []
    photos = [photos] if isinstance(photos, (str, Path)) else _list(photos, f"{where} {sid}: photos")
    files = {k: _path(raw[k], root, f"{where} {sid}: {k}") if raw.get(k) else None
             for k in ("identity", "embedding", "reference")}
    s = Subject(id=sid, photos=[_path(p, root, f"{where} {sid}: photo") for p in photos], **files)
    if not (s.photos or s.identity or s.embedding):
        raise InputError(f"{where} {s.id}: give photo(s), an identity file or an embedding")
    for p in s.photos + [x for x in (s.identity, s.embedding, s.reference) if x]:
        if not p.is_file():
            raise InputError(f"{where} {s.id}: file {p} does not exist")
    return s


def _prompts(items: Iterable, where: str) -> list[Prompt]:
    out = []
    for n, item in enumerate(items, 1):
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict) or not str(item.get("text", "")).strip():
            raise InputError(f"{where}: prompt {n} has no text")
        if not isinstance(item["text"], str):
            raise InputError(f"{where}: prompt {n}'s text must be text, got {_shown(item['text'])}")
        pid = item.get("id") or f"p{n:02d}-{slug(item['text'], 24, 'x')}"
        out.append(Prompt(_check_id(pid, "prompt"), str(item["text"]).strip()))
    return out


def _read_csv(text: str, root: Path) -> dict:
    """Rows with `subject` (+ photo/identity/embedding/reference) and/or `prompt` (+ prompt_id) columns."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise InputError("the CSV manifest has no rows")
    cols = set(rows[0])
    if not ({"subject", "prompt"} & cols):
        raise InputError("a CSV manifest needs a `subject` column (with `photo`) and/or a `prompt` column")
    subjects: dict[str, dict] = {}
    prompts: dict[str, dict] = {}
    for row in rows:
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        if row.get("subject"):
            s = subjects.setdefault(row["subject"], {"id": row["subject"], "photos": []})
            if row.get("photo"):
                s["photos"].append(row["photo"])
            for k in ("identity", "embedding", "reference"):
                if row.get(k):
                    s[k] = row[k]
        if row.get("prompt"):
            key = row.get("prompt_id") or row["prompt"]
            prompts.setdefault(key, {"text": row["prompt"], **({"id": row["prompt_id"]} if row.get("prompt_id")
                                                                 else {})})
    return {"subjects": list(subjects.values()), "prompts": list(prompts.values())}


def load_manifest(path, settings: Iterable[Setting] | None = None) -> Manifest:
    """Read a YAML/JSON/CSV manifest. `settings` (e.g. from the command line) replace the file's own."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist")
    root = path.parent
    suffix = path.suffix.lower()
    try:
        # utf-8-sig: spreadsheet programs start their CSV with a byte-order mark.
        text = path.read_text(encoding="utf-8-sig")
        if suffix == ".json":
            raw = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        elif suffix == ".csv":
            raw = _read_csv(text, root)
        else:
            raise InputError(f"manifest {path}: use .yaml, .yml, .json or .csv")
    except UnicodeDecodeError as exc:
        raise InputError(f"manifest {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except (ValueError, LookupError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"manifest {path} cannot be parsed: {exc}") from None
    except Exception as exc:  # yaml.YAMLError has no common base with the others
        raise InputError(f"manifest {path} cannot be parsed: {exc}") from None
    if not isinstance(raw, dict):
        raise InputError(f"manifest {path} must be a mapping with `subjects` and `prompts`")
    subjects = [_subject(s, root, f"{path.name}: subject")
                for s in _list(raw.get("subjects"), f"{path.name}: subjects")]
    prompts = _prompts(_list(raw.get("prompts"), f"{path.name}: prompts"), path.name)
    if not subjects or not prompts:
        raise InputError(f"manifest {path} needs at least one subject and one prompt")
    for what, ids in (("subject", [s.id for s in subjects]), ("prompt", [p.id for p in prompts])):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise InputError(f"manifest {path}: duplicate {what} id(s) {', '.join(dup)}")
    if settings is not None:
        settings = list(settings)
    if not settings:
        settings = [make_setting(s, root, f"{path.name}: setting")
                    for s in _list(raw.get("settings"), f"{path.name}: settings")]
    if not settings:
        settings = [Setting(name="default")]
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise InputError(f"setting names must be unique, got {names}")
    generation, extra = _split_params(raw.get("generation") or {}, f"{path.name}: generation")
    if extra:
        raise InputError(f"{path.name}: generation may only hold generation knobs "
                         f"({', '.join(GenerationSettings.model_fields)}); put {', '.join(extra)} in a setting")
    for s in settings:  # the shared knobs and each setting's own, checked together before anything runs
        _settings({**generation, **s.params}, f"{path.name}: setting {s.name}")
    return Manifest(subjects, prompts, settings, generation, str(raw.get("name", path.stem)),
                    _path(raw["base"], root, f"{path.name}: base") if raw.get("base") else None,
                    _path(raw["adapter"], root, f"{path.name}: adapter") if raw.get("adapter") else None, path)


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not (0 <= int(m.group(1)) < int(m.group(2))):
        raise InputError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def shard_cases(cases: list[Case], shard: tuple[int, int]) -> list[Case]:
    """Case k of the manifest's fixed order goes to shard k mod n, so shards never overlap."""
    i, n = shard
    return [c for k, c in enumerate(cases) if k % n == i]


# ----------------------------------------------------------------------------------------------- paths


class Layout:
    """Where each case's files live under the output folder."""

    def __init__(self, out_dir):
        self.root = Path(out_dir)

    def video(self, case: Case) -> Path | None:
        s = case.setting
        if s.external:
            stem = s.pattern.format(subject=case.subject.id, prompt=case.prompt.id, setting=s.name)
            for suffix in ("",) + VIDEO_SUFFIXES:
                p = s.videos / (stem + suffix)
                if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file():
                    return p
            return None
        return self.root / "videos" / s.name / f"{case.name}{s.format}"

    def scores(self, case: Case) -> Path:
        return self.root / "scores" / case.setting.name / f"{case.name}.json"

    def judge(self, case: Case) -> Path:
        return self.root / "judge" / case.setting.name / f"{case.name}.json"

    def reference(self, subject: Subject) -> Path:
        return self.root / "references" / f"{subject.id}.jpg"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data) -> None:
    from ..io.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=_json_default)))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def finished(layout: Layout, case: Case, generation: dict) -> bool:
    """A generated case is finished when its video and its sidecar (written last) exist for these settings."""
    video = layout.video(case)
    if video is None or not video.is_file():
        return False
    record = read_record(video)
    if record is None:
        return False
    key = record.bench.setting_key if record.bench else None
    if key != case.setting.key(generation):
        raise InputError(f"{video} was made with other settings than setting {case.setting.name!r} now has; "
                         f"give the changed setting a new name, or pass --regenerate to replace its videos")
    return True


# ------------------------------------------------------------------------------------------ generation

IdentitySource = Callable[[Subject], dict]
PipelineFactory = Callable[..., Any]


def default_identity_source(detector: str = "auto", models_dir=None, face_analyzer=None) -> IdentitySource:
    """Subject -> LynxPipeline identity kwargs: its identity file, its embedding (+ crop), else its photos
    (analysed by `face_analyzer`, or by one FaceAnalyzer built when the first subject needs it)."""
    cache: dict[str, dict] = {}
    analyzer = face_analyzer

    def source(subject: Subject) -> dict:
        if subject.id not in cache:
            if subject.identity is not None:
                from ..face import FaceIdentity

                cache[subject.id] = {"identity": FaceIdentity.load(subject.identity)}
            elif subject.embedding is not None:
                kw = {"face_embedding": np.load(subject.embedding)}
                if subject.reference is not None:
                    from ..face import load_image

                    kw["reference_image"] = load_image(subject.reference)
                cache[subject.id] = kw
            else:
                from ..face import FaceAnalyzer

                nonlocal analyzer
                if analyzer is None:
                    analyzer = FaceAnalyzer(detector, models_dir=models_dir)
                photos = [str(p) for p in subject.photos]
                cache[subject.id] = {"identity": analyzer.analyze(photos if len(photos) > 1 else photos[0])}
        return cache[subject.id]

    return source


def _default_pipeline_factory(base, adapter, device, dtype):
    from ..pipelines.pipeline_lynx import LynxPipeline

    return LynxPipeline.from_pretrained(base, adapter=adapter, torch_dtype=dtype, device=device)


def generate(manifest: Manifest, out_dir, *, base=None, adapter=None, shard=(0, 1), device: str | None = None,
             dtype=None, identity_source: IdentitySource | None = None,
             pipeline_factory: PipelineFactory | None = None, regenerate: bool = False,
             attention_backend: str | None = None, echo: Callable[[str], None] = print,
             safety_check: bool = True, safety_model=None) -> dict:
    """Generate this shard's unfinished Lynx cases; returns counts {generated, skipped, external} (+ blocked).

    The pipeline is loaded only when something is left to generate, and once per base; settings with
    their own `adapter` swap the adapter files on the loaded base. A video the safety gate refuses is not
    written (nor its sidecar): the case is counted as blocked, reported as missing, and tried again on the
    next run; the other cases go on.
    """
    import torch

    from ..errors import UnsafeVideoError
    from ..io.safety import load_safety_checker, unchecked
    from ..runtime import default_adapter_dir, default_base_dir

    layout = Layout(out_dir)
    cases = shard_cases(manifest.cases(), shard)
    todo, counts = [], {"generated": 0, "skipped": 0, "external": 0}
    for case in cases:
        if case.setting.external:
            counts["external"] += 1
        elif not regenerate and finished(layout, case, manifest.generation):
            counts["skipped"] += 1
        else:
            todo.append(case)
    if counts["skipped"]:
        echo(f"generate: {counts['skipped']} finished video(s) kept, {len(todo)} to make")
    if not todo:
        return counts
    base = Path(base or manifest.base or default_base_dir())
    default_adapter = Path(adapter or manifest.adapter or default_adapter_dir("full"))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    identity_source = identity_source or default_identity_source()
    factory = pipeline_factory or _default_pipeline_factory
    pipe, loaded_adapter = None, None
    gate = load_safety_checker(safety_model, device=device, notify=lambda m: echo(f"generate: {m}")) \
        if safety_check else None
    for n, case in enumerate(todo, 1):
        s = case.setting
        want = s.adapter or default_adapter
        if pipe is None:
            echo(f"loading {base} + {want} ({device}, {str(dtype).removeprefix('torch.')})")
            pipe = factory(base, want, device, dtype)
            if attention_backend:
                pipe.transformer.set_attention_backend(attention_backend)
        elif want != loaded_adapter:
            pipe.load_lynx_adapters(want)
        loaded_adapter = want
        settings = GenerationSettings(**{**manifest.generation, **s.params})
        person = identity_source(case.subject)  # face analysis is not part of the generation time
        cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        started = time.time()
        result = pipe(case.prompt.text, **person, **settings.model_dump(), output_type="np")
        frames, settings = result.frames[0], result.settings
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.time() - started
        peak = round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if cuda else None
        video = layout.video(case)
        try:
            safety = gate.check(frames) if gate else unchecked("no classifier" if safety_check else "switched off")
        except UnsafeVideoError as e:
            counts["blocked"] = counts.get("blocked", 0) + 1
            echo(f"blocked {n}/{len(todo)}: {case.label}: {e}")
            continue
        subject = case.subject
        record = make_record(
            video, case.prompt.text, settings, variant=pipe.variant, base=base, adapter=want, dtype=dtype,
            device=device, source="lynx bench", safety=safety, photos=subject.photos, identity_file=subject.identity,
            embedding_file=subject.embedding, reference=subject.reference, seconds=seconds, peak_memory_gb=peak,
            bench=BenchRecord(setting=s.name, subject=subject.id, prompt_id=case.prompt.id,
                              setting_key=s.key(manifest.generation), manifest=str(manifest.source or "")))
        write_video(frames, video, record)  # the old sidecar goes first: it never vouches for the new video
        counts["generated"] += 1
        echo(f"generated {n}/{len(todo)}: {case.label} ({seconds:.1f} s)")
    return counts


# ------------------------------------------------------------------------------------------ evaluation


def _file_fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def evaluate(manifest: Manifest, out_dir, *, evaluator=None, shard=(0, 1), every: int = 1,
             max_frames: int | None = None, rescore: bool = False, echo: Callable[[str], None] = print,
             **evaluator_kwargs) -> dict:
    """Score this shard's videos against their subject's photos; results are cached per video.

    A cached score is reused while the video file, the photos and the frame sampling are unchanged (and,
    when recognisers are named, the same ones scored it); `rescore=True` scores everything again, e.g.
    after adding recogniser weights.
    """
    from .metrics import FaceEvaluator

    layout = Layout(out_dir)
    counts = {"evaluated": 0, "cached": 0, "missing": 0}
    todo = []
    for case, video in _finished_videos(layout, manifest, shard, counts):
        if not case.subject.photos:
            raise InputError(f"subject {case.subject.id} has no photo to score its videos against; add `photo:`")
        todo.append((case, video))
    references = {}
    wanted = evaluator.names if evaluator is not None else evaluator_kwargs.get("recognizers")
    # The detector as asked for ("auto" stays "auto"), fixed before any model loads, so caches compare equal.
    detector = str(evaluator.detector.name if evaluator is not None else evaluator_kwargs.get("detector", "auto"))
    for case, video in todo:
        config = {"every": every, "max_frames": max_frames, "video": _file_fingerprint(video),
                  "photos": [{"path": str(p), **_file_fingerprint(p)} for p in case.subject.photos],
                  "detector": detector}
        cached = _read_json(layout.scores(case))
        if not rescore and cached and {k: v for k, v in cached.get("config", {}).items() if k != "recognizers"} \
                == config and (wanted is None or list(wanted) == cached["config"].get("recognizers")):
            counts["cached"] += 1
            continue
        if evaluator is None:
            evaluator = FaceEvaluator(on_skip=lambda n, m: echo(f"skipping the {n} recogniser: {m}"),
                                      **evaluator_kwargs)
        config["recognizers"] = evaluator.names
        if case.subject.id not in references:
            references[case.subject.id] = evaluator.reference([str(p) for p in case.subject.photos])
        result = evaluator.evaluate(video, references[case.subject.id], every=every, max_frames=max_frames)
        _write_json(layout.scores(case), {"config": config, "case": case.label, "evaluation": result.to_dict()})
        counts["evaluated"] += 1
        best = [f"{k} {v['mean']:.3f}" for k, v in result.recognizers.items() if v["mean"] is not None]
        echo(f"scored {case.label}: face in {result.face_found_share:.0%} of frames"
             + (", " + ", ".join(best) if best else ", no similarity measured (no face)"))
    return counts


def _finished_videos(layout, manifest: Manifest, shard, counts: dict):
    """(case, video) for this shard's finished videos; the others are counted as missing."""
    for case in shard_cases(manifest.cases(), shard):
        video = layout.video(case)
        if video is None or not video.is_file() or (not case.setting.external and
                                                    not finished(layout, case, manifest.generation)):
            counts["missing"] += 1
            continue
        yield case, video


# ------------------------------------------------------------------------------------------ judge


def judge(manifest: Manifest, out_dir, judge_client, *, shard=(0, 1), echo: Callable[[str], None] = print) -> dict:
    """Judge metrics (PF, AQ, MN, VQ) of this shard's videos, cached per video by the judge client."""
    from ..io.video import read_video

    layout = Layout(out_dir)
    counts = {"judged": 0, "failed": 0, "missing": 0}
    for case, video in _finished_videos(layout, manifest, shard, counts):
        frames, fps = read_video(video)
        result = judge_client.score(frames, case.prompt.text, fps=fps, cache_path=layout.judge(case))
        if result.get("errors"):
            counts["failed"] += 1
            echo(f"judge {case.label}: " + "; ".join(f"{k}: {v}" for k, v in result["errors"].items()))
        else:
            counts["judged"] += 1
            echo(f"judged {case.label}: " + ", ".join(f"{k} {v['score']:.2f}" for k, v in result["scores"].items()))
    return counts


# ------------------------------------------------------------------------------------------ collecting


def collect(manifest: Manifest, out_dir) -> list[dict]:
    """One record per case with whatever was measured for it (all shards), for the report."""
    layout = Layout(out_dir)
    records = []
    for case in manifest.cases():
        video = layout.video(case)
        rec = {"setting": case.setting.name, "subject": case.subject.id, "prompt_id": case.prompt.id,
               "prompt": case.prompt.text, "case": case.name, "video": None, "evaluation": None,
               "judge": {}, "judge_errors": {}, "generation": None,
               "photos": [str(p) for p in case.subject.photos]}
        record = None if case.setting.external or video is None or not video.is_file() else read_record(video)
        done = video is not None and video.is_file() and (case.setting.external or record is not None)
        if done:
            rec["video"] = str(video)
            if record is not None:
                rec["generation"] = record.model_dump(mode="json")
            scored = _read_json(layout.scores(case))
            if scored and scored.get("config", {}).get("video") == _file_fingerprint(video):
                rec["evaluation"] = scored["evaluation"]
            judged = _read_json(layout.judge(case))
            if judged:
                rec["judge"] = {k: v for k, v in judged.get("scores", {}).items()}
                rec["judge_errors"] = judged.get("errors", {})
        records.append(rec)
    return records


def run(manifest: Manifest, out_dir, *, stages: Iterable[str] = ("generate", "evaluate", "judge", "report"),
        shard=(0, 1), judge_client=None, echo: Callable[[str], None] = print, generate_kwargs: dict | None = None,
        evaluate_kwargs: dict | None = None) -> dict:
    """The whole benchmark (or some stages of it); returns what each stage did and the report's files."""
    from .report import write_report

    stages = list(stages)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    if "generate" in stages:
        summary["generate"] = generate(manifest, out_dir, shard=shard, echo=echo, **(generate_kwargs or {}))
    if "evaluate" in stages:
        summary["evaluate"] = evaluate(manifest, out_dir, shard=shard, echo=echo, **(evaluate_kwargs or {}))
    if "judge" in stages:
        if judge_client is None:
            echo("judge metrics (PF, AQ, MN, VQ): no judge endpoint configured, not measured")
        else:
            summary["judge"] = judge(manifest, out_dir, judge_client, shard=shard, echo=echo)
    if "report" in stages:
        summary["report"] = {k: str(v) for k, v in write_report(manifest, collect(manifest, out_dir), out_dir,
                                                                 echo=echo).items()}
    return summary
