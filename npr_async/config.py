"""The configuration tree: msgspec Structs loaded from YAML, with `--set a.b.c=value` overrides.

Unknown keys, wrong types and out-of-range values raise `ConfigError` naming the key path and the value.
Each section belongs to one part of the system; a part adds fields to its own section only.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny_cpu.yaml"

Pos = Annotated[int, msgspec.Meta(ge=1)]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]
Frac = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
PosFloat = Annotated[float, msgspec.Meta(gt=0.0)]


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ModelConfig(Section):
    path: str = ""  # HF directory (config.json + safetensors); empty: build `preset` into the run dir
    preset: Literal["tiny", "small", "qwen3-0.6b-shape", "qwen3-4b-shape"] = "tiny"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0


class TokenizerConfig(Section):
    path: str = ""  # empty: the bundled NPR tokenizer (npr_async/assets/tokenizer)
    add_npr_tokens: bool = True


class DataConfig(Section):
    train: str = ""  # JSONL/Parquet of {id, prompt, answer}; empty: the synthetic task
    heldout: str = ""
    synthetic_difficulty: Annotated[int, msgspec.Meta(ge=1, le=8)] = 2
    synthetic_train_size: Pos = 2048
    synthetic_heldout_size: Pos = 64
    # imperfect teacher: this fraction of the synthetic SFT traces carries one arithmetic slip (wrong boxed
    # answer, well-formed); the held-out set never has traces and its answers are always right
    synthetic_trace_noise: Frac = 0.0
    seed: int = 1234


class EngineConfig(Section):
    max_total_tokens: Pos = 1024  # all branches counted: the compute budget of one trajectory
    max_path_tokens: Pos = 512  # critical path: bounds positions
    max_step_tokens: Pos = 128  # force-closes a step with </step>
    fork_margin_tokens: NonNeg = 64  # no fork when less than this much total budget remains
    max_plans: Annotated[int, msgspec.Meta(ge=1, le=16)] = 5
    max_depth: Annotated[int, msgspec.Meta(ge=1, le=8)] = 5
    parallel: bool = True  # False: sequential decoding (Stage 1)
    kv_slots: Pos = 65536  # token slots in the KV pool
    max_batch_tokens: Pos = 8192  # tokens per forward (prefill chunks + decodes)
    attention_backend: Literal["torch", "triton"] = "torch"
    cuda_graphs: bool = False
    # with cuda_graphs: torch.compile the captured decode step. Off by default: since the engine's one-launch
    # RMSNorm (engine/triton_norm.py) the uncompiled step is as fast (H200: 3.86 ms both at 64 rows of the 4B
    # shape; 4.1-4.4 vs 4.0-4.3 ms per forward in a 0.6B rollout call) and skips a 1-3 minute first-call compile
    compile_graphs: bool = False
    # on CUDA: the projections of small batches through engine/decode_linear.py
    decode_gemm: Literal["torch", "triton"] = "triton"
    # with cuda_graphs and decode_gemm triton: before the capture, time cuBLASLt's algorithms for the products each
    # bucket leaves to cuBLAS and run the fastest where it beats F.linear (engine/cublaslt.py; ~1-2 s once)
    tune_gemms: bool = True
    branch_repetition_penalty: PosFloat = 1.02


class SamplingConfig(Section):
    temperature: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    top_k: NonNeg = 0  # 0: off
    repetition_penalty: PosFloat = 1.0


class RolloutConfig(Section):
    num_workers: Pos = 1
    num_gpus_per_worker: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    num_cpus_per_worker: Annotated[float, msgspec.Meta(gt=0.0)] = 0.5
    prompts_per_step: Pos = 16
    samples_per_prompt: Pos = 16
    # samples decoding at once per generator (the engine's max_running); each streams on as it finishes
    chunk_samples: Pos = 64
    response_prefix: str = ""  # appended after the chat template, e.g. a guideline that forces a fork (benchmarks)
    sampling: SamplingConfig = msgspec.field(default_factory=SamplingConfig)
    eval_sampling: SamplingConfig = msgspec.field(
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=0.7))


class VerifierConfig(Section):
    num_workers: Pos = 1
    num_cpus_per_worker: Annotated[float, msgspec.Meta(gt=0.0)] = 0.25
    processes_per_worker: Pos = 2
    default: str = "math"  # verifier name, or a dotted path `pkg.module:Class` of a user plug-in
    plugins: dict[str, str] = {}  # extra name -> dotted path
    timeout_s: PosFloat = 10.0
    sandbox: Literal["bwrap", "rlimit"] = "bwrap"  # rlimit-only is weaker and must be chosen explicitly
    format_reward: Literal["none", "stage1", "filter"] = "filter"
    # code verifier: limits of one sandboxed run (one test case)
    sandbox_python: str = ""  # interpreter inside the sandbox; empty: /usr/bin/python3, else our own
    code_timeout_s: PosFloat = 4.0  # wall clock per run (CPU seconds: the same, rounded up)
    code_memory_mb: Pos = 512  # address space per process
    code_max_procs: Pos = 32
    code_output_kb: Pos = 256


class BufferConfig(Section):
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal


class LearnerConfig(Section):
    loss: str = "papo"  # sft | dapo | papo | a registered user loss
    lr: PosFloat = 1e-6
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: NonNeg = 0
    weight_decay: Annotated[float, msgspec.Meta(ge=0.0)] = 0.1
    grad_clip: PosFloat = 1.0
    micro_batch_tokens: Pos = 4096
    streaming: bool = True  # accumulate group by group while rollouts still run
    activation_checkpointing: bool = False  # recompute layers in backward instead of keeping their activations
    checkpoint_layers: Annotated[int, msgspec.Meta(ge=-1)] = -1  # how many layers (the first k) recompute; -1: all
    compile: bool | Literal["auto"] = "auto"  # torch.compile each decoder layer around attention; auto: on CUDA
    num_workers: Pos = 1  # learner ranks, one actor each (num_gpus / num_cpus per rank); > 1 needs fsdp: true
    num_gpus: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    num_cpus: Annotated[float, msgspec.Meta(gt=0.0)] = 1.0
    fsdp: bool = False
    clip_low: Frac = 0.2
    clip_high: Frac = 0.28
    overlong_buffer: NonNeg = 0
    overlong_penalty: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0
    overlong_max_tokens: NonNeg = 0  # DAPO's L_max (response tokens, all branches); needed if overlong_buffer > 0
    # bf16: a bf16 compute copy of the fp32 master weights (cast once per step, fp32 gradients and AdamW state);
    # autocast: fp32 weights under torch.autocast (casts every op; what FSDP uses); auto: bf16 on CUDA, off on CPU
    mixed_precision: Literal["auto", "bf16", "autocast", "off"] = "auto"
    sft_epochs: Pos = 1
    sft_lr: PosFloat = 1e-3
    sft_batch_size: Pos = 16
    sft_schedule: Literal["constant", "cosine"] = "cosine"
    sft_warmup_ratio: Frac = 0.05
    sft_data: str = ""  # JSONL of {id, prompt, answer, completion}; empty: synthetic traces, else rejection sampling
    sft_samples_per_problem: Pos = 8  # rejection sampling: k samples per problem, keep one correct + format 0
    sft_sequential_sampling: bool = True  # NPR samples Stage 2 data with sequential decoding

    def __post_init__(self):
        if self.num_workers > 1 and not self.fsdp:
            raise ValueError(f"num_workers: {self.num_workers} learner ranks need fsdp: true")


class TransportConfig(Section):
    weights: Literal["gloo", "nccl"] = "gloo"
    bucket_mb: PosFloat = 256.0
    zmq_hwm: Pos = 1024
    zmq_scheme: Literal["ipc", "tcp"] = "ipc"
    zmq_host: str = ""  # tcp: interface to bind (empty: all); peers get this host's routable IP
    recv_timeout_s: PosFloat = 300.0
    zmq_send_timeout_s: Annotated[float, msgspec.Meta(ge=0.0)] = 300.0  # full queue: 0 blocks until drained
    zmq_linger_s: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0  # how long close() may flush queued messages
    zmq_on_malformed: Literal["count", "raise"] = "count"  # undecodable bytes: skip + count, or raise
    zmq_max_msg_mb: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0  # 0: no limit; larger frames drop the peer
    weights_timeout_s: PosFloat = 300.0  # every weight-sync wait (join, handshake, gloo collectives)


class ControllerConfig(Section):
    ray_address: str = ""  # empty: start a local cluster; "auto" or host:port joins one
    steps: Pos = 10
    max_staleness: Annotated[int, msgspec.Meta(ge=0, le=0)] = 0  # strictly on-policy; > 0 is not built yet
    step_timeout_s: PosFloat = 1800.0
    checkpoint_every: NonNeg = 0  # 0: only at the end
    eval_k: Pos = 4  # samples per held-out problem (avg@k) after SFT and after RL
    seed: int = 0


class LoggingConfig(Section):
    run_dir: str = "runs/latest"
    tensorboard: bool = True
    progress: Literal["auto", "rich", "plain"] = "auto"
    plot: bool = True


class Config(Section):
    stage: Literal["stage1", "stage2", "stage3", "stage2+3"] = "stage3"
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = msgspec.field(default_factory=TokenizerConfig)
    data: DataConfig = msgspec.field(default_factory=DataConfig)
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    rollout: RolloutConfig = msgspec.field(default_factory=RolloutConfig)
    verifier: VerifierConfig = msgspec.field(default_factory=VerifierConfig)
    buffer: BufferConfig = msgspec.field(default_factory=BufferConfig)
    learner: LearnerConfig = msgspec.field(default_factory=LearnerConfig)
    transport: TransportConfig = msgspec.field(default_factory=TransportConfig)
    controller: ControllerConfig = msgspec.field(default_factory=ControllerConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)


class ConfigError(ValueError):
    pass


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _set_path(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"override {dotted}={raw!r}: empty key in the path")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}={raw!r}: `{'.'.join(keys[:i + 1])}` is not a section")
        node = child
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {dotted}={raw!r}: not a YAML value ({e})") from None
    target = _field_type(keys)
    if target is str and isinstance(value, (bool, int, float)):
        value = raw  # `--set model.path=2024` or `data.train=1e-4` name strings, not numbers
    elif isinstance(value, str) and _FLOAT.fullmatch(value) and target is not str:
        value = float(value)  # YAML 1.1 reads `1e-4` as a string
    node[keys[-1]] = value


def _field_type(keys: list) -> Any:
    """The type the config declares at a key path (Annotated unwrapped), or None when there is no such key."""
    t: Any = Config
    for key in keys:
        if isinstance(t, type) and issubclass(t, msgspec.Struct):
            t = {f.name: f.type for f in msgspec.structs.fields(t)}.get(key)
        elif get_origin(t) is dict:
            t = get_args(t)[1]
        else:
            return None
        if get_origin(t) is Annotated:
            t = get_args(t)[0]
    return t


def _read_floats(node: dict, keys: tuple = ()) -> None:
    """YAML 1.1 reads `lr: 1e-4` in a file as a string: read it as a number where the config wants a float."""
    for key, value in node.items():
        if isinstance(value, dict):
            _read_floats(value, (*keys, key))
        elif isinstance(value, str) and _FLOAT.fullmatch(value) and _field_type([*keys, key]) is float:
            node[key] = float(value)


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, str]]:
    pairs = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        pairs.append((key.strip(), raw.strip()))
    return pairs


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (None: the embedded CPU default) and apply `key.path=value` overrides."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(tree).__name__}")
    _read_floats(tree)
    for key, raw in parse_overrides(overrides):
        _set_path(tree, key, raw)
    return config_from_dict(tree, source=str(path))


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return msgspec.convert(tree, Config, strict=True)
    except msgspec.ValidationError as e:
        # msgspec says e.g. "Expected `int`, got `str` - at `$.learner.sft_epochs`"; add the bad value.
        msg = str(e)
        where = msg.rsplit("at `$.", 1)[-1].rstrip("`") if "at `$." in msg else ""
        unknown = re.search(r"unknown field `([^`]+)`", msg)
        if unknown:  # name the misspelt key itself, not only its section
            where = f"{where}.{unknown.group(1)}" if where else unknown.group(1)
        value = _lookup(tree, where) if where else None
        hint = f" (value: {value!r})" if where and value is not _MISSING else ""
        key = f" at key `{where}`" if where else ""
        raise ConfigError(f"{source}: invalid config{key}: {msg}{hint}") from None


_MISSING = object()


def _lookup(tree: Any, dotted: str) -> Any:
    node = tree
    for key in dotted.replace("[", ".").replace("]", "").split("."):
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return _MISSING
    return node


def to_dict(cfg: Config) -> dict[str, Any]:
    return msgspec.to_builtins(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
