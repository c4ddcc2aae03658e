"""The `lynx` command: `generate` a video of a person, `face` to check a photo, `info` to inspect model dirs."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from ...errors import InputError, LynxError, OutputError, WeightsNotFoundError
from ...io.files import check_writable, slug
from ...pipelines.settings import GenerationSettings, flags, help_text, parse_text
from ...pipelines.settings import flag as settings_flag
from ...runtime import device_and_dtype
from ..options import (
    MEMORY_CHOICES,
    add_model_options,
    add_speed_options,
    check_input_file,
    check_model_folder,
    check_model_options,
    check_speed_options,
    load_pipeline,
    load_safety_gate,
    memory_choice,
    speed_record,
    speed_setup,
    speed_sigmas,
    transformer_files,
)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`lynx generate: error: ...`); the usage is in --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cli_flag(name: str) -> str:
    """The flag of a call option an error message names (see `lynx.errors.option`)."""
    if name in GenerationSettings.model_fields:
        return settings_flag(name)
    return {"base_dir": "--base"}.get(name, "--" + name.replace("_", "-"))


def add_settings_options(p: argparse.ArgumentParser) -> None:
    """The generation knobs, generated from `GenerationSettings`' fields (flags, help and defaults)."""
    group = p.add_argument_group("generation settings (unset: the variant's default)")
    for name, field in GenerationSettings.model_fields.items():
        help = help_text(name).replace("%", "%%")  # argparse %-formats help ("60% of the steps" broke --help)
        if field.annotation is bool:
            group.add_argument(*flags(name), dest=name, action="store_true", help=help)
        else:
            group.add_argument(*flags(name), dest=name, metavar=name.upper(), help=help)


def settings_from_args(args) -> GenerationSettings:
    """The knobs as typed; the settings check them (`--steps 2.5 must be a whole number (try 2 or 3)`)."""
    return GenerationSettings(**{name: parse_text(name, value) if isinstance(value, str) else value
                                 for name, value in ((n, getattr(args, n)) for n in GenerationSettings.model_fields)})


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def output_path(args, seed: int | None = None) -> Path:
    """Where the video goes. Names built from inputs (and the seed, default `args.seed`) are sanitised and must
    stay inside --out-dir."""
    out_dir = Path(args.out_dir)
    if args.out:
        path = Path(args.out)
    else:
        source = (args.image or [None])[0] or args.identity or getattr(args, "embedding", None)
        stem = Path(source).stem if source else "person"
        name = f"{slug(stem, 24)}-{slug(args.prompt)}-s{args.seed if seed is None else seed}{args.format}"
        path = out_dir / name
        if not _inside(path, out_dir):
            raise InputError(f"refusing to write {path}: names made from inputs must stay inside {out_dir}")
    if path.suffix.lower() not in (".mp4", ".webp", ".gif"):
        raise InputError(f"--out must end in .mp4, .webp or .gif, not {path.name!r}")
    side = path.with_name(path.name + ".json")
    if side.is_dir():  # the record could only be written after the whole generation, and then not at all
        raise OutputError(f"{side} is a folder, but the video's record (sidecar) is written there; move the folder "
                          "or choose another --out")
    for p in (path, side):
        if p.exists() and not p.is_dir() and not args.overwrite:
            raise InputError(f"{p} already exists; pass --overwrite to replace it, or choose another --out")
    check_writable(path, flag="--out" if args.out else "--out-dir")
    return path


def _read_prompt(value: str) -> str:
    if value.startswith("@@"):  # a prompt that itself starts with @ (sidecar commands write it so)
        return value[1:]
    if value.startswith("@"):
        path = Path(value[1:])
        if path.is_dir():
            raise InputError(f"prompt file {path} is a folder, not a file (--prompt @FILE reads a text file)")
        if not path.is_file():
            raise InputError(f"prompt file {path} does not exist")
        try:
            return path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as e:
            raise InputError(f"prompt file {path} is not UTF-8 text (byte {e.start + 1} is not); save it as UTF-8, "
                             "or give the text itself with --prompt") from None
        except OSError as e:
            raise InputError(f"prompt file {path} cannot be read ({e.strerror})") from None
    return value


