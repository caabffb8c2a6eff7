"""DeepSpeed integration: optimizer names in the JSON config, ZeRO piece maps.

Importing :mod:`e_dist` installs three hooks on DeepSpeed's engine and one on
its stage-0 fp16/bf16 wrapper; nothing else changes:

- ``_is_supported_optimizer`` and ``_configure_basic_optimizer``: build ALTO,
  E and the E shorthands from ``"optimizer": {"type": ...}`` in the config
  (DeepSpeed has no registry of optimizer types), so callers that pass only a
  config (HF Trainer, Accelerate) get them, and ZeRO accepts them as tested
  optimizers.
- ``_configure_optimizer``: once the engine has wrapped the optimizer, gives
  ALTO a piece map read from the wrapper's partitions (ZeRO-1/2, ZeRO-3,
  BF16_Optimizer; whole parameters at stage 0) and hands its gradient
  clipping to the engine, so that one clip, over every rank's gradients,
  happens per step.
- ``FP16_UnfusedOptimizer.initialize_optimizer_states``: skips the step with
  zero gradients that this wrapper takes at construction, for ALTO and E
  (for ALTO it would shrink every decayed parameter by ``lr``).

Supported: deepspeed 0.19. Others get a warning once; a missing internal
fails with a message naming it.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch

from e_dist import hparams, registry
from e_dist.alto import ALTO
from e_dist.e import E
from e_dist.groups import weight_decay_groups
from e_dist.pieces import SINGLE_PROCESS, Piece, ShardedPieceMap

logger = logging.getLogger(__name__)

TESTED_VERSIONS = ("0.19.",)

# Keys of "params" that e_dist consumes itself; the rest go to the optimizer.
_GROUPING_KEY = "weight_decay_groups"


class UnsupportedDeepSpeed(RuntimeError):
    """This DeepSpeed lacks an internal that e_dist relies on."""


def _internal(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        import deepspeed

        raise UnsupportedDeepSpeed(
            f"e_dist needs {type(obj).__name__}.{name}, which deepspeed "
            f"{deepspeed.__version__} does not have; e_dist is tested with "
            f"deepspeed {', '.join(v + 'x' for v in TESTED_VERSIONS)}"
        ) from None


# ---------------------------------------------------------------------------
# Building optimizers from the config


def _resolve_auto(name: str, params: dict[str, Any], train_batch_size: Any) -> None:
    """Replace ``"auto"`` by the paper's rule: ALTO's alpha and betas, E's
    alpha and beta."""
    wanted = [k for k, v in params.items() if isinstance(v, str) and v == "auto"]
    if not wanted:
        return
    allowed = ("alpha", "betas") if name == "ALTO" else ("alpha", "beta")
    refused = [k for k in wanted if k not in allowed]
    if refused:
        raise ValueError(
            f"'auto' is accepted for {list(allowed)} of optimizer {name!r}, "
            f"not for {refused}"
        )
    if train_batch_size is None:
        raise ValueError(f"{wanted} = 'auto' needs train_batch_size in the config")
    preset = hparams.alto_preset(train_batch_size)
    rule = {
        "alpha": preset["alpha"],
        "beta": preset["betas"][0],
        "betas": preset["betas"],
    }
    params.update({k: rule[k] for k in wanted})
    logger.info(
        "e_dist: train_batch_size %d gives %s",
        train_batch_size,
        {k: params[k] for k in wanted},
    )


def _grouped(model: torch.nn.Module, model_parameters: Any, weight_decay: float) -> Any:
    """Plain parameters become the usual decay / no-decay groups.

    Groups passed by the caller (dicts) are kept as they are.
    """
    items = list(model_parameters)
    if not items or isinstance(items[0], dict):
        return items
    wanted = {id(p) for p in items}
    groups = []
    for group in weight_decay_groups(model, weight_decay):
        params = [p for p in group["params"] if id(p) in wanted]
        if params:
            groups.append({**group, "params": params})
    missing = wanted - {id(p) for g in groups for p in g["params"]}
    if missing:  # parameters outside the module: decay them
        extra = [p for p in items if id(p) in missing]
        groups.append({"params": extra, "weight_decay": weight_decay})
    return groups


def build_from_config(
    name: str,
    params: dict[str, Any] | None,
    model_parameters: Any,
    model: torch.nn.Module,
    train_batch_size: int | None = None,
) -> torch.optim.Optimizer:
    """The optimizer for ``"optimizer": {"type": name, "params": params}``.

    ``weight_decay_groups`` (default true) splits plain parameters into the
    usual groups (biases and norm layers without decay, and so without ALTO's
    layer adaptation); false keeps one group.
    """
    params = dict(params or {})
    grouping = params.pop(_GROUPING_KEY, True)
    if not isinstance(grouping, bool):
        raise ValueError(f"{_GROUPING_KEY} must be true or false, got {grouping!r}")
    _resolve_auto(name, params, train_batch_size)
    if name == "ALTO":
        weight_decay = params.get("weight_decay", 1e-4)
    else:
        weight_decay = params.get("weight_decay", 0.0)
    if model_parameters is None:
        model_parameters = model.parameters()
    if grouping:
        model_parameters = _grouped(model, model_parameters, weight_decay)
    return registry.build(name, model_parameters, extra_keys=[_GROUPING_KEY], **params)


# ---------------------------------------------------------------------------
# Piece maps from the wrappers' partitions


def _zero12_pieces(wrapper: Any) -> ShardedPieceMap:
    """ZeRO-1/2 and BF16_Optimizer: one flat fp32 partition per group.

    Parameter ``j`` of group ``i`` is ``bit16_groups[i][j]`` on every rank; the
    fragment that this rank holds is ``_hp_mapping`` (absent where none).
    """
    pieces = ShardedPieceMap()
    if type(wrapper).__name__ == "BF16_Optimizer":
        groups = _internal(wrapper, "bf16_groups")
        partitions = _internal(wrapper, "fp32_groups_flat_partition")
    else:
        groups = _internal(wrapper, "bit16_groups")
        partitions = _internal(wrapper, "single_partition_of_fp32_groups")
    process_groups = _internal(wrapper, "real_dp_process_group")
    for i, (params, partition) in enumerate(zip(groups, partitions, strict=True)):
        table = pieces.add_table(len(params), (process_groups[i],))
        held = []
        for j, param in enumerate(params):
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is not None:
                address = mapping.hp_fragment_address
                held.append(Piece(j, int(address.start), int(address.numel)))
        pieces.add(partition, held, table)
    return pieces


def _zero3_pieces(wrapper: Any) -> ShardedPieceMap:
    """ZeRO-3: one flat fp32 tensor per sub-group, the concatenation of each
    parameter's partition (``partition_numel()`` elements, zero-padded)."""
    import torch.distributed as dist

    pieces = ShardedPieceMap()
    sub_groups = _internal(wrapper, "fp16_groups")
    flats = _internal(wrapper, "fp32_partitioned_groups_flat")
    process_groups = _internal(wrapper, "sub_group_process_groups")
    for params, flat, group in zip(sub_groups, flats, process_groups, strict=True):
        rank = dist.get_rank(group=group)
        table = pieces.add_table(len(params), (group,))
        held, start = [], 0
        for j, param in enumerate(params):
            size = param.partition_numel()
            length = max(0, min(size, param.ds_numel - rank * size))
            held.append(Piece(j, start, length))
            start += size
        pieces.add(flat, held, table)
    return pieces


