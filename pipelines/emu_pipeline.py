"""The Emu pipeline graph (DESIGN.md):

    prepare ─► validate ─► stage1 ─► precompute ─┬─► stage2 ─► instruct ─┐
                                                 └─► decoder ────────────┴─► evaluate ─► register (gate passed)

Tasks hand each other DVC md5s, never KFP artifacts (emu.pipeline.handoff): each pulls its inputs
from the DVC remote by md5, so the cache keys on content.

Parameters: `preset` (configs/<name>.yaml), `source` (shard datasets to train on: a folder, an
s3:// URI or a DVC md5; empty = the synthetic shapes world) with its `source_md5` (empty when
`prepare` reads the source at run time: `build_pipeline`), each
stage's code version (`<stage>_code_version`: emu.pipeline.code_version, so a change re-runs only
the stages whose code it touches), the registry's production model at submission (`production`:
evaluate's gate and register compare with it, so a promotion in between is never answered from a
stale cache; by default `@run`: looked up when evaluate runs, for runs whose arguments were fixed
earlier, recurring runs and the KFP UI's), and one resolved config per stage (JSON; empty = the preset's section). Each task
gets only its own stage's config and the md5 of its inputs, so changing a stage-2 setting re-runs
stage 2 and what depends on it, and nothing upstream.

Per-stage resources (CPU, memory, GPUs, node selector and tolerations of the GPU node pool, a
memory-backed /dev/shm) come from the preset's `pipeline.resources` at compile time; kfp.local
ignores them, a cluster schedules by them.
"""

# No `from __future__ import annotations`: KFP reads the pipeline's annotations at runtime.
from kfp import dsl, kubernetes

from components.decoder import decoder as decoder_component
from components.evaluate import evaluate as evaluate_component
from components.finish import finish as finish_component
from components.instruct import instruct as instruct_component
from components.precompute import precompute as precompute_component
from components.prepare import prepare as prepare_component
from components.register import register as register_component
from components.stage1 import stage1 as stage1_component
from components.stage2 import stage2 as stage2_component
from components.validate import validate as validate_component
from emu.cluster.image import DIGEST_ENV, digest_of, image_reference
from emu.cluster.launch import LAUNCH_ENV, Launch
from emu.cluster.ray_launch import RAY_CLUSTER_ENV
from emu.pipeline.config import PipelineConfig, StageResources
from emu.pipeline.tasks import KFP_RUN_ENV, PRODUCTION_AT_RUN

NAME = "emu"
#: Tasks that train (emu.cluster.launch decides in process, torchrun over the pod's GPUs, or a TrainJob).
TRAINING = ("stage1", "stage2", "decoder", "instruct")
#: Settings from the config map (infra/k8s/base/settings.env) every task reads.
SETTINGS = ("EMU_LINEAGE_URL", "EMU_DVC_REMOTE", "EMU_CHECKPOINT_REMOTE", "AWS_ENDPOINT_URL", "AWS_REGION")


def build_pipeline(config: PipelineConfig, source_read_at_run: bool = False, close_run_on_exit: bool = False):
    """The pipeline function, with `config`'s resources applied to its tasks.

    With `source_read_at_run`, `prepare` is never served from the cache: it reads its source (a
    folder or s3:// prefix whose content may change) whenever the run starts, so a KFP recurring
    run, whose parameters are fixed when it is created, trains on the data there at each firing;
    the same data gives the same md5, and every later task is served from the cache.

    With `close_run_on_exit` (a cluster's package), every task runs inside a dsl.ExitHandler whose
    `finish` task ends the run's lineage record with KFP's final state, however the run ends:
    `emu run` does that on this machine, but a run that KFP starts (a recurring run's firing, the
    KFP UI) has nothing else to end it."""

    @dsl.pipeline(name=NAME, description="Emu2-style training: validate, pretrain (2 stages), precompute, "
                                         "decoder, instruction tuning, evaluation, registration.")
    def emu(preset: str = "tiny", source: str = "", source_md5: str = "", production: str = PRODUCTION_AT_RUN,
            prepare_code_version: str = "", validate_code_version: str = "", stage1_code_version: str = "",
            precompute_code_version: str = "", stage2_code_version: str = "", decoder_code_version: str = "",
            instruct_code_version: str = "", evaluate_code_version: str = "", register_code_version: str = "",
            synth_config: str = "", import_config: str = "", validate_config: str = "", stage1_config: str = "",
            model_config: str = "", precompute_config: str = "", stage2_config: str = "", decoder_config: str = "",
            visual_decoder_config: str = "", instruct_config: str = "", evaluate_config: str = ""):
        arguments = {name: value for name, value in locals().items() if name in _graph_parameters()}
        if not close_run_on_exit:
            _tasks(config, source_read_at_run, **arguments)
            return
        with dsl.ExitHandler(_configure(finish_component(**arguments), "finish", config, cached=False), name="emu-run"):
            _tasks(config, source_read_at_run, **arguments)

    return emu


def _graph_parameters() -> tuple[str, ...]:
    """The pipeline parameters `_tasks` takes (keyword-only): all of them."""
    import inspect

    return tuple(name for name, p in inspect.signature(_tasks).parameters.items() if p.kind is p.KEYWORD_ONLY)


