from kfp import dsl
from kfp.dsl import HTML, Metrics, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate(dataset_md5: str, preset: str, config: str, code_version: str, report: Output[HTML],
             metrics: Output[Metrics]) -> str:
    """The Great Expectations gate; fails the task (and stops the pipeline) when the data fails."""
    from emu.pipeline.tasks import validate_task

    return validate_task(dataset_md5=dataset_md5, preset=preset, config=config, code_version=code_version,
                         report=report, metrics=metrics)
