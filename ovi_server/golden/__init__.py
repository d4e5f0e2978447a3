"""Golden parity checker: runs reference test vectors through the project's own loaders and models.

`python -m ovi_server.golden check DIR [--component NAME ...]`; the format of DIR is described in
`tests/golden/README.md`: one folder per component with a `manifest.json` listing cases.
"""
