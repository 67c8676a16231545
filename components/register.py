from kfp import dsl
from kfp.dsl import Input, Metrics

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(model_md5: str, decoder_md5: str, evaluation: Input[Metrics], code_version: str, production: str) -> str:
    """Promote the evaluated model (and its decoder) to production in the registry."""
    from emu.pipeline.tasks import register_task

    return register_task(model_md5=model_md5, decoder_md5=decoder_md5, code_version=code_version,
                         evaluation=evaluation, production=production)
