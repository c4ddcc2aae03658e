"""`lynx serve`: start the local web page (registered into the `lynx` command through COMMAND_MODULES)."""

from __future__ import annotations

import sys


def cmd_serve(args) -> int:
    from pathlib import Path

    from ..loading import default_adapter_dir, default_base_dir
    from .server import LynxWebApp, ServeConfig, make_server

    config = ServeConfig(base=Path(args.base or default_base_dir()),
                         adapter=Path(args.adapter or default_adapter_dir(args.variant)),
                         out_dir=Path(args.out_dir), dtype=args.dtype, device=args.device,
                         face_models=Path(args.face_models) if args.face_models else None,
                         detector=args.detector, attention_backend=args.attention_backend)
    app = LynxWebApp(config)
    server = make_server(app, args.host, args.port)  # bind first: a busy port fails before any loading
    app.start()
    if app.missing():
        print(f"lynx serve: cannot generate yet; the page shows what to download:\n{app.missing()}\n",
              file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lynx serve: listening on {args.host}: anyone who can reach this machine can use the GPU and "
              f"see the videos in {config.out_dir}", file=sys.stderr)
    # Tests and scripts read this line to find the port when --port 0 picked one.
    print(f"lynx serve: open {server.url} (Ctrl+C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("lynx serve: stopped", file=sys.stderr)
    finally:
        server.server_close()
        app.close()
    return 0


def register(subparsers) -> None:
    from ..cli import DTYPES

    s = subparsers.add_parser("serve", help="a local web page: upload a photo, check the face, generate, watch")
    s.add_argument("--base", help="Wan2.1-T2V-14B-Diffusers directory (default $LYNX_MODELS/Wan2.1-T2V-14B-Diffusers)")
    s.add_argument("--adapter", help="lynx_full or lynx_lite directory (default $LYNX_MODELS/lynx_<variant>)")
    s.add_argument("--variant", choices=("full", "lite"), default="full", help="which default adapter dir to use")
    s.add_argument("--dtype", choices=tuple(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    s.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when present)")
    s.add_argument("--attention-backend", help="diffusers attention backend: native, flash, _flash_3, sage, ...")
    s.add_argument("--face-models", help="directory of face models (default $LYNX_FACE_MODELS or ~/.cache/lynx/face)")
    s.add_argument("--detector", default="auto", help="face detector: auto, insightface, dlib, dlib-cnn")
    s.add_argument("--out-dir", default="outputs", help="videos, sidecars and uploaded photos (photos/) go here")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=7860, help="default 7860; 0 picks a free port")
    s.set_defaults(func=cmd_serve)
