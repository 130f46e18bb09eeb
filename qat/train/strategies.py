"""Distributed strategies that need Python objects (not expressible in YAML).

`fsdp_strategy`: Lightning's FSDP (FSDP1, `use_orig_params=True`) made to train this model,
on GPUs and, with the gloo backend, on CPUs (so CI runs the same code path):

- one FSDP unit per transformer block (models.llama.Block); embeddings, the final norm and
  lm_head (tied to the embeddings) stay in the root unit;
- 0-d parameters, i.e. the LSQ / PACT scales, are left out of the flat parameters (FSDP
  cannot flatten them): they stay whole on every rank and their gradients are averaged
  after each backward, as FSDP does for the sharded ones;
- the optimizer is built before wrapping, while every parameter has its full shape: its
  groups decay matrices only (optim.py), and a 1-d shard would exempt them all;
- clipping by norm is FSDP's own `clip_grad_norm_` on the root unit, the norm over every
  rank's shard (Lightning's FSDP precision plugin refuses norm clipping).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, FullyShardedDataParallel, OptimStateKeyType, StateDictType


class ShardedClipPrecision(FSDPPrecision):
    """FSDPPrecision that clips by the global norm: through the root FSDP unit."""

    root: FullyShardedDataParallel | None = None

    def clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
        if self.root is None:
            raise RuntimeError("gradient clipping before the model was wrapped in FSDP")
        self.root.clip_grad_norm_(clip_val)


class QuantFSDPStrategy(FSDPStrategy):
    """FSDPStrategy for quantized models, on CUDA or CPU devices (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.replicated: list[nn.Parameter] = []  # 0-d parameters, outside the flat parameters
        self.root: FullyShardedDataParallel | None = None
        self.optimizers_built = False

    @property
    def precision_plugin(self) -> FSDPPrecision:
        return FSDPStrategy.precision_plugin.fget(self)

    @precision_plugin.setter
    def precision_plugin(self, plugin: FSDPPrecision | None) -> None:
        # The Trainer hands every FSDP strategy a plain FSDPPrecision; swap in the clipping one.
        if type(plugin) is FSDPPrecision:
            plugin = ShardedClipPrecision(plugin.precision, plugin.scaler)
        FSDPStrategy.precision_plugin.fset(self, plugin)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if self.root is not None and self.root.module is model:
            return self.root  # validation after fit: the module is sharded already, keep its root
        trainer = getattr(self.lightning_module, "_trainer", None)  # none when wrapping a bare model
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            # Before wrapping: the parameter groups read shapes, and FSDP turns every parameter
            # into a 1-d view of its shard. use_orig_params keeps the parameter objects, so the
            # optimizer stays valid; its state is created at the first step, per shard.
            super().setup_optimizers(trainer)
            self.optimizers_built = True
        self.replicated = [p for p in model.parameters() if p.ndim == 0]
        for p in self.replicated:  # FSDP moves only the parameters it manages
            p.data = p.data.to(self.root_device)
        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,  # a device, not an index: CPU ranks have no index
            ignored_states=self.replicated,
            **self.kwargs,
        )
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        self.root = wrapped
        if isinstance(self.precision_plugin, ShardedClipPrecision):
            self.precision_plugin.root = wrapped
        return wrapped

    def setup_optimizers(self, trainer: Any) -> None:
        if not self.optimizers_built:  # _setup_model built them before wrapping
            super().setup_optimizers(trainer)
        self.optimizers_built = False

    def _full_state_dict_context(self) -> Any:
        # Lightning offloads the gathered state to the CPU; on CPU ranks that offload frees
        # memory the state dict still points to (a segfault): gather in place there.
        offload = self.root_device.type != "cpu"
        return FullyShardedDataParallel.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=offload, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True),
        )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        with self._full_state_dict_context():
            return self.model.state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps it
        with self._full_state_dict_context():
            state = FullyShardedDataParallel.optim_state_dict(self.model, optimizer)
        if self.global_rank == 0:  # keyed by parameter index, as a plain optimizer's
            state = FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        super().post_backward(closure_loss)
        grads = [p.grad for p in self.replicated if p.grad is not None]
        if grads and self.world_size > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)  # one collective for all of them (gloo has no AVG)
            flat /= self.world_size
            for g, avg in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(avg.view_as(g))


def fsdp_strategy(sharding_strategy: str = "FULL_SHARD", **kwargs: Any) -> QuantFSDPStrategy:
    """FSDP with one unit per transformer block (models.llama.Block), mixed precision from the Trainer."""
    from qat.models.llama import Block

    return QuantFSDPStrategy(sharding_strategy=sharding_strategy, auto_wrap_policy={Block}, **kwargs)
