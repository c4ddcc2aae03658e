"""The Gradio pages of Lynx: `lynx serve` (app.py: photos, face check, generate, gallery, saved identities) and
`lynx study` (study.py: a blind rating study); cli.py registers both commands. Nothing here is imported until a
page is served, so the other `lynx` commands start without Gradio. See docs/web.md."""
