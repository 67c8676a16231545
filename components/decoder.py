from kfp import dsl
from kfp.dsl import Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def decoder(dataset_md5: str, encoder_md5: str, preset: str, config: str, decoder_config: str, code_version: str,
            decoder: Output[Model], metrics: Output[Metrics]) -> str:
    """Visual decoder training (emu.train.stages.train_decoder)."""
    from emu.pipeline.tasks import decoder_task

    return decoder_task(dataset_md5=dataset_md5, encoder_md5=encoder_md5, preset=preset, config=config,
                        decoder_config=decoder_config, code_version=code_version, decoder=decoder, metrics=metrics)