def _piece_map(wrapper: Any, basic: torch.optim.Optimizer) -> Any:
    kind = type(wrapper).__name__
    if wrapper is basic or kind == "FP16_UnfusedOptimizer":
        return SINGLE_PROCESS  # whole parameters (or whole fp32 copies)
    if kind in ("DeepSpeedZeroOptimizer", "BF16_Optimizer"):
        return _zero12_pieces(wrapper)
    if kind == "DeepSpeedZeroOptimizer_Stage3":
        return _zero3_pieces(wrapper)
    raise NotImplementedError(
        f"e_dist's ALTO does not know DeepSpeed's {kind} wrapper; supported: "
        "ZeRO stages 0-3, BF16_Optimizer and FP16_UnfusedOptimizer"
    )


def _hand_clipping_to_engine(engine: Any, alto: ALTO) -> None:
    """One global clip per step, DeepSpeed's.

    ZeRO steps one group at a time, so ALTO cannot see every gradient before
    it steps: DeepSpeed's ``gradient_clipping`` does the clip instead. Where
    the config leaves it off, ALTO's ``max_grad_norm`` is installed there.
    """
    config_clip = float(engine.gradient_clipping() or 0.0)
    ours = alto.max_grad_norm
    alto.max_grad_norm = None
    if ours is None or ours == config_clip:
        return
    if config_clip > 0:
        logger.warning(
            "e_dist: gradient_clipping=%s in the DeepSpeed config and ALTO's "
            "max_grad_norm=%s differ; the config's value is used",
            config_clip,
            ours,
        )
        return
    engine._config.gradient_clipping = ours
    wrapper = engine.optimizer
    if wrapper is not alto and hasattr(wrapper, "clip_grad"):
        wrapper.clip_grad = ours
    logger.info(
        "e_dist: ALTO's max_grad_norm=%s is applied as DeepSpeed's gradient_clipping",
        ours,
    )


