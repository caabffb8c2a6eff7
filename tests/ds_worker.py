"""One rank of the DeepSpeed tests: engines against a single-process twin.

    python ds_worker.py SCENARIO JSON_ARGS

Every rank feeds the same batch, so the gradient DeepSpeed averages over ranks
is the single-process gradient; each rank also runs the single-process twin
itself and compares after every step. Rank 0 prints one ``RESULT {json}``
line per configuration for the test to judge.
"""

from __future__ import annotations

import copy
import json

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from dist_harness import CollectiveCounter, report, worker_main
from models import StraddleNet as Net
from models import max_rel_error, trust_ratios_compared
from models import straddle_batch as batch
from models import straddle_groups as groups_of

import e_dist
import e_dist.pieces

# Small enough that the global-norm clip acts on most steps.
CLIP = 0.05
MICRO_BATCH = 4


OPTIMIZERS = {
    "ALTO": {
        "type": "ALTO",
        "params": {
            "lr": 1e-2,
            "betas": [0.99, 0.9, 0.99],
            "alpha": -5,
            "weight_decay": 1e-4,
        },
    },
    "EAdamW": {
        "type": "EAdamW",
        "params": {"lr": 1e-3, "alpha": -5, "beta": 0.99, "weight_decay": 1e-2},
    },
    "ESGD": {
        "type": "ESGD",
        "params": {"lr": 1e-2, "momentum": 0.9, "alpha": 0.5, "beta": 0.01},
    },
}
STATE_KEYS = {
    "ALTO": ("exp_avg", "exp_avg_sq", "grad_ema"),
    "EAdamW": ("exp_avg", "exp_avg_sq", "grad_ema"),
    "ESGD": ("momentum_buffer", "grad_ema"),
}


def twin_optimizer(name: str, model: Net):
    """The single-process optimizer the engine must reproduce."""
    params = {k: v for k, v in OPTIMIZERS[name]["params"].items()}
    groups = groups_of(model)
    if name == "ALTO":
        params["betas"] = tuple(params["betas"])
        return e_dist.ALTO(groups, max_grad_norm=CLIP, **params)
    e_kwargs = {"alpha": params.pop("alpha"), "beta": params.pop("beta")}
    base = torch.optim.AdamW if name == "EAdamW" else torch.optim.SGD
    for group in groups:  # E's base sees the caller's groups as DeepSpeed does
        group.setdefault("weight_decay", params.get("weight_decay", 0.0))
    return e_dist.E(base(groups, **params), **e_kwargs)


def ds_config(name: str, stage: int, precision: str, world: int, **extra) -> dict:
    config = {
        "train_batch_size": MICRO_BATCH * world * extra.pop("accumulation", 1),
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "optimizer": copy.deepcopy(OPTIMIZERS[name]),
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": stage, **extra.pop("zero", {})},
        "steps_per_print": 10**9,
    }
    if stage == 3:
        config["zero_optimization"]["sub_group_size"] = 100  # several sub-groups
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
        if stage == 1:  # DeepSpeed's BF16_Optimizer
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    if precision == "fp16":  # dynamic loss scaling from 2**scale_power
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": extra.pop("scale_power", 8),
            "hysteresis": 1,
        }
    config.update(extra)
    return config


def full_state(engine, param: torch.Tensor, key: str) -> torch.Tensor:
    """A whole parameter's optimizer state, gathered from every rank."""
    value = safe_get_full_optimizer_state(param, key)
    if value is not None:
        return value.reshape(
            param.ds_shape if hasattr(param, "ds_shape") else param.shape
        )
    return engine.basic_optimizer.state[_master(engine, param)][key]


def full_param(engine, param: torch.Tensor) -> torch.Tensor:
    value = safe_get_full_fp32_param(param)
    if value is not None:
        return value
    return _master(engine, param)


