from kfp import dsl
from kfp.dsl import Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def stage2(dataset_md5: str, init_md5: str, embeddings_md5: str, preset: str, config: str, code_version: str,
           model: Output[Model], metrics: Output[Metrics]) -> str:
    """Stage-2 pretraining (emu.train.stages.stage2)."""
    from emu.pipeline.tasks import stage2_task

    return stage2_task(dataset_md5=dataset_md5, init_md5=init_md5, embeddings_md5=embeddings_md5, preset=preset,
                       config=config, code_version=code_version, model=model, metrics=metrics)
