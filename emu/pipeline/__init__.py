"""Part 5: the stages as one Kubeflow pipeline (components/, pipelines/), run on this machine by
`emu run` through kfp.local or submitted to a KFP cluster, with every artifact content-addressed
by DVC and every execution recorded in the lineage store.

    config     pipeline settings: image, per-stage resources (GPU node pools), data split
    tasks      one function per pipeline task: lineage + DVC around the stage function
    runner     `emu run`: resolve configs, compute cache-relevant hashes, run or submit
    schedules  `emu schedule ...` and the local `emu scheduler`
"""