def _master(engine, param: torch.Tensor) -> torch.Tensor:
    """Stage 0: the parameter itself, or its fp32 copy under a bf16 wrapper."""
    wrapper = engine.optimizer
    if hasattr(wrapper, "fp16_groups") and hasattr(wrapper, "fp32_groups"):
        for lp_group, hp_group in zip(wrapper.fp16_groups, wrapper.fp32_groups):
            for lp, hp in zip(lp_group, hp_group):
                if lp is param:
                    return hp
    return param


def allow_fp16_on_cpu() -> None:
    """Let DeepSpeed's CPU accelerator take fp16 configs.

    The accelerator reports fp16 as supported only where oneDNN has fp16
    kernels for the CPU (not on these machines), and the engine then refuses
    the config. torch computes in fp16 on any CPU, more slowly; claiming the
    support lets all of DeepSpeed's own fp16 code run unchanged: the fp16
    wrappers, the dynamic loss scaler and the overflow check.
    """
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True


def make_engine(name, stage, precision, world, seed=0, **extra):
    if precision == "fp16":
        allow_fp16_on_cpu()
    torch.manual_seed(seed)
    model = Net()
    twin = copy.deepcopy(model)
    config = ds_config(name, stage, precision, world, **extra)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=groups_of(model), config=config
    )
    return engine, twin


def train_step(engine, step: int, accumulation: int = 1) -> None:
    for micro in range(accumulation):
        loss = engine(batch(step * accumulation + micro))
        engine.backward(loss)
        engine.step()  # an optimizer step only at the accumulation boundary
    norm = engine.get_global_grad_norm()
    if norm is not None and step == 0 and dist.get_rank() == 0:
        print(f"step 0 gradient norm {float(norm):.4g} (clip {CLIP})", flush=True)


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def twin_step(
    name, twin, optimizer, step: int, precision: str, accumulation: int = 1
) -> None:
    optimizer.zero_grad()
    half = HALF.get(precision)
    for micro in range(accumulation):
        with torch.autocast("cpu", dtype=half, enabled=half is not None):
            loss = twin(batch(step * accumulation + micro))
        (loss / accumulation).backward()
    if name != "ALTO":  # DeepSpeed clips before E; ALTO clips inside
        torch.nn.utils.clip_grad_norm_(twin.parameters(), CLIP)
    optimizer.step()


def compare(engine, twin, name) -> tuple[float, float]:
    twin_opt_state = twin.optimizer_for_test.state
    param_err = state_err = 0.0
    for p, q in zip(engine.module.parameters(), twin.parameters()):
        param_err = max(
            param_err, max_rel_error(full_param(engine, p).reshape(q.shape), q)
        )
        for key in STATE_KEYS[name]:
            ours = full_state(engine, p, key).reshape(q.shape)
            state_err = max(state_err, max_rel_error(ours, twin_opt_state[q][key]))
    return param_err, state_err


# ---------------------------------------------------------------------------
# Scenarios


def parity(args: dict) -> None:
    world = dist.get_world_size()
    for precision in args["precisions"]:
        for stage in args["stages"]:
            for name in args["optimizers"]:
                accumulation = args.get("accumulation", 1)
                extra = {"accumulation": accumulation}
                if args.get("offload"):
                    extra["zero"] = {"offload_optimizer": {"device": "cpu"}}
                engine, twin = make_engine(name, stage, precision, world, **extra)
                twin.optimizer_for_test = twin_optimizer(name, twin)
                if args.get("shard_local_norms"):  # negative control
                    engine.basic_optimizer.piece_map = e_dist.pieces.SINGLE_PROCESS
                worst, skipped = (0.0, 0.0), 0
                for step in range(args["steps"]):
                    train_step(engine, step, accumulation)
                    if engine.skipped_steps == skipped:
                        twin_step(
                            name, twin, twin.optimizer_for_test, step, precision,
                            accumulation,
                        )  # fmt: skip
                    skipped = engine.skipped_steps  # fp16 overflow: no step
                    errors = compare(engine, twin, name)
                    worst = tuple(max(a, b) for a, b in zip(worst, errors))
                state = engine.basic_optimizer.state.values()
                steps = {int(v["step"]) for v in state if "step" in v}
                ratios = trust_ratios_compared(
                    engine.basic_optimizer, twin.optimizer_for_test
                )
                report(
                    **ratios,
                    world=world, stage=stage, optimizer=name, precision=precision,
                    accumulation=accumulation, offload=bool(args.get("offload")),
                    state_steps=sorted(steps),
                    wrapper=type(engine.optimizer).__name__,
                    optimizer_name=engine.optimizer_name(),
                    param_error=worst[0], state_error=worst[1], skipped=skipped,
                )  # fmt: skip
                engine.destroy()