def _parallel_layout(args, adapter_cfg, settings, base):
    """Under torchrun: the mesh the processes will form, checked before any weight loads. None: one process."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not (args.guidance_parallel or args.context_parallel):
        if world > 1:
            raise InputError("started by torchrun with several processes: add --guidance-parallel and/or "
                             "--context-parallel ulysses|ring so they share the work (or run one process)")
        return None
    if world < 2:
        if args.guidance_parallel:
            raise InputError("--guidance-parallel needs several processes: "
                             "torchrun --nproc-per-node 3 -m lynx generate ...")
        return None  # one process holds the whole sequence
    if args.context_parallel and (args.memory or args.offload):
        raise InputError("--context-parallel keeps each rank's transformer on its own GPU: drop --memory/--offload "
                         "(the sequence split already divides the activations; `lynx plan` shows what fits)")
    if args.context_parallel and args.speed == "fast":
        raise InputError("--speed fast uses a step cache, which would decide on each rank's shard of the sequence "
                         "(ranks could skip different blocks): use --speed exact or turbo with --context-parallel")
    from ...models.loading import inspect_base_dir
    from ...pipelines.parallel import plan

    g = settings.guidance_scale
    branches = 1 if g <= 1 else 2 if settings.two_way else 3
    return plan(world, args.context_parallel, args.cp_degree, args.guidance_parallel, branches,
                inspect_base_dir(base).transformer_config, settings.height, settings.width,
                min(settings.num_frames, settings.context_frames), adapter_cfg.use_ref and settings.ref_scale != 0)


def _init_distributed(args) -> int:
    """Join torchrun's process group, one GPU per rank. Returns the rank."""
    import os

    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and not (args.device or "").startswith("cpu")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank()


def check_face_index(value) -> None:
    """--face-index is checked before anything loads; whether that face exists is known after detection."""
    if value is not None and value < 0:
        raise InputError(f"--face-index must be 0 or more (0 = the largest face), not {value}")


