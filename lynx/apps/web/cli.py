"""`lynx serve`: start the local web page (registered into the `lynx` command through COMMAND_MODULES)."""

from __future__ import annotations

import sys


def cmd_serve(args) -> int:
    from pathlib import Path

    from ...runtime import default_adapter_dir, default_base_dir
    from .server import LynxWebApp, ServeConfig, make_server

    config = ServeConfig(base=Path(args.base or default_base_dir()),
                         adapter=Path(args.adapter or default_adapter_dir(args.variant)),
                         out_dir=Path(args.out_dir), dtype=args.dtype, device=args.device,
                         face_models=Path(args.face_models) if args.face_models else None,
                         detector=args.detector, attention_backend=args.attention_backend,
                         offload=args.offload, vae_tiling=args.vae_tiling,
                         safety_check=not args.no_safety_check, safety_model=args.safety_model)
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
    from ..cli import add_model_options

    s = subparsers.add_parser("serve", help="a local web page: upload a photo, check the face, generate, watch")
    add_model_options(s)
    s.add_argument("--out-dir", default="outputs", help="videos, sidecars and uploaded photos (photos/) go here")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=7860, help="default 7860; 0 picks a free port")
    s.set_defaults(func=cmd_serve)