def count_step_calls(basic, counter: CollectiveCounter) -> tuple[list[int], list[int]]:
    """Hooks that flag the inside of step() and count calls, all and adaptive
    (some stepped group has weight decay, so ALTO needs its norms)."""
    calls, adaptive = [0], [0]

    def enter(*_):
        counter.inside = True
        calls[0] += 1
        stepped = [g for g in basic.param_groups if g["params"]]
        adaptive[0] += any(g.get("weight_decay", 0) != 0 for g in stepped)

    def leave(*_):
        counter.inside = False

    basic.register_step_pre_hook(enter)
    basic.register_step_post_hook(leave)
    return calls, adaptive


def collectives(args: dict) -> None:
    """Count the collectives issued inside the inner optimizer's step()."""
    world = dist.get_world_size()
    counter = CollectiveCounter()
    for stage in args["stages"]:
        for name in args["optimizers"]:
            engine, _ = make_engine(name, stage, "fp32", world)
            calls, adaptive = count_step_calls(engine.basic_optimizer, counter)
            counter.reset()
            for step in range(3):
                train_step(engine, step)
            report(
                stage=stage, optimizer=name, step_calls=calls[0],
                adaptive_calls=adaptive[0], counts=dict(counter.counts),
            )  # fmt: skip
            engine.destroy()


def checkpoint(args: dict) -> None:
    """N steps, save, a fresh engine loads, N more == 2N straight, bitwise."""
    world = dist.get_world_size()
    n = args["steps"]
    for stage in args["stages"]:
        for name in args["optimizers"]:
            straight, _ = make_engine(name, stage, "fp32", world)
            for step in range(2 * n):
                train_step(straight, step)
            first, _ = make_engine(name, stage, "fp32", world)
            for step in range(n):
                train_step(first, step)
            directory = args["dir"]
            first.save_checkpoint(directory, tag=f"{name}-{stage}")
            first.destroy()
            resumed, _ = make_engine(name, stage, "fp32", world, seed=1)
            resumed.load_checkpoint(directory, tag=f"{name}-{stage}")
            for step in range(n, 2 * n):
                train_step(resumed, step)
            bitwise = True
            for p, q in zip(straight.module.parameters(), resumed.module.parameters()):
                bitwise &= torch.equal(full_param(straight, p), full_param(resumed, q))
                for key in STATE_KEYS[name]:
                    bitwise &= torch.equal(
                        full_state(straight, p, key), full_state(resumed, q, key)
                    )
            report(stage=stage, optimizer=name, bitwise=bool(bitwise))
            straight.destroy()
            resumed.destroy()


def named_snapshot(engine, name: str) -> dict[str, dict[str, torch.Tensor]]:
    """Whole parameters and state by parameter name, gathered from every rank."""
    out = {}
    for pname, p in engine.module.named_parameters():
        shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
        entry = {"fp32": full_param(engine, p).reshape(shape).clone()}
        for key in STATE_KEYS[name]:
            entry[key] = full_state(engine, p, key).reshape(shape).clone()
        out[pname] = entry
    return out


def snapshot_errors(engine, name: str, expected: dict) -> tuple[bool, float, float]:
    """(bitwise equal, max relative error of parameters, of state)."""
    ours = named_snapshot(engine, name)
    bitwise, param_error, state_error = True, 0.0, 0.0
    for pname, entry in expected.items():
        for key, value in entry.items():
            bitwise &= torch.equal(ours[pname][key], value)
            error = max_rel_error(ours[pname][key], value)
            if key == "fp32":
                param_error = max(param_error, error)
            else:
                state_error = max(state_error, error)
    return bool(bitwise), param_error, state_error


