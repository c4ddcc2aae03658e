"""`lynx eval` (score videos against reference photos) and `lynx bench` (run a benchmark manifest)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ...constants import CONTEXT_WINDOW_FRAMES
from ...errors import InputError

STAGES = ("generate", "evaluate", "judge", "report")


def _echo(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _add_face_args(p) -> None:
    g = p.add_argument_group("face scoring")
    g.add_argument("--every", type=int, default=1, help="score every k-th frame (default 1: all)")
    g.add_argument("--max-frames", type=int, help="at most this many frames per video, spread evenly")
    g.add_argument("--recognizers", nargs="+", choices=("facexlib", "insightface", "dlib"),
                   help="recognisers to require (default: all whose weights are present; the others are "
                        "skipped with a message)")
    g.add_argument("--detector", default="auto", help="face detector: auto, insightface, dlib, dlib-cnn")
    g.add_argument("--face-models", help="directory of face models (default $LYNX_FACE_MODELS or ~/.cache/lynx/face)")
    g.add_argument("--arcface-weights", help="recognition_arcface_ir_se50.pth (default <face-models>/...)")
    g.add_argument("--insightface-model", help="recognition ONNX file (default <face-models>/buffalo_l/w600k_r50.onnx)")


def _add_judge_args(p) -> None:
    g = p.add_argument_group("judge metrics (PF, AQ, MN, VQ)")
    g.add_argument("--judge", help="gemini:MODEL or openai:MODEL (default $LYNX_JUDGE; unset: not measured)")
    g.add_argument("--judge-url", help="API base URL, e.g. http://host:8000/v1 for an OpenAI-compatible server")
    g.add_argument("--judge-key-env", help="environment variable holding the API key "
                                           "(default GEMINI_API_KEY / OPENAI_API_KEY)")
    g.add_argument("--judge-frames", type=int, default=8, help="frames sent per video (default 8)")


def _check_face_args(args) -> None:
    """The sampling numbers, checked before the recognisers load: a bad one would surface only after them, and
    `--max-frames 0` would silently score every frame."""
    if args.every < 1:
        raise InputError(f"--every {args.every}: score every k-th frame with k at least 1 (1: every frame)")
    if args.max_frames is not None and args.max_frames < 1:
        raise InputError(f"--max-frames {args.max_frames}: give at least 1, or leave --max-frames out to score "
                         "every sampled frame")


def _judge_client(args, required: bool):
    import os

    from ...evaluation.judge import Judge, JudgeConfig

    if not (args.judge or os.environ.get("LYNX_JUDGE")) and not required:
        return None
    return Judge(JudgeConfig.from_spec(args.judge, args.judge_url, args.judge_key_env, num_frames=args.judge_frames))


def _evaluator_kwargs(args) -> dict:
    return dict(recognizers=args.recognizers, detector=args.detector, models_dir=args.face_models,
                arcface_weights=args.arcface_weights, insightface_model=args.insightface_model)


def _sidecar_windows(video: str) -> list | None:
    """The context windows (video-frame ranges) a long clip was made in, as its generation record says."""
    from ...pipelines.record import read_record

    record = read_record(video)
    return None if record is None or not record.context_windows else [list(w) for w in record.context_windows]


def _sidecar_photos(video: str) -> list[str]:
    """The photos a video's generation record names (none when it has no readable record)."""
    from ...pipelines.record import read_record

    record = read_record(video)
    return [] if record is None else [i.path for i in record.identity.images]


def cmd_eval(args) -> int:
    from ...evaluation.metrics import FaceEvaluator, format_evaluation

    for v in args.videos:
        if not Path(v).is_file():
            raise InputError(f"video file {v} does not exist")
    _check_face_args(args)
    if args.segment_frames < 0:
        raise InputError(f"--segment-frames {args.segment_frames}: give a number of frames, or 0 for no segments")
    if args.reference:
        from ...face import load_image

        for photo in args.reference:  # read now, not after the recognisers have loaded
            try:
                load_image(photo)
            except InputError as e:
                raise InputError(f"--reference: {e}") from None
    judge = _judge_client(args, required=False)
    if judge is not None and not args.prompt:
        raise InputError("judge metrics need the video's prompt: pass --prompt TEXT")
    ev = FaceEvaluator(on_skip=lambda n, m: _echo(f"skipping the {n} recogniser: {m}"), **_evaluator_kwargs(args))
    refs = {}
    results = []
    for video in args.videos:
        photos = args.reference or _sidecar_photos(video)
        if not photos:
            raise InputError(f"no reference photo for {video}: pass --reference PHOTO (its sidecar names none)")
        key = tuple(photos)
        if key not in refs:
            refs[key] = ev.reference(list(photos))
        result = ev.evaluate(video, refs[key], every=args.every, max_frames=args.max_frames,
                             windows=_sidecar_windows(video), segment_frames=args.segment_frames)
        print(format_evaluation(result))
        record = result.to_dict()
        if judge is not None:
            from ...io.video import read_video

            frames, fps = read_video(video)
            record["judge"] = judge.score(frames, args.prompt, fps=fps)
            for m, s in record["judge"]["scores"].items():
                print(f"  judge {m}: {s['score']:.2f}  {s['reason']}")
            for m, err in record["judge"]["errors"].items():
                print(f"  judge {m}: not measured ({err})")
        results.append(record)
    if len(results) > 1:
        print(f"\nmean over {len(results)} videos:")
        for name in ev.names:
            vals = [r["recognizers"][name]["mean"] for r in results if r["recognizers"][name]["mean"] is not None]
            print(f"  {name:12s} " + (f"{sum(vals) / len(vals):.3f} ({len(vals)} videos with a face)" if vals
                                      else "not measured (no face found)"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results if len(results) > 1 else results[0], indent=2))
        _echo(f"wrote {args.json}")
    return 0


