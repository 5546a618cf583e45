"""Serving a checkpoint on Ray Serve.

- ``rayfine.serve.app:build_app``: the application builder (`serve run`, `serve deploy`, KubeRay).
- ``rayfine.serve.deploy``: `rayfine serve` (deploy, hot swap, --if-better).
- ``rayfine.serve.protocol``: the HTTP protocol (Open Inference Protocol v2 and /predict).
- ``rayfine.serve.client``: `rayfine predict`.

Importing this package imports nothing heavy; the submodules import Ray and torch as they need.
"""