def consolidated_snapshot(path: str) -> dict[str, dict[str, torch.Tensor]]:
    from e_dist.checkpoint import consolidated

    ckpt = consolidated.load(path)
    state = ckpt["optimizer_state"]["state"]
    return {
        name: {"fp32": tensor, **{k: v for k, v in state[name].items() if k != "step"}}
        for name, tensor in ckpt["model"].items()
    }


def universal_save(args: dict) -> None:
    """n steps, a ZeRO checkpoint and a snapshot of it; then the
    uninterrupted run's snapshots after ``more`` and ``2 * more`` steps."""
    world, n, more = dist.get_world_size(), args["steps"], args["more"]
    precision = args.get("precision", "fp32")
    for stage in args["stages"]:
        for name in args["optimizers"]:
            engine, _ = make_engine(name, stage, precision, world)
            for step in range(n):
                train_step(engine, step)
            run = f"{args['dir']}/{name}-z{stage}" + (
                "-bf16" if precision == "bf16" else ""
            )
            engine.save_checkpoint(run, tag="t")
            snapshots = {"saved": named_snapshot(engine, name)}
            for label, start in (("mid", n), ("end", n + more)):
                for step in range(start, start + more):
                    train_step(engine, step)
                snapshots[label] = named_snapshot(engine, name)
            if dist.get_rank() == 0:
                torch.save(snapshots, f"{run}-snapshots.pt")
            report(stage=stage, optimizer=name, wrapper=type(engine.optimizer).__name__)
            engine.destroy()


def universal_load(args: dict) -> None:
    """Load a universal checkpoint into a fresh engine (other weights): the
    gathered state equals the saved one; ``more`` steps later it matches the
    uninterrupted run."""
    world, n, more = dist.get_world_size(), args["steps"], args["more"]
    for case in args["cases"]:
        name, stage = case["optimizer"], case["stage"]
        precision = case.get("precision", "fp32")
        engine, _ = make_engine(
            name, stage, precision, world, seed=1, checkpoint={"load_universal": True}
        )
        engine.load_checkpoint(case["universal"], tag="t")
        snapshots = torch.load(case["snapshots"], weights_only=True)
        if "expected_file" in case:  # what another backend saved
            expected = consolidated_snapshot(case["expected_file"])
        else:
            expected = snapshots["saved"]
        loaded_bitwise, _, _ = snapshot_errors(engine, name, expected)
        groups = [g["weight_decay"] for g in engine.basic_optimizer.param_groups]
        steps = sorted({int(v["step"]) for v in engine.basic_optimizer.state.values()})
        start = case.get("start", n)
        for step in range(start, start + more):
            train_step(engine, step)
        _, param_error, state_error = snapshot_errors(
            engine, name, snapshots[case.get("after", "mid")]
        )
        report(
            case=case["label"], world=world, loaded_bitwise=loaded_bitwise,
            wrapper=type(engine.optimizer).__name__,
            steps_loaded=steps, weight_decays=groups, global_steps=engine.global_steps,
            param_error=param_error, state_error=state_error,
        )  # fmt: skip
        engine.destroy()


def refused(args: dict) -> None:
    """A checkpoint that cannot load whole: load_checkpoint fails with a clear
    error and changes nothing, not the module's weights, the fp32 weights, the
    optimizer state or the step counters."""
    from e_dist.checkpoint import CheckpointError

    for case in args["cases"]:
        name, universal = case["optimizer"], case.get("universal", True)
        engine, _ = make_engine(
            name, case.get("stage", 2), "fp32", dist.get_world_size(),
            checkpoint={"load_universal": universal},
        )  # fmt: skip
        train_step(engine, 0)
        before, steps_before = named_snapshot(engine, name), engine.global_steps
        module_before = module_weights(engine)
        try:
            engine.load_checkpoint(case["dir"], tag="t")
            error = None
        except CheckpointError as err:
            error = str(err)
        unchanged, _, _ = snapshot_errors(engine, name, before)
        module_unchanged = all(
            torch.equal(a, b) for a, b in zip(module_before, module_weights(engine))
        )
        report(
            case=case["label"], error=error,
            unchanged=unchanged and module_unchanged
            and engine.global_steps == steps_before,
        )  # fmt: skip
        engine.destroy()