def cmd_bench(args) -> int:
    import torch

    from ...evaluation.bench import default_identity_source, load_manifest, parse_setting_arg, parse_shard, run

    stages = list(STAGES) if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise InputError(f"--only takes a comma-separated subset of {', '.join(STAGES)}; got {', '.join(bad)}")
    if not stages:  # a run of no stage would exit 0 having done nothing
        raise InputError(f"--only {args.only!r} names no stage; give a comma-separated subset of {','.join(STAGES)}, "
                         "or leave --only out to run them all")
    _check_face_args(args)
    settings = [parse_setting_arg(s) for s in args.setting] if args.setting else None
    manifest = load_manifest(args.manifest, settings)
    judge = _judge_client(args, required=bool(args.only) and "judge" in stages) if "judge" in stages else None
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    cases = manifest.cases()
    _echo(f"{manifest.name}: {len(manifest.subjects)} subjects x {len(manifest.prompts)} prompts x "
          f"{len(manifest.settings)} settings = {len(cases)} cases; stages {', '.join(stages)}"
          + (f"; shard {args.shard}" if args.shard else ""))
    run(manifest, args.out, stages=stages, shard=parse_shard(args.shard), judge_client=judge, echo=_echo,
        generate_kwargs=dict(base=args.base, adapter=args.adapter, device=args.device,
                             dtype=dtypes[args.dtype] if args.dtype else None, regenerate=args.regenerate,
                             attention_backend=args.attention_backend, safety_check=not args.no_safety_check,
                             safety_model=args.safety_model,
                             identity_source=default_identity_source(args.detector, args.face_models)),
        evaluate_kwargs=dict(every=args.every, max_frames=args.max_frames, rescore=args.rescore,
                             **_evaluator_kwargs(args)))
    return 0


def register(subparsers) -> None:
    from ..options import add_safety_options

    e = subparsers.add_parser("eval", help="score identity fidelity of videos against reference photo(s)")
    e.add_argument("videos", nargs="+", metavar="VIDEO")
    e.add_argument("--reference", nargs="+", metavar="PHOTO",
                   help="photo(s) of the person (default: the photos named in each video's .json sidecar)")
    e.add_argument("--json", help="also write the full per-frame results here")
    e.add_argument("--prompt", help="the video's prompt, for judge metrics")
    e.add_argument("--segment-frames", type=int, default=CONTEXT_WINDOW_FRAMES,
                   help="long clips: report the similarity per segment of this many frames (default "
                        f"{CONTEXT_WINDOW_FRAMES}, one model window; 0: off). A clip made in context windows is cut "
                        "at its windows (from its sidecar), and its window seams are measured")
    _add_face_args(e)
    _add_judge_args(e)
    e.set_defaults(func=cmd_eval)

    b = subparsers.add_parser("bench", help="generate, score and report a benchmark of subjects x prompts")
    b.add_argument("manifest", help="YAML, JSON or CSV manifest of subjects and prompts (see docs/evaluation.md)")
    b.add_argument("--out", required=True, help="output folder (reused: finished work is kept)")
    b.add_argument("--setting", action="append", metavar="NAME[:key=value,...]",
                   help="a setting (table row) to run, replacing the manifest's; repeatable. Keys: pipeline knobs "
                        "(guidance_scale, ip_scale, num_inference_steps, ...), adapter, fps, format, videos")
    b.add_argument("--only", help=f"comma-separated stages to run (default all: {','.join(STAGES)})")
    b.add_argument("--shard", help="I/N: take every N-th case starting at I (for several GPUs or machines)")
    b.add_argument("--base", help="Wan2.1-T2V base directory (default: the manifest's, else $LYNX_MODELS/...)")
    b.add_argument("--adapter", help="lynx_full or lynx_lite directory (default: the manifest's, else lynx_full)")
    b.add_argument("--device")
    b.add_argument("--dtype", choices=("fp32", "bf16", "fp16"))
    b.add_argument("--attention-backend", help="diffusers attention backend: native, flash, _flash_3, sage, ...")
    b.add_argument("--regenerate", action="store_true", help="make every video of this shard again")
    b.add_argument("--rescore", action="store_true", help="score every video again (e.g. after adding weights)")
    add_safety_options(b)
    _add_face_args(b)
    _add_judge_args(b)
    b.set_defaults(func=cmd_bench)
