"""Optimizer state in the reference package's format, and back.

The authors' package (``e-optimizer-adaptor``, modules ``ALTO`` and ``E``)
keeps E's state as two tensors per parameter, the previous gradient
``prev_grad`` (g_{k-1}) and the EMA of gradient differences
``exp_grad_diff`` (a_{k-1}); e_dist keeps one, the gradient EMA ``grad_ema``
(mu_{k-1}). Both directions are exact:

- reference to e_dist: ``mu = prev_grad - exp_grad_diff * beta / (1 - beta)``
  (:func:`e_dist.update.grad_ema_from_reference`);
- e_dist to reference: ``prev_grad = mu`` and ``exp_grad_diff = 0``. The
  reference's next difference EMA is then
  ``a_k = beta * 0 + (1 - beta) * (g_k - mu) = (1 - beta) * (g_k - mu_{k-1})``,
  the value its own two buffers would give, so every later step is the same.

The pair (g_{k-1}, a_{k-1}) itself is not recoverable from mu (many pairs give
one mu): a converted state steps like the original, its ``prev_grad`` is not
the original's.

The reference ALTO's state dict also holds ``bias_corr_m`` and
``bias_corr_v`` (the bias-corrected moments, recomputed every step), an
integer ``step``, and calls E's strength ``alp`` in its groups. The
reference E's ``state_dict()`` is its base optimizer's alone: it drops
``prev_grad`` and ``exp_grad_diff``. Its format here is therefore the base
optimizer's state dict with those two tensors added to every entry, which is
also what :meth:`e_dist.E.load_state_dict` accepts.

:func:`as_alto_state` and :func:`as_e_state` are the checks and conversions
that :meth:`e_dist.ALTO.load_state_dict` and :meth:`e_dist.E.load_state_dict`
run before they change anything; a state dict made by another optimizer
raises :class:`~e_dist.checkpoint.io.CheckpointError` there.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from e_dist import hparams, update
from e_dist.alto import ALTO
from e_dist.checkpoint import io
from e_dist.checkpoint.io import CheckpointError
from e_dist.e import E
from e_dist.update import (
    EXP_AVG,
    EXP_AVG_SQ,
    GRAD_EMA,
    REF_BIAS_CORRECTED,
    REF_EXP_GRAD_DIFF,
    REF_PREV_GRAD,
    STEP,
)

logger = logging.getLogger(__name__)

OPTIMIZERS = ("ALTO", "E")
DIRECTIONS = ("to-reference", "from-reference")

# Group keys: the reference ALTO's name for alpha, and e_dist ALTO's keys that
# the reference lacks (it always adapts as adaptation="reference" does).
REF_ALPHA = "alp"
_ALTO_ONLY_KEYS = ("adaptation", "trust_eps", "weight_norm_eps")
# Group keys that list parameters rather than set hyperparameters.
_PARAM_LIST_KEYS = ("params", "param_names")

StateDict = dict[str, Any]


def to_reference(state_dict: Mapping[str, Any], optimizer: str = "ALTO") -> StateDict:
    """An e_dist ALTO or E state dict in the reference package's format.

    ALTO: every entry becomes the reference ALTO's ``step`` (an int),
    ``exp_avg``, ``exp_avg_sq``, ``prev_grad`` (= grad_ema),
    ``exp_grad_diff`` (zeros), ``bias_corr_m`` and ``bias_corr_v``; every
    group's ``alpha`` becomes ``alp`` and the keys the reference lacks
    (``adaptation``, ``trust_eps``, ``weight_norm_eps``) are dropped.
    ALTO's ``max_grad_norm`` is not in a state dict; the reference always
    clips to 1.0.

    E: every entry keeps the base optimizer's state and trades ``grad_ema``
    for ``prev_grad`` (= grad_ema) and ``exp_grad_diff`` (zeros). The
    reference E's ``load_state_dict`` hands the whole dict to its base
    optimizer, which ignores the two keys; to resume E's own state there,
    copy them into ``reference_e.state[param]``.

    Entries already in the reference's format pass through. Tensors that do
    not change are shared with ``state_dict``, as ``Optimizer.state_dict()``
    shares them with the optimizer: save the result, or copy it, before both
    optimizers step.

    Args:
        state_dict: what ``e_dist.ALTO.state_dict()`` or
            ``e_dist.E.state_dict()`` returned, or the same loaded from a file.
        optimizer: ``"ALTO"`` or ``"E"``.

    Raises:
        CheckpointError: ``state_dict`` is not the named optimizer's, or an
            ALTO group adapts in a way the reference cannot
            (``adaptation="paper"``, or ``"none"`` with weight decay).

    Example:
        >>> saved = e_dist.ALTO(model.parameters()).state_dict()
        >>> reference_alto.load_state_dict(to_reference(saved, "ALTO"))
    """
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    caller = f"to_reference(optimizer={optimizer!r})"
    if optimizer == "ALTO":
        ours = as_alto_state(state_dict, caller=caller)
        groups = [_alto_group_to_reference(i, g) for i, g in enumerate(ours[_GROUPS])]
        betas_of = _by_param(groups, "betas")
        state = {
            index: _alto_entry_to_reference(entry, betas_of[index]) if entry else entry
            for index, entry in ours[_STATE].items()
        }
        return {**ours, _STATE: state, _GROUPS: groups}

    _check_e_structure(state_dict, caller)
    state = {}
    for index, entry in state_dict[_STATE].items():
        if GRAD_EMA in entry:
            entry = dict(entry)
            grad_ema = entry.pop(GRAD_EMA)
            entry[REF_PREV_GRAD] = grad_ema
            entry[REF_EXP_GRAD_DIFF] = torch.zeros_like(grad_ema)
        state[index] = entry
    return {**state_dict, _STATE: state}


def from_reference(
    state_dict: Mapping[str, Any], optimizer: str = "ALTO", *, beta: float | None = None
) -> StateDict:
    """A reference package's ALTO or E state dict in e_dist's format.

    ``prev_grad`` and ``exp_grad_diff`` become ``grad_ema``, exactly (see the
    module's docstring). ALTO: the bias-corrected copies are dropped, the
    integer ``step`` becomes a float32 tensor, ``alp`` becomes ``alpha`` and
    the group gets ``adaptation="reference"`` (the reference's layer
    adaptation) and ALTO's default ``trust_eps`` and ``weight_norm_eps``.

    E: entries keep the base optimizer's state. An entry without
    ``prev_grad`` and ``exp_grad_diff`` (what the reference E's
    ``state_dict()`` saves, since it drops them) gets a zero ``grad_ema``:
    E's state starts afresh, as the reference's own resume from that dict
    does. A warning says so.

    Entries already in e_dist's format pass through; tensors that do not
    change are shared with ``state_dict``.

    Args:
        state_dict: the reference ALTO's ``state_dict()``, or the reference
            E's base optimizer's state dict with ``prev_grad`` and
            ``exp_grad_diff`` in its entries.
        optimizer: ``"ALTO"`` or ``"E"``.
        beta: E's gradient-EMA decay, which the reference E keeps outside
            its state dict; needed for E, ignored for ALTO (whose groups hold
            ``betas``).

    Raises:
        CheckpointError: ``state_dict`` is not the named optimizer's.
        ValueError: ``optimizer="E"`` without a valid ``beta``.
    """
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    caller = f"from_reference(optimizer={optimizer!r})"
    if optimizer == "ALTO":
        return as_alto_state(state_dict, caller=caller)
    if beta is None:
        raise ValueError(
            "from_reference(optimizer='E') needs beta, E's gradient-EMA decay: "
            "the reference E keeps it outside its state dict"
        )
    beta = hparams.check_range("beta", beta, 0.0, 1.0)
    return as_e_state(state_dict, beta, caller=caller, reset_missing=True)


def convert_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    direction: str,
    optimizer: str,
    *,
    beta: float | None = None,
) -> None:
    """Convert the optimizer state dict in file ``src`` and write it to ``dst``.

    ``src`` is read with ``torch.load(weights_only=True)``
    (:func:`e_dist.checkpoint.io.load`); ``dst`` is written atomically
    (:func:`e_dist.checkpoint.io.atomic_save`): a crash leaves the old file
    or none, never a part.

    Args:
        src: a file holding an optimizer state dict (``torch.save(opt.state_dict())``).
        dst: where the converted state dict goes; may equal ``src``.
        direction: ``"to-reference"`` (:func:`to_reference`) or
            ``"from-reference"`` (:func:`from_reference`).
        optimizer: ``"ALTO"`` or ``"E"``.
        beta: E's gradient-EMA decay, for ``"from-reference"`` with ``"E"``.

    Raises:
        CheckpointError: ``src`` is missing, corrupted, holds no optimizer
            state dict or another optimizer's.
    """
    _check_choice("direction", direction, DIRECTIONS)
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    state_dict = io.load(src, what="optimizer state dict")
    if not _is_state_dict(state_dict):
        raise CheckpointError(
            f"{src} holds no optimizer state dict (a dict with 'state' and "
            f"'param_groups'); found {_kind(state_dict)}"
        )
    if direction == "to-reference":
        converted = to_reference(state_dict, optimizer)
    else:
        converted = from_reference(state_dict, optimizer, beta=beta)
    io.atomic_save(converted, dst)


# ---------------------------------------------------------------------------
# Checks and conversions that the optimizers' load_state_dict share

_STATE = "state"
_GROUPS = "param_groups"


def as_alto_state(state_dict: Mapping[str, Any], *, caller: str) -> StateDict:
    """``state_dict`` as e_dist ALTO's, after checking that ALTO made it.

    Accepts e_dist ALTO's state dicts and the reference ALTO's; converts the
    latter (see :func:`from_reference`). Reads ``state_dict`` and changes
    nothing in it.

    Raises:
        CheckpointError: naming ``caller``, what it expected and what it found.
    """
    _check_alto_structure(state_dict, caller)
    groups = [_alto_group_from_reference(g) for g in state_dict[_GROUPS]]
    beta1_of = {index: betas[0] for index, betas in _by_param(groups, "betas").items()}
    state = {}
    for index, entry in state_dict[_STATE].items():
        if REF_PREV_GRAD in entry:
            entry = _entry_from_reference(entry, beta1_of[index])
            for key in REF_BIAS_CORRECTED:
                entry.pop(key, None)
        if STEP in entry and not torch.is_tensor(entry[STEP]):
            entry = dict(entry)
            entry[STEP] = torch.tensor(float(entry[STEP]), dtype=torch.float32)
        state[index] = _ordered(entry, (STEP, GRAD_EMA, EXP_AVG, EXP_AVG_SQ))
    return {**state_dict, _STATE: state, _GROUPS: groups}


def as_e_state(
    state_dict: Mapping[str, Any],
    beta: float,
    *,
    caller: str,
    base_optimizer: torch.optim.Optimizer | None = None,
    reset_missing: bool = False,
) -> StateDict:
    """``state_dict`` as e_dist E's, after checking that E made it.

    Entries with the reference's ``prev_grad`` and ``exp_grad_diff`` get
    ``grad_ema`` in their place. With ``base_optimizer``, the groups must
    also hold its hyperparameters. With ``reset_missing``, entries of a
    state dict that holds E's state in none of them get a zero ``grad_ema``
    (the reference E's own state dicts); without it such a dict is refused.
    Reads ``state_dict`` and changes nothing in it.

    Raises:
        CheckpointError: naming ``caller``, what it expected and what it found.
    """
    _check_e_structure(state_dict, caller, base_optimizer, allow_no_e=reset_missing)
    state, reset = {}, 0
    for index, entry in state_dict[_STATE].items():
        if REF_PREV_GRAD in entry:
            entry = _entry_from_reference(entry, beta)
        elif reset_missing and GRAD_EMA not in entry and entry:
            entry = {**entry, GRAD_EMA: _zeros_like_param(index, entry, caller)}
            reset += 1
        state[index] = entry
    if reset:
        logger.warning(
            "%s: %d state entries hold no prev_grad and exp_grad_diff (the "
            "reference E's state_dict() drops them); their grad_ema starts at "
            "zero, as the reference's own resume from this state dict does",
            caller,
            reset,
        )
    return {**state_dict, _STATE: state}


def check_loadable(
    optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any], *, caller: str
) -> None:
    """Raise what ``optimizer.load_state_dict(state_dict)`` would raise for a
    state dict of another optimizer, without loading anything.

    Raises:
        CheckpointError: naming ``caller``, what it expected and what it found.
    """
    if isinstance(optimizer, ALTO):
        _check_alto_structure(state_dict, caller)
    elif isinstance(optimizer, E):
        _check_e_structure(state_dict, caller, optimizer.base_optimizer)
    else:
        raise TypeError(f"not ALTO or E: {type(optimizer).__name__}")


def describe(state_dict: Mapping[str, Any]) -> str:
    """Which optimizer made ``state_dict``, as far as its structure tells."""
    groups = state_dict.get(_GROUPS) or []
    if any(REF_ALPHA in g and _is_alto_group(g) for g in groups):
        return "the reference package's ALTO state"
    if any(_is_alto_group(g) for g in groups):
        return "ALTO's state"
    names = ", ".join(_hyperparameters(groups[0])) if groups else "none"
    base = f"an optimizer with hyperparameters {names}"
    if _holds_e_state(state_dict):
        return f"E's state over {base}"
    return f"the state of {base}, without E's grad_ema"


def _check_alto_structure(state_dict: Mapping[str, Any], caller: str) -> None:
    _check_mapping(state_dict, caller)

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(
            f"{caller} expected ALTO's state (three betas and alpha in every "
            f"param group), found {describe(state_dict)}: {problem}"
        )

    for i, group in enumerate(state_dict[_GROUPS]):
        betas = group.get("betas")
        if betas is None:
            raise fail(f"param_groups[{i}] has no betas")
        if not isinstance(betas, (tuple, list)) or len(betas) != 3:
            raise fail(f"param_groups[{i}] has betas={betas!r}, not three of them")
        if "alpha" not in group and REF_ALPHA not in group:
            raise fail(f"param_groups[{i}] has no alpha")

    required = (STEP, EXP_AVG, EXP_AVG_SQ)
    for index, entry in state_dict[_STATE].items():
        if not entry:
            continue
        missing = [key for key in required if key not in entry]
        if GRAD_EMA not in entry:
            missing += [k for k in (REF_PREV_GRAD, REF_EXP_GRAD_DIFF) if k not in entry]
        elif REF_PREV_GRAD in entry:
            raise fail(f"state entry {index!r} holds both grad_ema and prev_grad")
        if missing:
            raise fail(
                f"state entry {index!r} lacks {', '.join(missing)} (ALTO's hold "
                f"step, exp_avg, exp_avg_sq and grad_ema, or the reference's "
                f"prev_grad and exp_grad_diff in place of grad_ema)"
            )
    _check_indices(state_dict, fail)


def _check_e_structure(
    state_dict: Mapping[str, Any],
    caller: str,
    base_optimizer: torch.optim.Optimizer | None = None,
    allow_no_e: bool = False,
) -> None:
    _check_mapping(state_dict, caller)
    base_name = type(base_optimizer).__name__ if base_optimizer is not None else None
    expected = f"E's state over {base_name}" if base_name else "E's state"

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(
            f"{caller} expected {expected}, found {describe(state_dict)}: {problem}"
        )

    groups = state_dict[_GROUPS]
    alto_here = base_optimizer is not None and _is_alto_group(base_optimizer.defaults)
    for i, group in enumerate(groups):
        if _is_alto_group(group) and not alto_here:
            raise fail(
                f"param_groups[{i}] has ALTO's three betas and alpha; load it into "
                f"e_dist.ALTO"
            )
    if base_optimizer is not None:
        required = _hyperparameters(base_optimizer.defaults)
        for i, group in enumerate(groups):
            missing = [key for key in required if key not in group]
            if missing:
                raise fail(
                    f"param_groups[{i}] lacks {', '.join(missing)}, which "
                    f"{base_name}'s groups hold"
                )
            for key in required:
                ours, theirs = base_optimizer.defaults[key], group[key]
                if isinstance(ours, (tuple, list)) and (
                    not isinstance(theirs, (tuple, list)) or len(theirs) != len(ours)
                ):
                    raise fail(
                        f"param_groups[{i}] has {key}={theirs!r}; {base_name}'s "
                        f"have {len(ours)} values"
                    )

    for index, entry in state_dict[_STATE].items():
        halves = [k for k in (REF_PREV_GRAD, REF_EXP_GRAD_DIFF) if k in entry]
        if len(halves) == 1:
            raise fail(
                f"state entry {index!r} holds {halves[0]} without its partner "
                f"(the reference's E state is prev_grad and exp_grad_diff together)"
            )
        if halves and GRAD_EMA in entry:
            raise fail(f"state entry {index!r} holds both grad_ema and prev_grad")
    if not allow_no_e and _has_stepped(state_dict) and not _holds_e_state(state_dict):
        raise fail(
            "no state entry holds grad_ema (or the reference's prev_grad and "
            "exp_grad_diff). It is the base optimizer's own state dict, or the "
            "reference E's state_dict(), which drops E's state; convert the "
            "latter with e_dist.checkpoint.reference.from_reference(..., "
            "optimizer='E', beta=...)"
        )
    _check_indices(state_dict, fail)


def _check_mapping(state_dict: Any, caller: str) -> None:
    if not _is_state_dict(state_dict):
        raise CheckpointError(
            f"{caller} expected an optimizer state dict (a dict with 'state' and "
            f"'param_groups'), found {_kind(state_dict)}"
        )


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and {_STATE, _GROUPS} <= set(obj)


def _kind(obj: Any) -> str:
    if isinstance(obj, Mapping):
        return f"a dict with keys {sorted(map(str, obj))}"
    return f"a {type(obj).__name__}"


def _check_indices(state_dict: Mapping[str, Any], fail) -> None:
    """Every entry that needs its group's betas must belong to a group."""
    listed = {p for g in state_dict[_GROUPS] for p in g["params"]}
    for index, entry in state_dict[_STATE].items():
        if REF_PREV_GRAD in entry and index not in listed:
            raise fail(f"state entry {index!r} belongs to no param group")


# ---------------------------------------------------------------------------
# Entries and groups


def _entry_from_reference(entry: Mapping[str, Any], beta: float) -> dict[str, Any]:
    """A copy of ``entry`` with ``grad_ema`` in place of the reference's pair."""
    entry = dict(entry)
    prev_grad = entry.pop(REF_PREV_GRAD)
    exp_grad_diff = entry.pop(REF_EXP_GRAD_DIFF)
    entry[GRAD_EMA] = update.grad_ema_from_reference(prev_grad, exp_grad_diff, beta)
    return entry


def _alto_entry_to_reference(
    entry: Mapping[str, Any], betas: tuple[float, float, float]
) -> dict[str, Any]:
    """The reference ALTO's entry, its keys in the order the reference makes."""
    step = int(entry[STEP])
    exp_avg, exp_avg_sq, grad_ema = entry[EXP_AVG], entry[EXP_AVG_SQ], entry[GRAD_EMA]
    converted = {
        STEP: step,
        EXP_AVG: exp_avg,
        EXP_AVG_SQ: exp_avg_sq,
        REF_PREV_GRAD: grad_ema,
        REF_EXP_GRAD_DIFF: torch.zeros_like(grad_ema),
    }
    # The bias-corrected moments as the reference's last step left them.
    bias_corr_m, bias_corr_v = REF_BIAS_CORRECTED
    if step > 0:
        converted[bias_corr_m] = exp_avg / (1 - betas[1] ** step)
        converted[bias_corr_v] = exp_avg_sq / (1 - betas[2] ** step)
    else:
        converted[bias_corr_m] = torch.zeros_like(exp_avg)
        converted[bias_corr_v] = torch.zeros_like(exp_avg_sq)
    others = {k: v for k, v in entry.items() if k not in (STEP, GRAD_EMA)}
    return {**converted, **others}


def _alto_group_to_reference(i: int, group: Mapping[str, Any]) -> dict[str, Any]:
    adaptation = group.get("adaptation", "reference")
    if adaptation == "paper" or (adaptation == "none" and group["weight_decay"] != 0):
        raise CheckpointError(
            f"to_reference(optimizer='ALTO'): param_groups[{i}] has "
            f"adaptation={adaptation!r} with weight_decay={group['weight_decay']!r}; "
            f"the reference ALTO takes the trust ratio ||theta|| / ||r|| where "
            f"weight_decay != 0 and none elsewhere (adaptation='reference')"
        )
    lr = group["lr"]
    converted = {
        "lr": float(lr) if torch.is_tensor(lr) else lr,
        "betas": tuple(group["betas"]),
        "eps": group["eps"],
        REF_ALPHA: group["alpha"],
        "weight_decay": group["weight_decay"],
    }
    skip = {*converted, "alpha", *_ALTO_ONLY_KEYS, "params"}
    others = {k: v for k, v in group.items() if k not in skip}
    return {**converted, **others, "params": group["params"]}


def _alto_group_from_reference(group: Mapping[str, Any]) -> dict[str, Any]:
    """The group with ``alpha`` for ``alp`` and, for a reference group, the
    keys e_dist ALTO adds, set to what the reference does."""
    group = dict(group)
    if REF_ALPHA not in group:
        return group
    alpha = group.pop(REF_ALPHA)
    group.setdefault("alpha", alpha)
    defaults = inspect.signature(ALTO.__init__).parameters
    group.setdefault("adaptation", "reference")
    for key in _ALTO_ONLY_KEYS[1:]:
        group.setdefault(key, defaults[key].default)
    params = group.pop("params")
    return {**group, "params": params}


# ---------------------------------------------------------------------------
# Small helpers


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _is_alto_group(group: Mapping[str, Any]) -> bool:
    betas = group.get("betas")
    three = isinstance(betas, (tuple, list)) and len(betas) == 3
    return three and ("alpha" in group or REF_ALPHA in group)


def _hyperparameters(group: Mapping[str, Any]) -> list[str]:
    """A group's hyperparameters: its keys less the parameter lists and the
    switches (booleans, None), which torch fills in for groups saved without
    them."""
    return sorted(
        key
        for key, value in group.items()
        if key not in _PARAM_LIST_KEYS
        and not isinstance(value, bool)
        and value is not None
    )


def _holds_e_state(state_dict: Mapping[str, Any]) -> bool:
    return any(
        GRAD_EMA in entry or REF_PREV_GRAD in entry
        for entry in state_dict[_STATE].values()
    )


def _has_stepped(state_dict: Mapping[str, Any]) -> bool:
    """Whether any entry shows a step taken: E's state exists from then on.

    Optimizers that create state before stepping (Adagrad) hold ``step = 0``
    until then; an entry without ``step`` (SGD's momentum) exists only after
    one.
    """
    for entry in state_dict[_STATE].values():
        if entry and (STEP not in entry or float(entry[STEP]) > 0):
            return True
    return False


def _by_param(groups: list[Mapping[str, Any]], key: str) -> dict[Any, Any]:
    """Each parameter index's value of ``key`` in its group."""
    return {index: g[key] for g in groups for index in g["params"]}


def _ordered(entry: Mapping[str, Any], first: tuple[str, ...]) -> dict[str, Any]:
    """``entry`` with the keys ``first`` first, in that order, where present."""
    head = {key: entry[key] for key in first if key in entry}
    return {**head, **{k: v for k, v in entry.items() if k not in head}}


def _zeros_like_param(index: Any, entry: Mapping[str, Any], caller: str):
    """Zeros the shape of the entry's parameter, read off its state tensors.

    Every tensor but ``step`` must share one shape; factored state (row and
    column statistics) does not tell the parameter's shape, and is refused.
    """
    tensors = [v for k, v in entry.items() if k != STEP and torch.is_tensor(v)]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise CheckpointError(
            f"{caller}: state entry {index!r} holds no prev_grad and "
            f"exp_grad_diff, and its tensors ({', '.join(sorted(entry))}) do not "
            f"tell its parameter's shape, so a zero grad_ema cannot be made for it"
        )
    return torch.zeros_like(tensors[0])