def module_weights(engine) -> list[torch.Tensor]:
    """What this rank holds of the module's own (bit16) weights."""
    return [
        getattr(p, "ds_tensor", p).detach().clone() for p in engine.module.parameters()
    ]


def snapshot(engine, name: str) -> list[torch.Tensor]:
    out = []
    for p in engine.module.parameters():
        out.append(full_param(engine, p).clone())
        out += [full_state(engine, p, k).clone() for k in STATE_KEYS[name]]
    return out


def overflow(args: dict) -> None:
    """A step whose gradients are not finite leaves every state untouched.

    fp32: an infinite loss. fp16: a loss 1e6 times larger, whose gradients,
    times the dynamic loss scale, overflow fp16; the scale then halves.
    """
    world = dist.get_world_size()
    precision = args.get("precision", "fp32")
    factor = 1e6 if precision == "fp16" else float("inf")
    for stage in args["stages"]:
        for name in args["optimizers"]:
            engine, _ = make_engine(name, stage, precision, world)
            for step in range(2):
                train_step(engine, step)

            before = snapshot(engine, name)
            scale_before = engine._get_optimizer_loss_scale()
            loss = engine(batch(2))
            engine.backward(loss.float() * factor)
            engine.step()
            untouched = all(
                torch.equal(a, b) for a, b in zip(before, snapshot(engine, name))
            )
            skipped = engine.skipped_steps
            scale_after = engine._get_optimizer_loss_scale()
            train_step(engine, 3)  # and training goes on
            changed = not all(
                torch.equal(a, b) for a, b in zip(before, snapshot(engine, name))
            )
            finite = all(
                torch.isfinite(full_param(engine, p)).all()
                for p in engine.module.parameters()
            )
            steps = {int(v["step"]) for v in engine.basic_optimizer.state.values()}
            report(
                stage=stage, optimizer=name, untouched=untouched,
                skipped_steps=skipped, finite_after=bool(finite),
                changed_after=changed, state_steps=sorted(steps),
                loss_scale=[scale_before, scale_after],
            )  # fmt: skip
            engine.destroy()


