"""E: an adaptor that changes the gradient before any torch optimizer sees it."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from e_dist import hparams, update
from e_dist.update import GRAD_EMA

logger = logging.getLogger(__name__)


class E(torch.optim.Optimizer):
    r"""E (Zhao et al., NeurIPS 2025) in front of a base optimizer.

    Before the base optimizer steps, each gradient :math:`g_k` becomes

    .. math::
        a_k &= \beta a_{k-1} + (1 - \beta)(g_k - g_{k-1}),
              \quad a_0 = 0,\ g_0 = 0 \\
        \tilde g_k &= g_k + \alpha a_k

    computed in its closed form with one state tensor per parameter, the
    gradient EMA :math:`\mu` (state key ``grad_ema``). With
    :math:`c = \alpha (1 - \beta)`:

    .. math::
        \tilde g_k = (1 + c)\, g_k - c\, \mu_{k-1}, \qquad
        \mu_k = \beta \mu_{k-1} + (1 - \beta)\, g_k

    :math:`\alpha < 0` explores (leaves sharp minima for flat valleys),
    :math:`\alpha > 0` exploits. The paper uses alpha=-5, beta=0.99 for batches
    of 1K and more, alpha=0.5, beta=0.01 below; see :func:`e_dist.e_preset`.

    E holds no copy of anything: ``param_groups``, ``state`` and ``defaults``
    are the base optimizer's, so a framework that swaps ``param_groups`` steps
    exactly the groups it put there, and ``grad_ema`` is saved and loaded with
    the base optimizer's state. The gradients are transformed in place and
    stay transformed after ``step()``.

    Args:
        base_optimizer: any ``torch.optim.Optimizer``.
        alpha: E's strength (default -5). Needs :math:`|\alpha (1 - \beta)| < 1`.
        beta: decay of the gradient EMA (default 0.99).
        noise_std: standard deviation of Gaussian noise added to each gradient
            first (default 0, off).
        grad_clip: clamp each gradient element to ``[-grad_clip, grad_clip]``
            after the noise (default None, off).
        implementation: ``"auto"`` (CPU kernels where they apply, torch ops
            elsewhere), ``"native"`` or ``"reference"``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = E(torch.optim.AdamW(model.parameters(), lr=1e-3), alpha=-5, beta=0.99)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        alpha: float = -5.0,
        beta: float = 0.99,
        noise_std: float = 0.0,
        grad_clip: float | None = None,
        *,
        implementation: str = "auto",
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer, got "
                f"{type(base_optimizer).__name__}"
            )
        self.alpha = hparams.check_real("alpha", alpha)
        self.beta = hparams.check_range("beta", beta, 0.0, 1.0)
        hparams.check_stability(self.alpha, self.beta, "beta")
        self.noise_std = hparams.check_non_negative("noise_std", noise_std)
        if grad_clip is not None:
            grad_clip = hparams.check_real("grad_clip", grad_clip)
            if grad_clip <= 0:
                raise ValueError(
                    f"grad_clip must be > 0, or None to turn it off, got {grad_clip!r}"
                )
        self.grad_clip = grad_clip
        self.implementation = update.check_implementation(implementation)
        self.base_optimizer = base_optimizer
        # What torch.optim.Optimizer.__init__ sets up, less the parameter
        # groups and state, which stay the base optimizer's.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._patch_step_function()

    # The base optimizer's containers, shared rather than copied.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = groups

    @property
    def state(self) -> dict[Tensor, Any]:
        return self.base_optimizer.state

    @state.setter
    def state(self, state: dict[Tensor, Any]) -> None:
        self.base_optimizer.state = state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.base_optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.base_optimizer.defaults = defaults

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        return (
            f"E(alpha={self.alpha}, beta={self.beta}, noise_std={self.noise_std}, "
            f"grad_clip={self.grad_clip},\n  base_optimizer={self.base_optimizer!r})"
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base_optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict, ``grad_ema`` in each entry."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of :meth:`state_dict`'s format.

        Entries holding the reference package's ``prev_grad`` and
        ``exp_grad_diff`` are converted exactly into ``grad_ema``. A state
        dict of another optimizer (ALTO, the base optimizer alone, E over
        another base optimizer) raises
        :class:`~e_dist.checkpoint.io.CheckpointError` and changes nothing.
        """
        # Imported on use: the checkpoint package builds on the optimizers.
        from e_dist.checkpoint.reference import as_e_state

        converted = as_e_state(
            state_dict,
            self.beta,
            caller="E.load_state_dict",
            base_optimizer=self.base_optimizer,
        )
        self.base_optimizer.load_state_dict(converted)

    # State-dict hooks act on the dict the base optimizer builds and loads.
    def register_state_dict_pre_hook(self, hook, prepend: bool = False):
        return self.base_optimizer.register_state_dict_pre_hook(hook, prepend)

    def register_state_dict_post_hook(self, hook, prepend: bool = False):
        return self.base_optimizer.register_state_dict_post_hook(hook, prepend)

    def register_load_state_dict_pre_hook(self, hook, prepend: bool = False):
        return self.base_optimizer.register_load_state_dict_pre_hook(hook, prepend)

    def register_load_state_dict_post_hook(self, hook, prepend: bool = False):
        return self.base_optimizer.register_load_state_dict_post_hook(hook, prepend)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Transform the gradients, then step the base optimizer.

        ``closure`` runs once, with gradients enabled, before the transform;
        the base optimizer is not given it.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        grads, grad_emas, new_emas = [], [], []
        for group in self.param_groups:
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("E does not support sparse gradients")

                # The reference's optional noise, then elementwise clamp.
                if self.noise_std > 0:
                    grad.add_(torch.randn_like(grad), alpha=self.noise_std)
                if self.grad_clip is not None:
                    grad.clamp_(-self.grad_clip, self.grad_clip)

                grad_ema = self.state[param].get(GRAD_EMA)
                if grad_ema is None:
                    # The EMA enters the state only after the base optimizer's
                    # first step, which may take an empty state to mean "new".
                    grad_ema = torch.zeros_like(grad)
                    new_emas.append((param, grad_ema))
                grads.append(update.local(grad))
                grad_emas.append(update.local(grad_ema))

        update.explore(
            grads, grad_emas, self.alpha * (1.0 - self.beta), self.beta,
            self.implementation,
        )  # fmt: skip
        self.base_optimizer.step()
        for param, grad_ema in new_emas:
            self.state[param][GRAD_EMA] = grad_ema
        return loss
