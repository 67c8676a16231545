from kfp import dsl
from kfp.dsl import Dataset, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def precompute(dataset_md5: str, model_md5: str, preset: str, config: str, code_version: str,
               embeddings: Output[Dataset]) -> str:
    """Visual embeddings of every image with the stage-1 encoder (emu.precompute, Ray Data)."""
    from emu.pipeline.tasks import precompute_task

    return precompute_task(dataset_md5=dataset_md5, model_md5=model_md5, preset=preset, config=config,
                           code_version=code_version, embeddings=embeddings)
