"""Artifact storage (DESIGN.md, `artifacts/`): the platform's only DVC and boto3 imports live here.

- `emu.artifacts.s3`: the boto3 adapter. Parse `s3://bucket/prefix` URIs, upload a folder,
  download a prefix into a local folder (atomic per object, skips what is already there), and
  `resolve_local`, which turns "a local path or an s3:// URI" (checkpoints, pretrained weights)
  into a local folder.
- `emu.artifacts.dvc`: the DVC adapter. `ArtifactStore` content-addresses files and folders into a
  DVC remote (a local folder by default, S3 via dvc-s3) by DVC md5 (`md5`, `push`, `pull`,
  `exists`), keeping DVC's own state in a private workdir; `pull_run` restores every artifact of a
  run as `<stage>/<role>/` plus a manifest.
- `emu.artifacts.cli`: the `emu artifacts` commands (`pull RUN_ID`, `get MD5`, `push`, `md5`,
  `exists`).

Importing this package imports nothing: boto3 and dvc are imported inside the functions that use them.
"""
