"""One thin KFP component per pipeline task (DESIGN.md). Each is a lightweight Python component
whose base image is the project image, so kfp.local runs it in this environment and a cluster
runs it in the container; its body calls one task function of emu.pipeline.tasks and nothing else.

Every component takes its inputs as DVC md5s (the task pulls them from the remote:
emu.pipeline.handoff), never as KFP artifacts (register aside: it reads evaluate's metrics
artifact), and its code version as a parameter: KFP's cache
keys on parameters, so it keys on content and code, never on which run made an input. Each passes
all of its parameters on (the task records them as its cache identity: emu.pipeline.cached_lineage)
and returns the md5 of its main output for the next task to take.
"""

#: The project image (infra/Dockerfile) by tag: the default when neither pipeline.image nor
#: infra/image.ref (scripts/build-image) names a digest-pinned one (emu/cluster/image.py).
IMAGE = "ghcr.io/emu-platform/emu:0.1.0"
