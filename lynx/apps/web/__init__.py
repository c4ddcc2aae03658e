"""`lynx serve`: a local web page for Lynx, served by the standard library's HTTP server.

`server.LynxWebApp` holds the pipeline (loaded once), the face check and the one running generation;
`server.make_server` puts it behind a `ThreadingHTTPServer`; `static/index.html` is the page (vanilla JS,
no build step). See docs/web.md.
"""

from .server import LynxWebApp, ServeConfig, make_server

__all__ = ["LynxWebApp", "ServeConfig", "make_server"]
