"""Artifact storage (DESIGN.md, `artifacts/`): the platform's only DVC and boto3 imports live here.

- `emu.artifacts.s3`: the boto3 adapter. Parse `s3://bucket/prefix` URIs, upload a folder,
  download a prefix into a local folder (atomic per object, skips what is already there), and
  `resolve_local`, which turns "a local path or an s3:// URI" (checkpoints, pretrained weights)
  into a local folder.

Importing this package imports nothing: boto3 is imported inside the functions that use it.
"""
