from kfp import dsl
from kfp.dsl import Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def stage1(dataset_md5: str, preset: str, config: str, model_config: str, code_version: str, model: Output[Model],
           metrics: Output[Metrics]) -> str:
    """Stage-1 pretraining (emu.train.stages.stage1)."""
    from emu.pipeline.tasks import stage1_task

    return stage1_task(dataset_md5=dataset_md5, preset=preset, config=config, model_config=model_config,
                       code_version=code_version, model=model, metrics=metrics)
