from kfp import dsl
from kfp.dsl import HTML, Markdown, Metrics, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(dataset_md5: str, model_md5: str, decoder_md5: str, preset: str, config: str, code_version: str,
             production: str, metrics: Output[Metrics], report: Output[HTML], summary: Output[Markdown]) -> str:
    """The benchmark harness and the promotion gate; returns "true" when the gate passes."""
    from emu.pipeline.tasks import evaluate_task

    return evaluate_task(dataset_md5=dataset_md5, model_md5=model_md5, decoder_md5=decoder_md5, preset=preset,
                         config=config, code_version=code_version, production=production, metrics=metrics,
                         report=report, summary=summary)
