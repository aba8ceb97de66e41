"""VmoeClassifier and its parts, without a Trainer run: model sources, losses, optimizer groups,
schedule, evaluation routing, label/num_classes checks."""

import math

import pytest
import torch
import torch.nn.functional as F

import vmoe.models as vm
from vmoe.train import VmoeClassifier, build_model
from vmoe.train.optim import create_optimizer, lr_factor, param_groups


def tiny(**kw):
    kw.setdefault("model_name", "vmoe_tiny_e4_k2")
    kw.setdefault("num_classes", 10)
    return VmoeClassifier(**kw)


def test_model_sources_exactly_one(tmp_path):
    with pytest.raises(ValueError, match="exactly one of model.model_name"):
        build_model(num_classes=10)
    with pytest.raises(ValueError, match="exactly one"):
        build_model(model_name="vmoe_tiny_e4_k2", upcycle_from="vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="not a registered timm model"):
        build_model(model_name="no_such_model")
    with pytest.raises(ValueError, match="needs model.moe"):
        build_model(upcycle_from="vit_tiny_patch16_224", upcycle_pretrained=False)


def test_pretrained_dir_with_new_head_and_size(tmp_path):
    src = build_model(model_name="vmoe_tiny_e4_k2", num_classes=10)
    vm.save_pretrained(src, tmp_path / "m")
    model = build_model(pretrained_dir=str(tmp_path / "m"), num_classes=3, img_size=32)
    assert model.num_classes == 3 and tuple(model.patch_embed.grid_size) == (8, 8)
    same = dict(src.named_parameters())
    # the body is the saved one; only the head is new
    assert torch.equal(
        model.blocks[1].mlp.experts.fc1_weight, same["blocks.1.mlp.experts.fc1_weight"]
    )
    assert model.head.weight.shape == (3, 64)


def test_upcycle_dense_vit_keeps_its_function():
    dense = build_model(
        model_name="vit_tiny_patch16_224", model_kwargs=dict(depth=2), num_classes=5, img_size=32
    )
    moe = build_model(
        upcycle_from="vit_tiny_patch16_224",
        upcycle_pretrained=False,
        num_classes=5,
        img_size=32,
        moe=dict(blocks=[1], num_experts=4, num_selected=2),
    )
    assert list(vm.moe_layers(moe)) == ["blocks.1.mlp"]
    assert moe.blocks[1].mlp.experts.fc1_weight.shape[0] == 4
    assert not vm.moe_layers(dense)


def test_moe_dropout_and_dense_plus_moe():
    model = build_model(
        model_name="vit_tiny_patch16_224",
        model_kwargs=dict(depth=4),
        img_size=32,
        num_classes=4,
        moe=dict(every=2, num_experts=4),
        moe_dropout=0.2,
    )
    layers = vm.moe_layers(model)
    assert list(layers) == ["blocks.1.mlp", "blocks.3.mlp"]
    assert all(m.experts.drop1.p == 0.2 and m.experts.drop2.p == 0.2 for m in layers.values())
    with pytest.raises(ValueError, match="already has MoE layers"):
        build_model(model_name="vmoe_tiny_e4_k2", moe=dict(every=2))


def test_softmax_loss_matches_torch_with_label_smoothing():
    module = tiny(label_smoothing=0.1)
    logits, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    expected = F.cross_entropy(logits, y, label_smoothing=0.1)
    assert torch.allclose(module.task_loss(logits, y), expected, atol=1e-6)


def test_sigmoid_loss_is_bce_summed_over_classes():
    module = tiny(loss="sigmoid")
    logits, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    onehot = F.one_hot(y, 10).float()
    expected = F.binary_cross_entropy_with_logits(logits, onehot, reduction="sum") / 6
    assert torch.allclose(module.task_loss(logits, y), expected, atol=1e-5)


def test_training_step_adds_aux_loss_and_mixup_handles_odd_batch():
    torch.manual_seed(0)
    module = tiny(mixup_alpha=0.2, cutmix_alpha=1.0)
    module.log = module.log_dict = lambda *a, **k: None  # no trainer attached
    module.optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.1)
    x, y = torch.randn(7, 3, 16, 16), torch.randint(0, 10, (7,))
    loss = module.training_step((x, y), 0)
    aux = vm.aux_loss(module.model)
    assert aux.item() > 0
    loss.backward()
    assert module.model.blocks[1].mlp.router.weight.grad.abs().sum() > 0
    # odd batch: one sample was left out of the mixed batch (timm needs pairs)
    plan = vm.routing_plans(module.model)["blocks.1.mlp"]
    assert int(plan.valid.sum()) == 6 * 17  # 6 images x (16 patches + cls)
    assert module.model.pos_embed.grad is not None


