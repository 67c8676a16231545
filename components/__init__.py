"""One thin KFP component per pipeline task (DESIGN.md). Each is a lightweight Python component
whose base image is the project image, so kfp.local runs it in this environment and a cluster
runs it in the container; its body calls one task function of emu.pipeline.tasks and nothing else.

Every component takes the md5 (DVC hash) of each input artifact and the code version as
parameters. Their bodies do not read them: they are there so that KFP's cache, which keys on
parameters and artifact names, keys on content and code too, and never serves stale outputs.
Each returns the md5 of its main output for the next task to take.
"""

#: The project image (infra/Dockerfile) by tag: the default when neither pipeline.image nor
#: infra/image.ref (scripts/build-image) names a digest-pinned one (emu/cluster/image.py).
IMAGE = "ghcr.io/emu-platform/emu:0.1.0"
