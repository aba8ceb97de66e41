"""Balancing losses in any training loop (vmoe.moe.balancing): in the default 'backward' mode a loop
that backpropagates only its task loss gets the gradients of task + aux loss; nothing is counted
twice (vmoe fit, a loop that also adds the aux loss, accumulation, loss scaling, compile)."""

import copy

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F

import vmoe.models as vm
from vmoe.moe import MoeMlp
from vmoe.train import VmoeClassifier


def tiny_model():
    torch.manual_seed(0)
    return timm.create_model("vmoe_tiny_e4_k2", num_classes=10).train()  # router noise on


def batch(seed=1, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def grads_of(model, loss_fn, batches, noise_seed=0):
    """Gradients after backpropagating ``loss_fn(model, x, y)`` for each batch (accumulated)."""
    model.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(batches):
        torch.manual_seed(noise_seed + i)  # the same router noise in every run
        loss_fn(model, x, y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def task_only(model, x, y):
    return F.cross_entropy(model(x), y)


def task_plus_aux(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits, y) + vm.aux_loss(model)


def assert_same(a, b, atol=1e-7):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=atol, msg=name)


ROUTER = "blocks.1.mlp.router.weight"


def test_task_loss_only_loop_gets_the_aux_loss_gradients():
    """Fails on the code before vmoe.moe.balancing: a loop without the aux loss trained no
    balancing."""
    auto, manual = tiny_model(), tiny_model()
    vm.set_aux_loss_mode(manual, "manual")
    assert all(m.aux_loss_mode == "backward" for m in vm.moe_layers(auto).values())  # the default
    expected = grads_of(manual, task_plus_aux, [batch()])
    got = grads_of(auto, task_only, [batch()])
    assert_same(got, expected)
    # the aux loss did matter: without it the router's gradient differs
    without = grads_of(manual, task_only, [batch()])
    assert (without[ROUTER] - expected[ROUTER]).abs().max() > 1e-4
    # and in 'backward' mode the kept losses are for logging: detached, same values
    assert not vm.aux_loss(auto).requires_grad and vm.aux_loss(auto) > 0
    assert not any(v.requires_grad for v in vm.moe_layers(auto)["blocks.1.mlp"].aux_losses.values())


def test_adding_the_aux_loss_in_backward_mode_counts_it_once():
    auto, manual = tiny_model(), tiny_model()
    vm.set_aux_loss_mode(manual, "manual")
    assert_same(
        grads_of(auto, task_plus_aux, [batch()]), grads_of(manual, task_plus_aux, [batch()])
    )


def test_accumulation_and_loss_scaling_follow_the_aux_loss_scale():
    """Two micro-batches with the loss divided by 2 and multiplied by a GradScaler-like 1024:
    ``set_aux_loss_scale(model, 1024 / 2)`` gives the gradients of the explicit loop."""
    auto, manual = tiny_model(), tiny_model()
    vm.set_aux_loss_mode(manual, "manual")
    vm.set_aux_loss_scale(auto, 1024 / 2)
    micro = [batch(1, 4), batch(2, 4)]
    expected = grads_of(manual, lambda m, x, y: task_plus_aux(m, x, y) * 1024 / 2, micro)
    got = grads_of(auto, lambda m, x, y: task_only(m, x, y) * 1024 / 2, micro)
    assert_same(got, expected, atol=1e-4)
    vm.set_aux_loss_scale(auto, torch.tensor(0.0))  # a 0-dim tensor is read; 0 turns it off
    assert_same(grads_of(auto, task_only, micro), grads_of(manual, task_only, micro))


def test_compiled_layer_fullgraph_attaches_the_aux_loss():
    torch.manual_seed(0)
    layer = MoeMlp(16, 32, num_experts=4, group_size_images=2, zloss_weight=0.01).train()
    x = torch.randn(4, 5, 16)

    def router_grad(module, scale):
        layer.aux_loss_scale = scale
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        module(x).square().sum().backward()
        return layer.router.weight.grad.clone()

    eager = {s: router_grad(layer, s) for s in (1.0, 0.0, 5.0)}
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for s, expected in eager.items():  # a changed scale reaches the compiled backward
        torch.testing.assert_close(router_grad(compiled, s), expected)
    assert (eager[1.0] - eager[0.0]).abs().max() > 1e-6


def test_soft_moe_and_no_grad_attach_nothing():
    model = timm.create_model("soft_moe_tiny_e8", num_classes=10).train()
    x, y = batch()
    F.cross_entropy(model(x), y).backward()  # no aux loss (soft): nothing to attach, no error
    assert vm.aux_loss(model).item() == 0.0
    with torch.no_grad():
        tiny_model()(x)


def test_bad_modes_and_scales_are_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="aux_loss_mode='auto' must be one of"):
        vm.set_aux_loss_mode(model, "auto")
    for bad in (-1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match="aux_loss_scale=.* must be a finite number >= 0"):
            vm.set_aux_loss_scale(model, bad)
    with pytest.raises(ValueError, match="has no MoE layers"):
        vm.set_aux_loss_mode(
            timm.create_model("vit_tiny_patch16_224", depth=1, img_size=16, patch_size=4), "manual"
        )