def analyze_photos(analyzer, photos: list, face_index: int | None, command: str):
    """FaceIdentity of the photos, with the several-faces warning worded for the command line."""
    from ...face import SeveralFacesWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SeveralFacesWarning)
        identity = analyzer.analyze(photos if len(photos) > 1 else photos[0], face_index=face_index)
    for w in caught:
        if isinstance(w.message, SeveralFacesWarning):
            print(f"lynx {command}: warning: {w.message.message_for('--face-index N')}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return identity


def _load_embedding(path: str):
    """A .npy of 512 finite numbers (an ArcFace embedding), or an `InputError` saying what the file is instead."""
    import numpy as np

    try:
        emb = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise InputError(f"--embedding {path} is not a NumPy .npy file (make one with numpy.save, or give the photo "
                         "with --image)") from None
    if emb.dtype.kind not in "fiu" or emb.size != 512 or not np.isfinite(emb).all():
        raise InputError(f"--embedding {path} must hold 512 finite numbers (an ArcFace embedding), not "
                         f"{emb.dtype} {list(emb.shape)}")
    return emb.astype(np.float32).reshape(512)


def _load_reference(path: str):
    """The --reference crop, or an `InputError` naming the flag (the pipeline would refuse a crop of another size
    only after loading the model, and in its own words)."""
    from ...face import load_image
    from ...face.alignment import REFERENCE_SIZE

    try:
        crop = load_image(path)
    except InputError as e:  # the file's own problem, said of the flag that named it
        raise InputError(f"--reference {e}") from None
    if crop.shape[:2] != (REFERENCE_SIZE, REFERENCE_SIZE):
        raise InputError(f"--reference {path} is {crop.shape[1]}x{crop.shape[0]}; it must be the {REFERENCE_SIZE}x"
                         f"{REFERENCE_SIZE} aligned face crop (`lynx face PHOTO` writes one)")
    return crop


def check_generate_args(args):
    """Everything `lynx generate` can check before loading a model, in the order a person fixes them.

    Returns (base, adapter, adapter config, resolved settings, output path, device, dtype); raises a `LynxError`
    (one line) on the first problem."""
    from ...runtime import check_attention_backend, default_adapter_dir, default_base_dir

    args.prompt = _read_prompt(args.prompt)
    if not args.prompt.strip():
        raise InputError("--prompt is empty")
    if args.face_index is not None and not args.image:
        raise InputError("--face-index chooses a face in --image photos; it does not apply to --identity or "
                         "--embedding")
    sources = [bool(args.image), bool(args.identity), bool(args.embedding)]
    if sum(sources) != 1:
        raise InputError("give the person with exactly one of --image PHOTO..., --identity FILE (from `lynx face`) "
                         "or --embedding FILE.npy (+ --reference CROP.png for the full model)")
    if args.reference and not args.embedding:
        raise InputError("--reference goes with --embedding (photos and identity files bring their own crop)")
    # The settings first: they need nothing from disk, and the variant only for their defaults.
    typed = settings_from_args(args)
    base = Path(args.base or default_base_dir())
    adapter = Path(args.adapter or default_adapter_dir(args.variant))
    check_model_folder(base, "--base")
    check_model_folder(adapter, "--adapter")
    # Every missing download is reported at once, before anything else is checked or loaded.
    from ...models.loading import check_model_dirs

    missing = []
    try:
        adapter_cfg = check_model_dirs(base, adapter, transformer_files(args))
    except WeightsNotFoundError as e:
        missing.append(str(e))
    else:
        from ...models.loading import inspect_base_dir

        two_experts = inspect_base_dir(base).two_experts
        if args.experts == "both" and not two_experts:
            raise InputError(f"--experts both needs a two-expert base (Wan2.2-T2V-A14B); {base} has one transformer")
        if typed.guidance_scale_2 is not None and not two_experts:
            raise InputError(f"--guidance-2 is the low-noise expert's guidance; {base} has one transformer")
    if args.image:
        from ...face import arcface_missing

        missing += [m for m in [arcface_missing(args.face_models)] if m]
    if missing:
        raise WeightsNotFoundError("\n\n".join(missing))
    loras = check_speed_options(args.speed, args.lora, args.compile, memory_choice(args.memory, args.offload))
    # A speed preset fills the knobs not given (`--speed turbo --steps 6`: six steps).
    from ...pipelines.speed import preset_settings

    settings = GenerationSettings(**{**preset_settings(args.speed), **typed.given()}).resolve(adapter_cfg.variant)
    for name, paths in (("--image", args.image or []), ("--identity", [args.identity]),
                        ("--embedding", [args.embedding]), ("--reference", [args.reference])):
        for p in paths:
            if p:
                check_input_file(p, name)
    if args.embedding and not args.reference and adapter_cfg.use_ref and settings.ref_scale != 0:
        raise InputError(f"{adapter_cfg.variant} adapters ({adapter}) also need --reference CROP.png, the 256x256 "
                         "aligned face crop (`lynx face PHOTO` writes one); or pass --ref-scale 0 to run without "
                         "the Ref-adapter")
    out = output_path(args, settings.seed)
    device, dtype = device_and_dtype(args.device, args.dtype)
    if args.attention_backend:
        check_attention_backend(args.attention_backend)
    return base, adapter, adapter_cfg, settings, loras, out, device, dtype


def cmd_generate(args) -> int:
    base, adapter, adapter_cfg, settings, loras, out, device, dtype = check_generate_args(args)
    layout = _parallel_layout(args, adapter_cfg, settings, base)
    identity_kwargs = {}
    if args.image:
        from ...face import FaceAnalyzer

        analyzer = FaceAnalyzer(args.detector, models_dir=args.face_models)
        identity_kwargs["identity"] = analyze_photos(analyzer, args.image, settings.face_index, "generate")
    elif args.identity:
        from ...face import FaceIdentity

        identity_kwargs["identity"] = FaceIdentity.load(args.identity)
    else:
        identity_kwargs["face_embedding"] = _load_embedding(args.embedding)
        if args.reference:
            identity_kwargs["reference_image"] = _load_reference(args.reference)

    faces_used = identity_kwargs["identity"].faces_used() if "identity" in identity_kwargs else []
    from ...face.identity import describe_face

    for record in faces_used:
        print(f"face: {record['source'] or '(in-memory image)'}: {describe_face(record)}", file=sys.stderr)

    memory = memory_choice(args.memory, args.offload)
    rank = _init_distributed(args) if layout is not None else None
    device, dtype = device_and_dtype(args.device, args.dtype)
    gguf = [f for f in transformer_files(args).values() if f]
    check_model_options(memory, device, "gguf" if gguf else None)
    gate = None if rank else load_safety_gate(args, device)  # the rank that writes the video checks it
    print(f"loading {base} + {adapter} ({adapter_cfg.variant}, {dtype}, {device}"
          f"{f', memory preset {memory}' if memory else ''}{', transformer from ' + ', '.join(gguf) if gguf else ''})",
          file=sys.stderr)
    pipe = load_pipeline(base, adapter, device=device, dtype=dtype, attention_backend=args.attention_backend,
                         memory=memory, vae_tiling=args.vae_tiling, experts=args.experts,
                         base_transformer=args.base_transformer, base_transformer_2=args.base_transformer_2)
    if layout is not None:
        from ...pipelines.parallel import lay_out

        lay_out(pipe, layout)
    video_windows = _windows(settings).video_windows(settings.num_frames)
    if len(video_windows) > 1:
        print(f"long video: {len(video_windows)} context windows of {settings.context_frames} frames, overlap "
              f"{settings.context_overlap}, {settings.context_blend} blending", file=sys.stderr)
    lines = speed_setup(pipe, args.speed, loras, args.compile, settings)
    if args.batch_branches and rank is not None:
        lines.append("batch-branches: off under --guidance-parallel")
    if not rank:
        for line in lines:
            print(line, file=sys.stderr)
    sigmas = speed_sigmas(args.speed, settings.num_inference_steps)
    started = time.time()
    result = pipe(args.prompt, **identity_kwargs, **settings.model_dump(), output_type="np", sigmas=sigmas,
                  guidance_parallel=True if rank is not None and args.guidance_parallel else None)
    frames = result.frames[0]
    seconds = time.time() - started
    if rank:  # every rank holds the same video; rank 0 writes it
        return 0

    from ...io.safety import unchecked
    from ...pipelines.record import make_record, write_video

    # Refused frames raise UnsafeVideoError here, before any file or folder is made.
    safety = gate.check(frames) if gate else unchecked("switched off" if args.no_safety_check else "no classifier")
    record = make_record(
        out, args.prompt, result.settings, variant=adapter_cfg.variant, base=base, adapter=adapter, dtype=dtype,
        device=device, source="lynx generate", safety=safety, photos=args.image or [], identity_file=args.identity,
        embedding_file=args.embedding, reference=args.reference, seconds=seconds, faces=faces_used,
        speed=speed_record(args.speed, loras, args.compile),
        experts=pipe.experts if pipe.transformer_2 is not None else None,
        context_windows=video_windows, command_extra=model_command_flags(args),
        base_transformer={sub: str(Path(f).resolve()) for sub, f in transformer_files(args).items() if f} or None)
    write_video(frames, out, record)
    print(out)
    return 0


def _windows(settings):
    from ...pipelines.windows import ContextWindows

    return ContextWindows(frames=settings.context_frames, overlap=settings.context_overlap,
                          blend=settings.context_blend)


def given_flags(args, *adders, skip: tuple[str, ...] = (), convert: dict | None = None) -> list[str]:
    """The options of the `adders` groups given values other than their defaults, as flags again; `convert` maps
    an option's name to a function applied to each of its values."""
    parser = argparse.ArgumentParser(add_help=False)
    for add in adders:
        add(parser)
    flags_: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default or value is None:
            continue
        flag_ = action.option_strings[-1]
        if action.nargs == 0:
            flags_.append(flag_)
        else:
            for v in value if isinstance(action, argparse._AppendAction) else [value]:
                flags_ += [flag_, str((convert or {}).get(action.dest, str)(v))]
    return flags_


def _absolute_lora(spec: str) -> str:
    from ...models.lora import parse_lora_spec

    path, scale = parse_lora_spec(spec)
    return f"{Path(path).resolve()}:{scale}"


def model_command_flags(args) -> list[str]:
    """The model and speed options of this run, for the sidecar's equivalent command: paths made absolute, so the
    command makes the video again from any folder."""
    absolute = lambda p: Path(p).resolve()  # noqa: E731
    return given_flags(args, add_model_options, add_speed_options,
                       skip=("base", "adapter", "variant", "dtype", "device"),
                       convert={"base_transformer": absolute, "base_transformer_2": absolute, "face_models": absolute,
                                "safety_model": absolute, "lora": _absolute_lora})


def _face_check_without_embedding(args, analyzer, missing: str) -> int:
    """Detection and crops need no download: show them, and say what the embedding still needs."""
    from PIL import Image

    from ...face import SeveralFacesWarning
    from ...face.identity import face_lines

    out_dir = Path(args.out_dir)
    for photo in args.photos:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SeveralFacesWarning)
            found = analyzer.find(photo, face_index=args.face_index)
        for w in caught:
            print(f"lynx face: warning: {w.message.message_for('--face-index N')}", file=sys.stderr)
        w, h = found.image_size
        print(f"photo: {photo} ({w}x{h})")
        print("\n".join(face_lines(found.num_faces, found.index, found.face.box, found.face.score, found.detector)))
        if not args.no_save:
            name = slug(Path(photo).stem, 40)
            for kind, crop in (("arcface112", found.arcface_crop), ("reference256", found.reference_crop)):
                path = out_dir / f"{name}-{kind}.png"  # checked by check_face_outputs
                out_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(crop).save(path)
                print(f"wrote {kind} crop: {path}")
    print(f"\nno identity file written: the face embedding needs the ArcFace weights.\n{missing}")
    return 0


