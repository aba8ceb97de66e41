"""ExpertParallelStrategy: Lightning's DDP with the MoE experts sharded over processes.

From the YAML of ``vmoe fit``::

    trainer:
      strategy:
        class_path: vmoe.train.strategy.ExpertParallelStrategy
        init_args: {expert_parallel_size: 2}

(or ``trainer.strategy: expert_parallel_2`` / ``_4`` / ``_8``, registered names). The world
(``num_nodes * devices`` processes) becomes a ``(dp, ep)`` mesh (``vmoe.moe.parallel``); at
setup every MoE layer keeps this rank's E/ep experts and DDP is told to leave them alone.

- Data: every one of the W processes is a data-parallel worker for the shared (non-expert)
  weights, so the sampler shards over the whole world (Lightning's DistributedSampler, rank =
  global rank): W different local batches of the same size, one global batch. The dp axis of
  the mesh only says which ranks hold the same experts.
- Gradients: DDP averages the shared weights over all ranks; the experts' gradients are summed
  over their dp group and divided by W (``reduce_expert_gradients``) once per optimizer step,
  after the last backward (gradient accumulation included). Gradient-norm clipping counts every
  expert once (``vmoe.moe.parallel.clip_grad_norm_``), so all ranks clip alike.
- Checkpoints hold all E experts (the slabs and the optimizer state of expert parameters are
  gathered), so they load with any ep, or without expert parallelism; loading slices them.
  At the end of a stage the model is put back together (``unshard_experts``) on every rank, so
  ``ExportPretrained`` writes what a one-process run writes.

Limits: automatic optimization only; weight averaging (``ema.decay``) is refused; ``predict``
is refused (Lightning's predict sampler gives ranks unequal batch counts, and every rank must
join every all-to-all): predict with the exported model; expert dropout draws on the rank that
runs the expert.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim import Optimizer

from vmoe.moe.parallel import (
    clip_grad_norm_,
    exclude_experts_from_ddp,
    expert_parallel_layers,
    expert_parallel_mesh,
    full_state_dict,
    gather_optimizer_state,
    reduce_expert_gradients,
    shard_experts,
    shard_optimizer_state,
    unshard_experts,
)

__all__ = ["ExpertParallelStrategy"]


class ExpertParallelStrategy(DDPStrategy):
    """DDP for the shared weights, expert parallelism (all-to-all) for the MoE experts.

    Args:
        expert_parallel_size: ep, the number of ranks that share out one copy of the experts;
            must divide the world size (``num_nodes * devices``) and every layer's E. 1 is plain
            DDP (with the same checkpoints).
        **kwargs: ``DDPStrategy``'s (``process_group_backend``, ``timeout``, ...).
    """

    strategy_name = "expert_parallel"

    def __init__(self, expert_parallel_size: int = 1, **kwargs: Any):
        if (
            not isinstance(expert_parallel_size, int)
            or isinstance(expert_parallel_size, bool)
            or expert_parallel_size < 1
        ):
            raise ValueError(f"expert_parallel_size={expert_parallel_size!r} must be an int >= 1")
        super().__init__(**kwargs)
        self.expert_parallel_size = expert_parallel_size
        self.mesh = None
        self._failed = False

    def setup_environment(self) -> None:
        super().setup_environment()  # the process group
        self.mesh = expert_parallel_mesh(self.expert_parallel_size, self.root_device.type)

    def check_supported(self, fn: TrainerFn, callbacks) -> None:
        """NotImplementedError for what this strategy cannot run: predict (ep > 1), weight
        averaging. ``vmoe fit|predict`` calls it before any process is started."""
        if fn == TrainerFn.PREDICTING and self.expert_parallel_size > 1:
            raise NotImplementedError(
                "predict with ExpertParallelStrategy is not supported (ranks get unequal numbers "
                "of batches, and every rank must join every all-to-all); predict with the exported "
                "model (vmoe predict) in one process or with strategy ddp"
            )
        if any(isinstance(cb, WeightAveraging) for cb in callbacks):
            raise NotImplementedError(
                "weight averaging (ema.decay, Lightning's EMAWeightAveraging) is not supported "
                "with ExpertParallelStrategy: its averaged copy would hold this rank's experts "
                "only and be saved that way; train without it, or with strategy ddp"
            )

    def setup(self, trainer) -> None:
        self.check_supported(trainer.state.fn, trainer.callbacks)
        module = self.lightning_module
        shard_experts(module, self.mesh)
        exclude_experts_from_ddp(module)  # the slabs differ from rank to rank
        super().setup(trainer)
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm

    def _clip_grad_by_norm(self, optimizer: Optimizer, clip_val: float) -> None:
        params = self.precision_plugin.main_params(optimizer)
        clip_grad_norm_(params, clip_val, self.lightning_module, self.mesh)

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[torch.nn.Module] = None,
        **kwargs: Any,
    ) -> Any:
        def closure_then_reduce():
            # the closure runs the last (or only) backward of this step; Lightning's
            # on_before_optimizer_step hooks and clipping come after it
            result = closure()
            reduce_expert_gradients(self.lightning_module, self.mesh)
            return result

        return super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)

    def lightning_module_state_dict(self) -> Dict[str, Any]:
        return full_state_dict(self.lightning_module)

    def optimizer_state(self, optimizer: Optimizer) -> Dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        return gather_optimizer_state(optimizer, self.lightning_module)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        states = [
            shard_optimizer_state(state, optimizer, self.lightning_module)
            for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"])
        ]
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": states})

    def on_exception(self, exception: BaseException) -> None:
        self._failed = True  # no collective in teardown: the other ranks may be gone
        super().on_exception(exception)

    def teardown(self) -> None:
        module = self.lightning_module
        if module is not None and not self._failed and expert_parallel_layers(module):
            unshard_experts(module)
            module._ddp_params_and_buffers_to_ignore = []
        super().teardown()


for _ep in (2, 4, 8):
    if f"expert_parallel_{_ep}" not in StrategyRegistry:
        StrategyRegistry.register(
            f"expert_parallel_{_ep}",
            ExpertParallelStrategy,
            description=f"DDP with the MoE experts sharded over {_ep} ranks",
            expert_parallel_size=_ep,
        )
