from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finish(status: dsl.PipelineTaskFinalStatus) -> str:
    """The exit handler of a cluster run: end its lineage record with KFP's final state."""
    from emu.pipeline.tasks import finish_task

    return finish_task(state=status.state, error=status.error_message or "")