def face_outputs(args, embedding: bool) -> dict[str, Path]:
    """The files `lynx face` writes, by kind: the identity and its crops, or (no embedding) each photo's crops."""
    out_dir = Path(args.out_dir)
    if embedding:
        name = slug(args.name or Path(args.photos[0]).stem, 40)
        return {"identity": out_dir / f"{name}.identity", "arcface": out_dir / f"{name}-arcface112.png",
                "reference": out_dir / f"{name}-reference256.png"}
    return {f"{kind} crop of {photo}": out_dir / f"{slug(Path(photo).stem, 40)}-{kind}.png"
            for photo in args.photos for kind in ("arcface112", "reference256")}


def check_face_outputs(args, paths: dict[str, Path]) -> None:
    """Every file `lynx face` will write, proven writable before a face model runs (a refusal after the analysis
    wasted it, and one between two files left the first written)."""
    out_dir = Path(args.out_dir)
    seen: dict[Path, str] = {}
    for kind, p in paths.items():
        if not _inside(p, out_dir):
            raise InputError(f"refusing to write {p} outside {out_dir}")
        if p in seen:
            raise InputError(f"the {seen[p]} and the {kind} would both be written to {p}; run `lynx face` once "
                             "per photo name, or rename one photo")
        seen[p] = kind
        if p.is_dir():
            raise OutputError(f"{p} is a folder where the {kind} goes; move it, or choose another --out-dir or "
                              "--name")
        if p.exists() and not args.overwrite:
            raise InputError(f"{p} already exists; pass --overwrite to replace it")
        check_writable(p, flag="--out-dir")