def _tasks(config: PipelineConfig, source_read_at_run: bool, *, preset, source, source_md5, production,
           prepare_code_version, validate_code_version, stage1_code_version, precompute_code_version,
           stage2_code_version, decoder_code_version, instruct_code_version, evaluate_code_version,
           register_code_version, synth_config, import_config, validate_config, stage1_config, model_config,
           precompute_config, stage2_config, decoder_config, visual_decoder_config, instruct_config,
           evaluate_config) -> None:
    """The graph of the module docstring, in the pipeline's (or its exit handler's) context."""
    common = {"preset": preset}
    prepare = _configure(prepare_component(source=source, source_md5=source_md5, synth_config=synth_config,
                                           import_config=import_config, code_version=prepare_code_version,
                                           **common), "prepare", config, cached=not source_read_at_run)
    data = {"dataset_md5": prepare.outputs["Output"]}
    validate = _configure(validate_component(config=validate_config, code_version=validate_code_version,
                                             **data, **common), "validate", config)
    stage1 = _configure(stage1_component(config=stage1_config, model_config=model_config,
                                         code_version=stage1_code_version, **data, **common),
                        "stage1", config).after(validate)
    precompute = _configure(precompute_component(model_md5=stage1.outputs["Output"], config=precompute_config,
                                                 code_version=precompute_code_version, **data, **common),
                            "precompute", config)
    embeddings = {"embeddings_md5": precompute.outputs["Output"]}
    stage2 = _configure(stage2_component(init_md5=stage1.outputs["Output"], config=stage2_config,
                                         code_version=stage2_code_version, **embeddings, **data, **common),
                        "stage2", config)
    decoder = _configure(decoder_component(encoder_md5=stage1.outputs["Output"], config=decoder_config,
                                           decoder_config=visual_decoder_config, code_version=decoder_code_version,
                                           **data, **common), "decoder", config)
    instruct = _configure(instruct_component(init_md5=stage2.outputs["Output"], config=instruct_config,
                                             code_version=instruct_code_version, **embeddings, **data, **common),
                          "instruct", config)
    evaluate = _configure(evaluate_component(model_md5=instruct.outputs["Output"],
                                             decoder_md5=decoder.outputs["Output"], config=evaluate_config,
                                             code_version=evaluate_code_version, production=production, **data,
                                             **common), "evaluate", config)
    with dsl.If(evaluate.outputs["Output"] == "true", name="gate-passed"):
        _configure(register_component(model_md5=instruct.outputs["Output"], decoder_md5=decoder.outputs["Output"],
                                      evaluation=evaluate.outputs["metrics"], code_version=register_code_version,
                                      production=production), "register", config)


def _configure(task: dsl.PipelineTask, stage: str, config: PipelineConfig, cached: bool = True) -> dsl.PipelineTask:
    """Cluster settings of one task: its image, resources, the GPU node pool, /dev/shm, retries and
    timeout, S3 and database credentials from Secrets and the platform settings as environment, and
    for training tasks their layout (EMU_LAUNCH: processes per node, nodes, the TrainJob's image),
    for precompute the RayCluster it runs on (EMU_RAY_CLUSTER)."""
    task.set_display_name(stage)
    task.set_caching_options(enable_caching=cached)
    image = image_reference(config.image)
    task.set_container_image(image)
    if digest_of(image):
        task.set_env_variable(DIGEST_ENV, digest_of(image))
    resources = config.resources.get(stage, StageResources())
    if stage in TRAINING:
        per_node = {"cpu": resources.cpu, "memory": resources.memory,
                    resources.accelerator: str(resources.accelerators) if resources.accelerators else ""}
        launch = Launch(nodes=resources.nodes, procs_per_node=resources.accelerators, image=image,
                        runtime=config.trainer_runtime, resources={k: v for k, v in per_node.items() if k and v})
        task.set_env_variable(LAUNCH_ENV, launch.to_env())
    if resources.ray_cluster:
        task.set_env_variable(RAY_CLUSTER_ENV, resources.ray_cluster)
    if resources.retries:
        task.set_retry(num_retries=resources.retries, backoff_duration="60s", backoff_factor=2.0)
    if resources.timeout_s:
        kubernetes.set_timeout(task, resources.timeout_s)
    if resources.cpu:
        task.set_cpu_request(resources.cpu).set_cpu_limit(resources.cpu)
    if resources.memory:
        task.set_memory_request(resources.memory).set_memory_limit(resources.memory)
    if resources.accelerators:
        task.set_accelerator_type(resources.accelerator).set_accelerator_limit(resources.accelerators)
    for key, value in sorted(resources.node_selector.items()):
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for toleration in resources.tolerations:
        kubernetes.add_toleration(task, key=toleration.key or None, operator=toleration.operator or None,
                                  value=toleration.value or None, effect=toleration.effect or None)
    if resources.shm:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=resources.shm)
    kubernetes.use_secret_as_env(task, secret_name=config.s3_secret, optional=True, secret_key_to_env={
        "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
    # libpq reads PGPASSWORD, so EMU_LINEAGE_URL (logged, stored) never holds the password.
    kubernetes.use_secret_as_env(task, secret_name=config.lineage_secret, optional=True,
                                 secret_key_to_env={"password": "PGPASSWORD"})
    # The KFP run id (the label KFP's API server puts on every pod of a run) as environment, not a
    # parameter: a parameter would differ per run and defeat the cache. Tasks use it to record
    # their lineage under the run `emu run --host` / the dashboard recorded at submission.
    kubernetes.use_field_path_as_env(task, env_name=KFP_RUN_ENV, field_path="metadata.labels['pipeline/runid']")
    kubernetes.use_config_map_as_env(task, config_map_name=config.settings_config_map, optional=True,
                                     config_map_key_to_env={key: key for key in SETTINGS})
    return task