def test_training_loss_is_task_plus_weighted_aux_exactly():
    module = tiny(aux_loss_weight=50.0)  # large: leaving aux out must show
    logged = {}
    module.log_dict = lambda values, **k: logged.update(values)
    module.log = lambda name, value, **k: None
    module.optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.1)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    torch.manual_seed(1)
    loss = module.training_step((x, y), 0)
    # recomputed independently: the same forward (same router noise), cross-entropy + 50 aux
    torch.manual_seed(1)
    logits = module(x)
    aux = vm.aux_loss(module.model)
    assert 50.0 * aux.item() > 1e-3
    expected = F.cross_entropy(logits, y) + 50.0 * aux
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-6)
    assert logged["train/task_loss"].item() == pytest.approx(
        F.cross_entropy(logits, y).item(), rel=1e-6
    )
    assert logged["train/aux_loss"].item() == pytest.approx(aux.item(), rel=1e-6)


def test_labels_outside_num_classes_is_a_clear_error():
    module = tiny(num_classes=3)
    module.log = module.log_dict = lambda *a, **k: None
    with pytest.raises(ValueError, match="label 7 but the model has num_classes=3"):
        module.training_step((torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 7, 2])), 0)


def test_checkpoint_with_other_num_classes_is_a_clear_error():
    module = tiny(num_classes=10)
    state = {"state_dict": {"model.head.weight": torch.zeros(100, 64)}}
    with pytest.raises(ValueError, match="num_classes=100 but this model/data has num_classes=10"):
        module.on_load_checkpoint(state)


def test_no_weight_decay_for_norms_biases_tokens_and_expert_biases():
    model = build_model(model_name="vmoe_tiny_e4_k2", num_classes=10)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert {
        "cls_token",
        "pos_embed",
        "blocks.1.mlp.experts.fc1_bias",
        "blocks.0.norm1.weight",
        "head.bias",
    } <= kept
    assert {
        "blocks.1.mlp.experts.fc1_weight",
        "blocks.1.mlp.router.weight",
        "head.weight",
        "patch_embed.proj.weight",
    } <= decayed
    assert decayed.isdisjoint(kept) and len(decayed) + len(kept) == len(names)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_warmup_then_decay_to_end(schedule):
    f = [
        lr_factor(s, total_steps=100, warmup_steps=10, schedule=schedule, peak_lr=1e-3, end_lr=1e-5)
        for s in range(101)
    ]
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11) and f[10] == 1.0
    assert all(a < b for a, b in zip(f[:10], f[1:11]))  # warmup rises
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # then decays
    assert f[100] == pytest.approx(1e-2)  # to end_lr / peak
    mid = 0.5 if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * 0.5))
    assert f[55] == pytest.approx(1e-2 + (1 - 1e-2) * mid)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, total_steps=1, warmup_steps=0, schedule="step", peak_lr=1, end_lr=0)


def test_eval_capacity_factor_during_validation_and_test_then_restored():
    module = tiny(eval_capacity_factor=4.0, eval_batch_priority=True)
    layers = vm.moe_layers(module.model)
    for start, end in (
        (module.on_validation_start, module.on_validation_end),
        (module.on_test_start, module.on_test_end),
        (module.on_predict_start, module.on_predict_end),
    ):
        start()
        assert all(
            m.router.capacity_factor == 4.0 and m.router.batch_priority for m in layers.values()
        )
        end()
        assert all(
            m.router.capacity_factor == 1.05 and not m.router.batch_priority
            for m in layers.values()
        )


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="model.loss='hinge'"):
        tiny(loss="hinge")
    with pytest.raises(ValueError, match="model.optimizer='lambada' is not an optimizer"):
        tiny(optimizer="lambada")
    with pytest.raises(ValueError, match="model.end_lr=0.01 is above model.lr=0.001"):
        tiny(lr=1e-3, end_lr=1e-2)
    with pytest.raises(ValueError, match="model.moe_dropout"):
        tiny(moe_dropout=1.5)


def test_optimizers_come_from_timms_factory():
    """'sgd' is classical momentum (timm's 'sgd' is Nesterov), betas reach Adam-type optimizers,
    every timm optimizer name works, and vmoe's weight-decay groups are kept."""
    model = tiny().model
    sgd = create_optimizer(param_groups(model, 0.1), "sgd", lr=0.1, momentum=0.8)
    assert type(sgd) is torch.optim.SGD
    assert sgd.defaults["nesterov"] is False and sgd.defaults["momentum"] == 0.8
    adamw = create_optimizer(param_groups(model, 0.1), "adamw", lr=1e-3, betas=(0.8, 0.95))
    assert type(adamw) is torch.optim.AdamW and tuple(adamw.defaults["betas"]) == (0.8, 0.95)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0]
    lamb = create_optimizer(param_groups(model, 0.1), "lamb", lr=1e-3)
    assert type(lamb).__name__ == "Lamb" and len(lamb.param_groups) == 2


def test_evaluation_routing_leaves_soft_layers_alone():
    """The default eval_capacity_factor (4.0) applies to sparse layers; Soft MoE layers (fixed
    slots) run as trained, so a Soft MoE model validates with the defaults."""
    module = tiny(model_name="soft_moe_tiny_e8", eval_batch_priority=True)
    before = {name: layer.num_slots for name, layer in vm.moe_layers(module.model).items()}
    assert before
    module.on_validation_start()
    assert {name: layer.num_slots for name, layer in vm.moe_layers(module.model).items()} == before
    module.on_validation_end()