def cmd_face(args) -> int:
    from ... import face

    check_face_index(args.face_index)
    out_dir = Path(args.out_dir)
    missing = face.arcface_missing(args.face_models)
    paths = face_outputs(args, embedding=missing is None)
    if not args.no_save:
        check_face_outputs(args, paths)
    analyzer = face.FaceAnalyzer(args.detector, models_dir=args.face_models, embedding=missing is None)
    if missing:
        return _face_check_without_embedding(args, analyzer, missing)
    identity = analyze_photos(analyzer, args.photos, args.face_index, "face")
    print(face.describe(identity))
    if args.no_save:
        return 0
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    identity.save(paths["identity"])
    Image.fromarray(identity.arcface_crop).save(paths["arcface"])
    Image.fromarray(identity.reference_crop).save(paths["reference"])
    for kind, p in paths.items():
        print(f"wrote {kind}: {p}")
    return 0


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def cmd_info(args) -> int:
    from ...models.loading import download_instructions, inspect_base_dir, read_adapter_config
    from ...runtime import default_adapter_dir, default_base_dir

    base = Path(args.base or default_base_dir())
    report = inspect_base_dir(base)
    print(f"base model: {base}")
    for sub, ok in report.found.items():
        print(f"  {sub:13s} {'ok' if ok else 'MISSING'}")
    tcfg = report.transformer_config
    if tcfg:
        num_blocks, width = report.transformer_shape
        print(f"  transformer: {tcfg['num_layers']} blocks, {tcfg['num_attention_heads']} heads x "
              f"{tcfg['attention_head_dim']} = {width} wide, FFN {tcfg['ffn_dim']}, text_dim {tcfg['text_dim']}")
    for problem in report.problems:
        print(f"  problem: {problem}")
    defaults = [default_adapter_dir("full"), default_adapter_dir("lite")]
    adapters = [Path(a) for a in args.adapter] if args.adapter else [d for d in defaults if d.exists()]
    status = 0 if report.ok else 1
    to_download = []  # adapter folders to download, with the --adapter that then points at them
    if not adapters:
        print(f"adapter: none found ({' or '.join(map(str, defaults))})")
        to_download.append(defaults[0])
        status = 1
    for a in adapters:
        print(f"adapter: {a}")
        if not a.is_dir():
            print(f"  problem: {a} {'is a file, not a folder' if a.exists() else 'does not exist'}")
            to_download += [] if a.exists() else [a]
            status = 1
            continue
        if not tcfg:
            print("  (cannot check against the base: no transformer config)")
            continue
        try:
            cfg, states = read_adapter_config(a, num_blocks, width)
        except LynxError as e:
            # Only the problem here: its download lines are gathered below, for each folder as it was given.
            print(f"  problem: {str(e).splitlines()[0]}")
            if isinstance(e, WeightsNotFoundError) or "\n" in str(e):
                to_download.append(a)
            status = 1
            continue
        counts = {k: sum(v.numel() for v in s.values()) for k, s in states.items() if s is not None}
        print(f"  variant {cfg.variant}: ID branch on {len(cfg.ip_blocks)} blocks "
              f"({'bias' if cfg.ip_bias else 'no bias'}, key norm {cfg.ip_key_norm}, {cfg.num_registers} registers), "
              f"Ref branch {'on every block' if cfg.use_ref else 'absent'}")
        r = cfg.resampler
        print(f"  resampler: {r.embedding_dim} -> {r.num_queries} tokens x {r.output_dim} "
              f"(dim {r.dim}, depth {r.depth})")
        print("  parameters: " + ", ".join(f"{k} {_count(v)}" for k, v in counts.items())
              + f", total {_count(sum(counts.values()))}")
    from ...io.safety import safety_model_missing
    from ...runtime import safety_model_dir

    notice = safety_model_missing()
    print(f"safety classifier: {safety_model_dir()}" + (f"\n  {notice}" if notice else " (the safety gate is on)"))
    if not report.ok and not base.is_file():
        print("\n" + download_instructions(base))
    for a in to_download:
        print("\n" + download_instructions(adapter_dir=a))
    return status


