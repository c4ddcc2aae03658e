"""Front ends: the `lynx` command and the web app. Nothing in the library imports from here."""