def _link_state_once_complete(wrapper: Any) -> None:
    """Link ``_hp_mapping`` to optimizer state only once every group has state.

    ZeRO-1/2 links each parameter's fragment to the optimizer state right
    after the first group's first step() and never again, so parameters of
    later groups, whose state a lazily initialising optimizer has not yet
    created, stay linked to nothing (``safe_get_full_optimizer_state`` and
    universal checkpoints then fail on them). Linking is deferred until the
    state of every partition exists.
    """
    link = getattr(wrapper, "_lazy_init_hp_params_optimizer_state", None)
    partitions = getattr(wrapper, "single_partition_of_fp32_groups", None)
    if link is None or partitions is None:
        return

    def link_when_complete() -> None:
        if all(wrapper.optimizer.state.get(p) for p in partitions):
            link()

    wrapper._lazy_init_hp_params_optimizer_state = link_when_complete


def _check_before_loading(engine: Any) -> None:
    """A checkpoint that cannot load whole fails before the engine changes
    anything: a universal one of another optimizer or incomplete; one of
    DeepSpeed's own format that is damaged, of another optimizer, world size
    or ZeRO stage."""
    from e_dist.checkpoint import universal, zero

    original = engine.load_checkpoint
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_checkpoint(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        load_dir, tag = call.arguments["load_dir"], call.arguments.get("tag")
        if engine.load_universal_checkpoint():
            universal.check_engine_load(engine, load_dir, tag)
        else:
            optimizer_states = call.arguments.get("load_optimizer_states", True)
            module_only = call.arguments.get("load_module_only", False)
            zero.check_engine_load(
                engine, load_dir, tag, optimizer_states and not module_only
            )
        return original(*args, **kwargs)

    engine.load_checkpoint = load_checkpoint


def _scale_loss_at_stage0(engine: Any) -> None:
    """Apply the fp16 loss scale that DeepSpeed 0.19 forgets at stage 0.

    ``engine.backward`` and ``engine.scale`` scale the loss only for ZeRO
    wrappers; FP16_UnfusedOptimizer's ``step()`` still divides the gradients
    by its loss scale, so they come out ``2**initial_scale_power`` times too
    small and gradient clipping never fires (DeepSpeed pull request #8393,
    open). For ALTO and E the loss is scaled here, as the wrapper's own
    ``backward`` would.
    """
    wrapper = engine.optimizer
    if type(wrapper).__name__ != "FP16_UnfusedOptimizer":
        return
    if not _internal(wrapper, "loss_scale_config").use_grad_scaling:  # bf16
        return
    if not _deepspeed_version().startswith(TESTED_VERSIONS):
        raise UnsupportedDeepSpeed(
            "fp16 at ZeRO stage 0 with ALTO or E: deepspeed 0.19 does not apply "
            "the loss scale in engine.backward (pull request #8393) and e_dist "
            "applies it; whether this deepspeed does is not known. Use bf16, or "
            "ZeRO stage 1 or above, or a tested deepspeed."
        )
    backward, scale = engine.backward, engine.scale

    def loss_scale() -> float:
        # The scale the wrapper's own backward() would apply.
        if getattr(wrapper, "custom_loss_scaler", False):
            return wrapper.external_loss_scale
        return wrapper.loss_scale_config.cur_scale

    @functools.wraps(backward)
    def scaled_backward(loss, *args, **kwargs):
        factor = loss_scale()
        if factor == 1.0:
            return backward(loss, *args, **kwargs)
        out = backward(loss.float() * factor, *args, **kwargs)
        return (out / factor).to(loss.dtype)

    @functools.wraps(scale)
    def scaled(loss):
        return scale(loss).float() * loss_scale()

    engine.backward, engine.scale = scaled_backward, scaled


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def attach(engine: Any) -> None:
    """Give the engine's ALTO its piece map and DeepSpeed's clipping."""
    basic = getattr(engine, "basic_optimizer", None)
    if isinstance(basic, (ALTO, E)):
        from e_dist.checkpoint import universal

        _scale_loss_at_stage0(engine)
        _link_state_once_complete(engine.optimizer)
        universal.install_loaders(engine.optimizer)
        _check_before_loading(engine)
    if isinstance(basic, ALTO):
        _hand_clipping_to_engine(engine, basic)
        basic.piece_map = _piece_map(engine.optimizer, basic)


# ---------------------------------------------------------------------------
# Hooks


def _patched_basic(original: Callable) -> Callable:
    @functools.wraps(original)
    def configure_basic_optimizer(self, model_parameters):
        name = self.optimizer_name()
        if name not in registry.NAMES:
            return original(self, model_parameters)
        return build_from_config(
            name,
            self.optimizer_params(),
            model_parameters,
            self.module,
            self.train_batch_size(),
        )

    configure_basic_optimizer.e_dist_hook = True
    return configure_basic_optimizer


def _patched_is_supported(original: Callable) -> Callable:
    @functools.wraps(original)
    def is_supported_optimizer(self, optimizer_name):
        return optimizer_name in registry.NAMES or original(self, optimizer_name)

    is_supported_optimizer.e_dist_hook = True
    return is_supported_optimizer


def _patched_initial_step(original: Callable) -> Callable:
    # FP16_UnfusedOptimizer (stage 0 in fp16 or bf16) creates its optimizer's
    # state by calling step() once with zero gradients. For ALTO that step is
    # not empty: weight decay times the trust ratio shrinks every decayed
    # parameter by lr, and every step count and E's gradient EMA advance
    # (torch's AdamW too decays once and counts a step). ALTO and E create
    # their state at their first real step instead.
    @functools.wraps(original)
    def initialize_optimizer_states(self):
        if isinstance(self.optimizer, (ALTO, E)):
            return
        original(self)

    initialize_optimizer_states.e_dist_hook = True
    return initialize_optimizer_states


def _patched_configure(original: Callable) -> Callable:
    @functools.wraps(original)
    def configure_optimizer(self, client_optimizer, model_parameters):
        original(self, client_optimizer, model_parameters)
        attach(self)

    configure_optimizer.e_dist_hook = True
    return configure_optimizer


@functools.cache
def check_version(version: str) -> bool:
    """Whether e_dist is tested with this deepspeed; warns once if not."""
    if version.startswith(TESTED_VERSIONS):
        return True
    logger.warning(
        "e_dist is tested with deepspeed %s; this is %s. It runs as long as the "
        "internals it relies on are there, and says which one is missing if not.",
        ", ".join(v + "x" for v in TESTED_VERSIONS),
        version,
    )
    return False


@functools.cache
def install() -> bool:
    """Install the hooks once; False where DeepSpeed is not importable."""
    try:
        import deepspeed
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
        from deepspeed.runtime.zero import utils as zero_utils
    except ImportError:
        return False
    check_version(deepspeed.__version__)
    for name, make in (
        ("_is_supported_optimizer", _patched_is_supported),
        ("_configure_basic_optimizer", _patched_basic),
        ("_configure_optimizer", _patched_configure),
    ):
        original = _internal(DeepSpeedEngine, name)
        if not getattr(original, "e_dist_hook", False):
            setattr(DeepSpeedEngine, name, make(original))
    original = _internal(FP16_UnfusedOptimizer, "initialize_optimizer_states")
    if not getattr(original, "e_dist_hook", False):
        FP16_UnfusedOptimizer.initialize_optimizer_states = _patched_initial_step(
            original
        )
    supported = _internal(zero_utils, "ZERO_SUPPORTED_OPTIMIZERS")
    for cls in (ALTO, E):
        if cls not in supported:
            supported.append(cls)
    return True