def _error_of(build) -> str:
    try:
        build()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def config(args: dict) -> None:
    """How the JSON config reaches the optimizers (one rank)."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("e_dist").addHandler(handler)
    logging.getLogger("e_dist").setLevel(logging.INFO)

    def build(
        optimizer, stage=2, clip=CLIP, batch_size=MICRO_BATCH, params=None, **extra
    ):
        torch.manual_seed(0)
        model = Net()
        cfg = {
            "train_batch_size": batch_size,
            "train_micro_batch_size_per_gpu": MICRO_BATCH,
            "optimizer": optimizer,
            "gradient_clipping": clip,
            "zero_optimization": {"stage": stage},
            **extra,
        }
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=params(model) if params else None, config=cfg
        )
        return engine

    out = {}
    out["unknown_key"] = _error_of(
        lambda: build({"type": "ALTO", "params": {"lr": 1e-2, "momentum": 0.9}})
    )
    out["e_without_base"] = _error_of(
        lambda: build({"type": "E", "params": {"lr": 1e-3}})
    )
    out["e_unknown_base"] = _error_of(
        lambda: build({"type": "E", "params": {"base": "Adamm"}})
    )
    out["e_unknown_key"] = _error_of(
        lambda: build({"type": "EAdamW", "params": {"lr": 1e-3, "betaz": 1}})
    )
    out["auto_betas_for_e"] = _error_of(
        lambda: build({"type": "EAdamW", "params": {"betas": "auto"}})
    )
    out["unstable"] = _error_of(
        lambda: build({"type": "ALTO", "params": {"betas": [0.1, 0.9, 0.99]}})
    )

    for batch_size in (MICRO_BATCH, 2048):
        engine = build(
            {"type": "ALTO", "params": {"alpha": "auto", "betas": "auto"}},
            batch_size=batch_size,
        )
        group = engine.basic_optimizer.param_groups[0]
        out[f"auto_{batch_size}"] = {
            "alpha": group["alpha"],
            "betas": list(group["betas"]),
        }
        engine.destroy()
    engine = build({"type": "EAdamW", "params": {"alpha": "auto", "beta": "auto"}})
    out["auto_e"] = {
        "alpha": engine.basic_optimizer.alpha,
        "beta": engine.basic_optimizer.beta,
    }
    engine.destroy()

    engine = build({"type": "ALTO", "params": {"weight_decay": 0.1}})
    out["grouped"] = [
        (len(g["params"]), g["weight_decay"])
        for g in engine.basic_optimizer.param_groups
    ]
    out["names"] = [engine.optimizer_name()]
    engine.destroy()
    engine = build({"type": "ALTO", "params": {"weight_decay_groups": False}})
    out["ungrouped"] = len(engine.basic_optimizer.param_groups)
    engine.destroy()
    for name in ("EAdam", "ESGD"):
        engine = build({"type": name, "params": {"lr": 1e-3}})
        out["names"].append(engine.optimizer_name())
        out[f"{name}_base"] = type(engine.basic_optimizer.base_optimizer).__name__
        engine.destroy()
    engine = build({"type": "E", "params": {"base": "RMSprop", "lr": 1e-3}})
    out["E_base"] = type(engine.basic_optimizer.base_optimizer).__name__
    engine.destroy()

    # Clipping: the config's value wins and is said; without one, ALTO's.
    records.clear()
    engine = build({"type": "ALTO", "params": {}}, clip=0.5)
    out["clip_config"] = [
        engine.gradient_clipping(),
        engine.basic_optimizer.max_grad_norm,
    ]
    out["clip_messages"] = [r.getMessage() for r in records]
    engine.destroy()
    records.clear()
    engine = build({"type": "ALTO", "params": {}}, clip=0.0)
    out["clip_alto"] = [
        engine.gradient_clipping(),
        engine.optimizer.clip_grad,
        engine.basic_optimizer.max_grad_norm,
    ]
    out["clip_alto_messages"] = [r.getMessage() for r in records]
    engine.destroy()

    # A client optimizer gets its piece map too.
    torch.manual_seed(0)
    model = Net()
    client = e_dist.ALTO(e_dist.weight_decay_groups(model), lr=1e-2)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=client,
        config={"train_batch_size": MICRO_BATCH, "zero_optimization": {"stage": 2}},
    )
    out["client_piece_map"] = type(client.piece_map).__name__
    train_step(engine, 0)
    engine.destroy()
    report(**out)


def config_file(args: dict) -> None:
    """Load a file of ds_configs/ and train a few steps with it."""
    with open(args["path"]) as f:
        cfg = json.load(f)
    if cfg.get("fp16", {}).get("enabled"):
        allow_fp16_on_cpu()
    torch.manual_seed(0)
    model = Net()
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    losses = []
    for step in range(args["steps"]):
        loss = engine(batch(step % 2))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    report(
        path=args["path"], optimizer=engine.optimizer_name(),
        basic=type(engine.basic_optimizer).__name__,
        wrapper=type(engine.optimizer).__name__, losses=losses,
    )  # fmt: skip


SCENARIOS = {
    "parity": parity,
    "collectives": collectives,
    "checkpoint": checkpoint,
    "universal_save": universal_save,
    "universal_load": universal_load,
    "refused": refused,
    "overflow": overflow,
    "config": config,
    "config_file": config_file,
}


def main() -> None:
    worker_main(SCENARIOS, lambda: deepspeed.init_distributed(dist_backend="gloo"))


if __name__ == "__main__":
    main()
