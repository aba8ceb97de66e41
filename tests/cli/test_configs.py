"""Every shipped config parses and builds its model and data module (with small overrides where
the real data or weights are absent), and the paper recipe's numbers are what the paper says."""

import pytest
import timm
import torch

import vmoe.models as vm
from tests.helpers import ROOT, make_image_folder
from vmoe.cli.training import VmoeCLI
from vmoe.data import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule
from vmoe.train import VmoeClassifier

CONFIGS = ROOT / "configs"
ON_CPU = [
    "--trainer.accelerator",
    "cpu",
    "--trainer.devices",
    "1",
    "--trainer.strategy",
    "auto",
    "--trainer.logger",
    "false",
]


def build(name, tmp_path, *overrides):
    cli = VmoeCLI(
        args=[
            "--config",
            str(CONFIGS / name),
            *ON_CPU,
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            *overrides,
        ],
        run=False,
    )
    assert isinstance(cli.model, VmoeClassifier)
    return cli


def test_all_configs_are_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(
        [
            "quickstart.yaml",
            "quickstart_soft.yaml",
            "cifar10_upcycle_vit_s.yaml",
            "vmoe_s32_last2_imagenet.yaml",
            "finetune_vmoe_b16.yaml",
        ]
    )


def test_quickstart(tmp_path):
    cli = build("quickstart.yaml", tmp_path)
    assert isinstance(cli.datamodule, DigitsDataModule) and cli.datamodule.img_size == 16
    assert cli.model.num_classes == 10
    assert list(vm.moe_layers(cli.model.model)) == ["blocks.1.mlp", "blocks.3.mlp"]
    assert (
        cli.trainer.max_epochs >= 1 and type(cli.trainer.accelerator).__name__ == "CPUAccelerator"
    )
    # checkpoints go into the run directory, best and last
    dirs = {c.dirpath for c in cli.trainer.checkpoint_callbacks}
    assert dirs == {str(tmp_path / "run" / "checkpoints")}


def test_quickstart_soft_trains_a_few_steps(tmp_path):
    cli = build(
        "quickstart_soft.yaml",
        tmp_path,
        "--trainer.max_steps",
        "4",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.num_sanity_val_steps",
        "0",
        "--routing_stats.every_n_steps",
        "2",
    )
    assert isinstance(cli.datamodule, DigitsDataModule) and cli.datamodule.img_size == 16
    model = cli.model.model
    layers = vm.moe_layers(model)
    assert list(layers) == ["blocks.2.mlp", "blocks.3.mlp"] and all(
        m.is_soft for m in layers.values()
    )
    assert all(
        (m.num_experts, m.num_slots, m.group_size_images) == (4, 4, 1) for m in layers.values()
    )
    assert (model.embed_dim, len(model.blocks), tuple(model.patch_embed.grid_size)) == (
        64,
        4,
        (4, 4),
    )
    # no evaluation capacity factor: sparse layers evaluate dropless, soft layers as trained
    assert cli.model.hparams.eval_capacity_factor is None
    before = layers["blocks.3.mlp"].router.mu.detach().clone()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 4
    assert not torch.equal(before, layers["blocks.3.mlp"].router.mu)  # the router learns
    assert layers["blocks.3.mlp"].last_plan.dispatch_weight.shape[1:] == (17, 4, 4)


def test_cifar10_upcycle_vit_s(tmp_path):
    # no download: the dense ViT-S/16 gets random weights here
    cli = build(
        "cifar10_upcycle_vit_s.yaml",
        tmp_path,
        "--model.upcycle_pretrained",
        "false",
        "--data.init_args.data_dir",
        str(tmp_path / "cifar"),
    )
    assert isinstance(cli.datamodule, CIFAR10DataModule) and cli.model.num_classes == 10
    model = cli.model.model
    assert model.embed_dim == 384 and len(model.blocks) == 12
    assert list(vm.moe_layers(model)) == ["blocks.9.mlp", "blocks.11.mlp"]
    layer = vm.moe_layers(model)["blocks.11.mlp"]
    assert layer.num_experts == 8 and layer.router.num_selected == 2
    # upcycled: every expert starts as the dense MLP it replaced
    w = layer.experts.fc1_weight
    assert all(bool((w[e] == w[0]).all()) for e in range(8))