def _card_gib(text: str) -> float:
    """--gpu-gib: a card's memory, a positive number of GiB (argparse words the refusal)."""
    import math

    try:
        gib = float(text)
    except ValueError:
        gib = math.nan
    if not (math.isfinite(gib) and gib > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a card size: give its memory in GiB, a number above 0 "
                                         "(e.g. 24)")
    return gib


def cmd_plan(args) -> int:
    from ...models.lora import lora_bytes
    from ...pipelines.memory import MEMORY_PRESETS, get_preset
    from ...pipelines.plan import GIB, build_models, plan_memory, plan_settings

    size = dict(frames=args.frames, height=args.height, width=args.width, context_frames=args.context_frames,
                allow_large=args.allow_large)
    plan_settings(args.variant, **size)  # before the LoRAs are read and the models built
    loras = check_speed_options("exact", args.lora)  # each file a LoRA
    transformer = build_models(args.variant).transformer if loras else None  # the 14B's shapes, on meta
    lora = sum(lora_bytes(path, transformer) for path, _ in loras)  # a LoRA for another model size is refused
    fits = []
    for name in args.memory or list(MEMORY_PRESETS):
        plan = plan_memory(name, args.variant, lora=lora, **size)
        print(plan.table())
        print(f"  meant for: {get_preset(name).gpu}\n")
        if args.gpu_gib:  # the CUDA context comes on top of what torch allocates
            fits.append(f"{name} {'fits' if plan.peak.total + 0.5 * GIB <= args.gpu_gib * GIB else 'does not fit'}")
    if fits:
        print(f"on a {args.gpu_gib:g} GiB card: " + ", ".join(fits))
    return 0