# --- vmoe fit: VmoeClassifier adds the aux loss itself, once -----------------------------------
def tiny_classifier(**kw):
    module = VmoeClassifier(model_name="vmoe_tiny_e4_k2", num_classes=10, **kw)
    module.log = module.log_dict = lambda *a, **k: None  # no trainer attached
    return module


def test_vmoe_fit_counts_the_aux_loss_once_with_its_weight():
    """The gradients of a training step equal those of task + aux_loss_weight x aux computed
    explicitly (the pre-vmoe.moe.balancing path); with the layers left in 'backward' mode they would
    get 1 x aux attached on top of the detached 50 x aux."""
    module = tiny_classifier(aux_loss_weight=50.0)
    assert all(m.aux_loss_mode == "manual" for m in vm.moe_layers(module.model).values())
    reference = copy.deepcopy(module.model)
    x, y = batch()
    torch.manual_seed(5)
    module.training_step((x, y), 0).backward()
    got = {n[len("model.") :]: p.grad for n, p in module.named_parameters() if p.grad is not None}
    expected = grads_of(
        reference,
        lambda m, x, y: F.cross_entropy(m(x), y) + 50.0 * vm.aux_loss(m),
        [(x, y)],
        noise_seed=5,
    )
    assert_same(got, expected)


def test_vmoe_fit_gradient_accumulation_scales_the_aux_loss_with_the_task_loss(tmp_path):
    """Lightning divides the loss by accumulate_grad_batches: one SGD step (lr 1, no momentum,
    no decay) over 2 micro-batches moves the weights by the mean gradient of task + 50 x aux."""
    module = tiny_classifier(
        optimizer="sgd",
        momentum=0.0,
        lr=1.0,
        weight_decay=0.0,
        schedule="constant",
        eval_capacity_factor=None,
        aux_loss_weight=50.0,
    )
    for layer in vm.moe_layers(module.model).values():
        layer.noise_std = 0.0  # deterministic routing: the Trainer draws its own random numbers
    before = copy.deepcopy(module.model)
    vm.set_aux_loss_mode(before, "manual")  # the reference: the explicit loss
    micro = [batch(1, 4), batch(2, 4)]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(
            torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro])
        ),
        batch_size=4,
    )
    trainer = L.Trainer(
        max_steps=1,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    without = grads_of(copy.deepcopy(before), lambda m, x, y: F.cross_entropy(m(x), y) / 2, micro)
    expected = grads_of(
        before, lambda m, x, y: (F.cross_entropy(m(x), y) + 50 * vm.aux_loss(m)) / 2, micro
    )
    assert (without[ROUTER] - expected[ROUTER]).abs().max() > 1e-4  # the aux loss shows
    after = dict(module.model.named_parameters())
    moved = {n: before.get_parameter(n).detach() - after[n].detach() for n in expected}
    assert moved[ROUTER].abs().max() > 0
    assert_same(moved, expected, atol=1e-6)


def test_ema_copies_and_evaluates_without_touching_the_training_gradients():
    """timm's ModelEmaV3 deep-copies the model (possible after a forward: the kept losses are
    detached) and runs it under no_grad: nothing attached, the training gradients unchanged."""
    from timm.utils import ModelEmaV3

    model, reference = tiny_model(), tiny_model()
    expected = grads_of(reference, task_only, [batch()])
    torch.manual_seed(0)
    F.cross_entropy(model(batch()[0]), batch()[1]).backward()
    ema = ModelEmaV3(model, decay=0.5)
    ema.update(model)
    with torch.no_grad():
        ema.module.eval()(batch()[0])
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert_same(got, expected)
    assert all(p.grad is None for p in ema.module.parameters())


def test_grad_checkpointing_attaches_the_aux_loss_once():
    """The recomputing backward re-runs each router (same noise): the aux gradient still comes
    once."""
    ckpt, manual = tiny_model(), tiny_model()
    ckpt.set_grad_checkpointing(True)
    vm.set_aux_loss_mode(manual, "manual")
    assert_same(
        grads_of(ckpt, task_only, [batch()]), grads_of(manual, task_plus_aux, [batch()]), atol=1e-6
    )
