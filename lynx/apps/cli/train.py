"""`lynx prepare` (manifest -> cache) and `lynx train` (cache -> adapters), registered into the `lynx` command."""

from __future__ import annotations

import sys

from ...errors import InputError


def _config(args):
    from ...training.config import load_training_config

    overrides = list(args.set or [])
    if getattr(args, "base", None):
        overrides.append(f"train.base={_toml_string(args.base)}")
    return load_training_config(args.config, overrides)


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cmd_prepare(args) -> int:
    from ...training.config import check_files
    from ...training.data import face_identity_fn, prepare, read_manifest

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit {args.limit}: prepare at least 1 sample (leave --limit out to prepare them all)")
    config = _config(args)
    shard = (0, 1)
    if args.shard:
        try:
            i, n = (int(x) for x in args.shard.split("/"))
        except ValueError:
            raise InputError(f"--shard must look like I/N (e.g. 0/4), not {args.shard!r}") from None
        if not 0 <= i < n:
            raise InputError(f"--shard {args.shard}: I must be in 0..N-1")
        shard = (i, n)
    # The config's files and the manifest are checked before the face models load (prepare checks them again).
    check_files(config, "prepare")
    read_manifest(config.data.manifest)
    identity_fn = face_identity_fn(args.detector, args.face_models, args.face_device)
    report = prepare(config, identity_fn=identity_fn, limit=args.limit, shard=shard,
                     retry_skipped=args.retry_skipped, progress=not args.no_progress)
    print(report.summary())
    print(f"cache: {config.data.cache_dir} (skipped samples and reasons: skipped.jsonl)")
    return 0


def cmd_train(args) -> int:
    from ...training.trainer import train

    config = _config(args)
    result = train(config, resume=args.resume, progress=not args.no_progress)
    if not result.main:  # under torchrun, rank 0 reports
        return 0
    if result.losses:
        print(f"trained to step {result.steps}; last loss {result.losses[-1]:.5f}", file=sys.stderr)
    if result.skipped_steps:
        print(f"{len(result.skipped_steps)} steps were skipped (non-finite): {result.skipped_steps[:10]}",
              file=sys.stderr)
    print(result.final_dir)
    return 0


def register(subparsers) -> None:
    common = dict(help="training config (TOML with [data], [train], [validation]; see configs/train_stage1.toml)")
    p = subparsers.add_parser("prepare", help="cache face embeddings, reference crops, text embeddings and VAE "
                                              "latents of a training manifest")
    p.add_argument("--config", required=True, **common)
    p.add_argument("--set", action="append", metavar="TABLE.KEY=VALUE",
                   help="override a config value, typed as TOML (repeatable; nested: train.resampler.dim=64)")
    p.add_argument("--base", help="Wan2.1-T2V diffusers directory (overrides train.base)")
    p.add_argument("--limit", type=int, help="prepare at most this many samples (of this shard)")
    p.add_argument("--shard", help="I/N: prepare every N-th sample starting at I (run N of these in parallel)")
    p.add_argument("--retry-skipped", action="store_true", help="try again samples an earlier run skipped")
    p.add_argument("--detector", default="auto", help="face detector: auto, insightface, dlib")
    p.add_argument("--face-models", help="directory of face models (default $LYNX_FACE_MODELS)")
    p.add_argument("--face-device", default="cpu", help="device of the ArcFace network")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_prepare)

    t = subparsers.add_parser("train", help="train the Lynx adapters on a prepared cache (torchrun for many GPUs)")
    t.add_argument("--config", required=True, **common)
    t.add_argument("--set", action="append", metavar="TABLE.KEY=VALUE",
                   help="override a config value, typed as TOML (repeatable; nested: train.resampler.dim=64)")
    t.add_argument("--base", help="Wan2.1-T2V diffusers directory (overrides train.base)")
    t.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in train.output_dir, or from the one given")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)