# Modules that add their own subcommands through a `register(subparsers)` function.
COMMAND_MODULES: tuple[str, ...] = ("lynx.apps.cli.evaluate", "lynx.apps.cli.train", "lynx.apps.web.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lynx", description="Lynx personalized video generation")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="make a video of the person in a photo doing what the prompt says")
    who = g.add_argument_group("the person (one of)")
    who.add_argument("--image", nargs="+", help="photo(s) of the person; several photos combine into one identity")
    who.add_argument("--identity", help="identity file written by `lynx face`")
    who.add_argument("--embedding", help=".npy with a 512-d ArcFace embedding")
    who.add_argument("--reference", help="256x256 aligned face crop (full model, with --embedding)")
    g.add_argument("--prompt", required=True, help="text, or @FILE to read it from a file; text that starts with "
                                                   "@ is written with two (@@text)")
    add_model_options(g)
    g.add_argument("--out", help="output file (.mp4, .webp or .gif); default: a name from the inputs in --out-dir")
    g.add_argument("--out-dir", default="outputs")
    g.add_argument("--format", choices=(".mp4", ".webp", ".gif"), default=".mp4", help="format of generated names")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_settings_options(g)
    g.add_argument("--guidance-parallel", action="store_true",
                   help="under torchrun: run the guidance branches on different GPUs (3 for full, 2 for lite)")
    g.add_argument("--context-parallel", choices=("ulysses", "ring"),
                   help="under torchrun: split the video sequence over GPUs (docs/multigpu.md)")
    g.add_argument("--cp-degree", type=int, help="GPUs per sequence (default: all, or all / branches with "
                                                 "--guidance-parallel)")
    add_speed_options(g)
    g.set_defaults(func=cmd_generate)

    f = sub.add_parser("face", help="find the face in photo(s), write the crops and a reusable identity file")
    f.add_argument("photos", nargs="+")
    f.add_argument("--out-dir", default="outputs/faces")
    f.add_argument("--name", help="base name of the written files (default: the first photo's name)")
    f.add_argument("--detector", default="auto")
    f.add_argument("--face-models")
    f.add_argument("--face-index", type=int, help="which face in a photo with several: 0 = the largest (default)")
    f.add_argument("--no-save", action="store_true", help="only print what was found")
    f.add_argument("--overwrite", action="store_true")
    f.set_defaults(func=cmd_face)

    i = sub.add_parser("info", help="show what is in the model directories and what is missing")
    i.add_argument("--base")
    i.add_argument("--adapter", nargs="*")
    i.set_defaults(func=cmd_info)

    pl = sub.add_parser("plan", help="predict the peak GPU memory of each phase under a memory preset (no GPU needed)")
    pl.add_argument("--memory", nargs="+", choices=MEMORY_CHOICES, help="preset(s) to plan (default: all)")
    pl.add_argument("--variant", choices=("full", "lite"), default="full")
    pl.add_argument("--frames", type=int, help="4k+1 (default 81 full, 121 lite); beyond --context-frames, "
                                               "denoised in context windows as `lynx generate` does")
    pl.add_argument("--height", type=int, help="default 480")
    pl.add_argument("--width", type=int, help="default 832")
    pl.add_argument("--context-frames", type=int, help="frames per context window, as for `lynx generate` "
                                                       "(default: the variant's clip, 81 full, 121 lite)")
    pl.add_argument("--allow-large", action="store_true",
                    help="lift the limits on frames and sides, as for `lynx generate`")
    pl.add_argument("--gpu-gib", type=_card_gib, help="say which of the presets fit on a card of this many GiB")
    pl.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                    help="count a LoRA's weights too, as `lynx generate --lora` loads them (repeatable)")
    pl.set_defaults(func=cmd_plan)

    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LynxError as e:
        print(f"lynx {args.command}: error: {e.render(cli_flag)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was overwritten", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
