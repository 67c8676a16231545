from kfp import dsl
from kfp.dsl import Dataset, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare(source: str, source_md5: str, preset: str, synth_config: str, import_config: str, code_version: str,
            dataset: Output[Dataset]) -> str:
    """The shard datasets: copied from `source` (a folder, s3:// URI or DVC md5), or the synthetic
    shapes world when `source` is empty (emu.pipeline.tasks.prepare_task)."""
    from emu.pipeline.tasks import prepare_task

    return prepare_task(source=source, source_md5=source_md5, preset=preset, synth_config=synth_config,
                        import_config=import_config, code_version=code_version, dataset=dataset)