def test_vmoe_s32_imagenet_recipe(tmp_path):
    data = make_image_folder(tmp_path / "imagenet", per_split=(1, 1, 0), size=32)
    cli = build(
        "vmoe_s32_last2_imagenet.yaml",
        tmp_path,
        "--data.init_args.data_dir",
        str(data),
        "--data.init_args.num_classes",
        "3",
    )
    hp, trainer, dm = cli.model.hparams, cli.trainer, cli.datamodule
    assert isinstance(dm, ImageFolderDataModule) and cli.model.num_classes == 3
    assert (hp.lr, hp.warmup_steps, hp.schedule, hp.end_lr) == (3e-3, 10000, "linear", 1e-5)
    assert (tuple(hp.betas), hp.weight_decay, hp.optimizer) == ((0.9, 0.999), 0.1, "adamw")
    assert (hp.loss, hp.mixup_alpha, hp.moe_dropout, hp.eval_capacity_factor) == (
        "sigmoid",
        0.2,
        0.2,
        None,  # dropless inference
    )
    assert trainer.gradient_clip_val == 1.0 and trainer.max_epochs == 300
    tt = dm.train_transform
    assert (tt.randaugment_num_ops, tt.randaugment_magnitude, tt.hflip_prob) == (2, 10.0, 0.5)
    assert dm.img_size == 224 and dm.batch_size * 8 == 4096
    model = cli.model.model
    assert list(vm.moe_layers(model)) == ["blocks.5.mlp", "blocks.7.mlp"]
    layer = vm.moe_layers(model)["blocks.7.mlp"]
    assert (layer.num_experts, layer.router.num_selected, layer.router.capacity_factor) == (
        8,
        2,
        1.05,
    )
    assert layer.experts.drop1.p == 0.2 and model.embed_dim == 512


def test_finetune_vmoe_b16(tmp_path):
    # stand-in for a converted V-MoE-B/16: a saved tiny V-MoE (the config's options are what
    # is checked; the real dir comes from `vmoe convert`)
    saved = vm.save_pretrained(
        timm.create_model("vmoe_tiny_e4_k2", num_classes=10), tmp_path / "pretrained"
    )
    data = make_image_folder(tmp_path / "folder", per_split=(1, 1, 0))
    cli = build(
        "finetune_vmoe_b16.yaml",
        tmp_path,
        "--model.pretrained_dir",
        str(saved),
        "--data.init_args.data_dir",
        str(data),
    )
    hp = cli.model.hparams
    assert (hp.optimizer, hp.momentum, hp.img_size, hp.eval_capacity_factor) == (
        "sgd",
        0.9,
        384,
        None,  # dropless inference
    )
    assert cli.trainer.max_steps == 10000
    model = cli.model.model
    assert model.num_classes == 3  # new head for the data
    assert tuple(model.patch_embed.grid_size) == (96, 96)  # 384 px / patch 4
    assert cli.datamodule.img_size == 384


def test_finetune_vmoe_b16_with_its_commented_options(tmp_path):
    saved = vm.save_pretrained(
        timm.create_model("vmoe_tiny_e4_k2", num_classes=10), tmp_path / "pretrained"
    )
    data = make_image_folder(tmp_path / "folder", per_split=(1, 1, 0))
    cli = build(
        "finetune_vmoe_b16.yaml",
        tmp_path,
        "--model.pretrained_dir",
        str(saved),
        "--data.init_args.data_dir",
        str(data),
        "--model.layer_decay",
        "0.75",
        "--model.grad_checkpointing",
        "true",
        "--ema.decay",
        "0.9998",
    )
    assert cli.model.hparams.layer_decay == 0.75 and cli.model.model.grad_checkpointing
    assert cli.config.ema.decay == 0.9998


@pytest.mark.parametrize("name", ["cifar10_upcycle_vit_s.yaml", "finetune_vmoe_b16.yaml"])
def test_configs_with_tiny_overrides_build_on_digits(name, tmp_path):
    """Any config's trainer/optimizer options also work with the tiny model and built-in data."""
    cli = build(
        name,
        tmp_path,
        "--model.upcycle_from",
        "null",
        "--model.pretrained_dir",
        "null",
        "--model.moe",
        "null",
        "--model.img_size",
        "16",
        "--model.model_name",
        "vmoe_tiny_e4_k2",
        "--data",
        "vmoe.data.DigitsDataModule",
        "--data.img_size",
        "16",
        "--trainer.precision",
        "32-true",
    )
    assert cli.model.num_classes == 10 and isinstance(cli.datamodule, DigitsDataModule)
