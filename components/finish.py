from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finish(status: dsl.PipelineTaskFinalStatus, preset: str, source: str, source_md5: str, production: str,
           prepare_code_version: str, validate_code_version: str, stage1_code_version: str,
           precompute_code_version: str, stage2_code_version: str, decoder_code_version: str,
           instruct_code_version: str, evaluate_code_version: str, register_code_version: str, synth_config: str,
           import_config: str, validate_config: str, stage1_config: str, model_config: str, precompute_config: str,
           stage2_config: str, decoder_config: str, visual_decoder_config: str, instruct_config: str,
           evaluate_config: str) -> str:
    """The exit handler of a cluster run: record the tasks KFP served from its cache, then end the
    run's lineage record with KFP's final state (emu.pipeline.tasks.finish_task). It takes every
    pipeline parameter: the cached tasks' parameters are derived from them."""
    arguments = {name: value for name, value in locals().items() if name != "status"}
    from emu.pipeline.tasks import finish_task

    return finish_task(state=status.state, error=status.error_message or "", arguments=arguments)
