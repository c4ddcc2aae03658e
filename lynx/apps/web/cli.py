"""`lynx serve`: start the local web page (registered into the `lynx` command through COMMAND_MODULES)."""

from __future__ import annotations

import argparse
import sys


def port_number(text: str) -> int:
    """A TCP port, 0 (pick a free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0 to 65535; 0 picks a free port)")
    return port


def cmd_serve(args) -> int:
    from pathlib import Path

    from ...io.files import check_writable
    from ...runtime import check_attention_backend, default_adapter_dir, default_base_dir, device_and_dtype
    from .server import LynxWebApp, ServeConfig, make_server

    # The machine and the output folder are checked before the port is bound or anything loads.
    device_and_dtype(args.device, args.dtype)
    if args.attention_backend:
        check_attention_backend(args.attention_backend)
    check_writable(Path(args.out_dir) / "photos" / "probe", flag="--out-dir")

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
    s.add_argument("--port", type=port_number, default=7860, help="default 7860; 0 picks a free port")
    s.set_defaults(func=cmd_serve)
