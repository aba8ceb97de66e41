"""Training options from the YAML, each built on timm's or Lightning's implementation:
gradient checkpointing, torch.compile, layer-wise lr decay, an EMA of the weights. Each runs a
few steps of ``vmoe fit`` on digits with the tiny model."""

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import vmoe.models as vm
from tests.helpers import NO_AUG, quiet
from vmoe.cli import main
from vmoe.train import VmoeClassifier, build_model
from vmoe.train.optim import no_weight_decay_names, param_groups

STEPS = 4


def fit(root, *extra):
    """A few steps of ``vmoe fit`` on digits; returns the exit code."""
    return main(
        [
            "fit",
            *quiet(
                root,
                "--trainer.logger",
                "false",
                "--trainer.max_steps",
                str(STEPS),
                "--trainer.limit_val_batches",
                "1",
                "--trainer.limit_test_batches",
                "1",
                "--data.init_args.batch_size",
                "32",
                "--routing_stats.figures",
                "false",
                "--export.enabled",
                "false",
                *extra,
            ),
        ]
    )


def last_state(root):
    ckpt = torch.load(
        Path(root) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert ckpt["global_step"] == STEPS
    return ckpt


def tiny(**kw):
    return VmoeClassifier(model_name="vmoe_tiny_e4_k2", num_classes=10, **kw)


# --- gradient checkpointing -------------------------------------------------------------------
def loss_and_grads(module, x, y, seed=0):
    """Training-mode loss (router noise on), aux losses read before and after backward, grads."""
    module.train()
    module.zero_grad()
    torch.manual_seed(seed)
    logits = module(x)
    aux = vm.aux_loss(module.model)
    loss = module.task_loss(logits, y) + aux
    loss.backward()
    after = vm.aux_loss(module.model)  # the recomputation in backward ran the routers again
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), aux.detach(), after.detach(), grads


def test_grad_checkpointing_gives_the_same_loss_aux_losses_and_gradients():
    plain, ckpt = tiny(), tiny(grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.model.grad_checkpointing and not plain.model.grad_checkpointing
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    loss0, aux0, after0, grads0 = loss_and_grads(plain, x, y)
    loss1, aux1, after1, grads1 = loss_and_grads(ckpt, x, y)
    assert aux0 > 0
    assert torch.equal(loss0, loss1) and torch.equal(aux0, aux1)
    # not double counted: the aux loss left after the recomputing backward is the same one
    assert torch.equal(after1, aux1) and torch.equal(after0, aux0)
    stats0, stats1 = vm.routing_stats(plain.model), vm.routing_stats(ckpt.model)  # the last plans
    for layer in stats0:
        for key in stats0[layer]:
            assert torch.equal(stats0[layer][key], stats1[layer][key]), (layer, key)
    assert grads0.keys() == grads1.keys()
    assert "model.blocks.1.mlp.router.weight" in grads1  # the aux loss reaches the router
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=0, atol=1e-6, msg=name)


def test_compile_kwargs_without_compile_is_refused():
    with pytest.raises(ValueError, match="compile_kwargs is given but model.compile is false"):
        tiny(compile_kwargs={"backend": "eager"})


def test_fit_with_grad_checkpointing(tmp_path):
    assert fit(tmp_path, "--model.grad_checkpointing", "true") == 0
    ckpt = last_state(tmp_path)
    assert ckpt["hyper_parameters"]["grad_checkpointing"] is True


# --- torch.compile ----------------------------------------------------------------------------
def test_compiled_model_gives_the_same_loss_and_aux_loss():
    plain, compiled = tiny(), tiny(compile=True, compile_kwargs={"backend": "aot_eager"})
    compiled.load_state_dict(plain.state_dict())
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    loss0, aux0, _, grads0 = loss_and_grads(plain, x, y)
    loss1, aux1, _, grads1 = loss_and_grads(compiled, x, y)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    torch.testing.assert_close(aux1, aux0, rtol=0, atol=1e-6)  # the layers' attributes are set
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=0, atol=1e-5, msg=name)


def test_fit_with_compile_keeps_the_state_dict_keys(tmp_path):
    # with validation and the test after fit (evaluation routing: other capacity factor), and
    # together with gradient checkpointing and the EMA
    assert (
        fit(
            tmp_path,
            "--model.compile",
            "true",
            "--model.compile_kwargs",
            "{backend: aot_eager}",
            "--trainer.val_check_interval",
            str(STEPS),
            "--model.grad_checkpointing",
            "true",
            "--ema.decay",
            "0.9",
        )
        == 0
    )
    ckpt = last_state(tmp_path)
    plain = tiny()
    assert set(ckpt["state_dict"]) == set(plain.state_dict())  # no "_orig_mod." prefix
    assert ckpt["hyper_parameters"]["compile"] is True


# --- layer-wise learning-rate decay -----------------------------------------------------------
def test_layer_decay_scales_follow_depth_and_keep_the_decay_membership():
    model = build_model(model_name="vmoe_tiny_e4_k2", num_classes=10)
    depth, rate = len(model.blocks), 0.75
    names = {id(p): n for n, p in model.named_parameters()}
    plain = param_groups(model, 0.1)
    layered = param_groups(model, 0.1, layer_decay=rate)

    def members(groups, decayed):
        return {
            names[id(p)] for g in groups if (g["weight_decay"] > 0) == decayed for p in g["params"]
        }

    for decayed in (True, False):
        assert members(layered, decayed) == members(plain, decayed)
    assert members(plain, False) == no_weight_decay_names(model)
    scale = {names[id(p)]: g["lr_scale"] for g in layered for p in g["params"]}
    for i in range(depth):
        assert scale[f"blocks.{i}.attn.qkv.weight"] == pytest.approx(rate ** (depth - i))
        assert scale[f"blocks.{i}.norm1.bias"] == pytest.approx(rate ** (depth - i))
    assert scale["blocks.1.mlp.experts.fc1_weight"] == pytest.approx(rate ** (depth - 1))
    assert (
        scale["pos_embed"] == scale["patch_embed.proj.weight"] == pytest.approx(rate ** (depth + 1))
    )
    assert scale["norm.weight"] == pytest.approx(rate)  # timm groups it with the last block
    assert scale["head.weight"] == scale["head.bias"] == 1.0
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups(model, 0.1, layer_decay=1.5)


def test_fit_with_layer_decay_uses_the_scaled_learning_rates(tmp_path):
    assert (
        fit(
            tmp_path,
            "--model.layer_decay",
            "0.5",
            "--model.schedule",
            "constant",
            "--model.warmup_steps",
            "0",
            "--model.lr",
            "0.002",
        )
        == 0
    )
    groups = last_state(tmp_path)["optimizer_states"][0]["param_groups"]
    assert sorted({g["lr"] for g in groups}) == pytest.approx(
        sorted({0.002 * g["lr_scale"] for g in groups})
    )
    assert max(g["lr"] for g in groups) == pytest.approx(0.002)
    assert min(g["lr"] for g in groups) == pytest.approx(
        0.002 * 0.5**5
    )  # depth 4: the stem at 0.5 ** 5


# --- EMA of the weights -----------------------------------------------------------------------
class RecordWeights(L.Callback):
    """Keeps the model's parameters after every optimizer step (class attribute ``seen``) and
    those the test after fit evaluates (``tested``)."""

    seen: list = []
    tested: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        RecordWeights.seen.append(
            {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}
        )

    def on_test_start(self, trainer, pl_module):
        RecordWeights.tested = {
            n: p.detach().clone() for n, p in pl_module.model.named_parameters()
        }


def test_fit_with_ema_checkpoints_and_exports_the_ema_weights(tmp_path):
    RecordWeights.seen, RecordWeights.tested = [], {}
    decay = 0.5
    assert (
        fit(
            tmp_path,
            "--ema.decay",
            str(decay),
            "--trainer.callbacks+=tests.train.test_options.RecordWeights",
            "--export.enabled",
            "true",
            "--export.use_best",
            "false",
            "--trainer.limit_val_batches",
            "0",
            "--test_weights",
            "final",
        )
        == 0
    )
    steps = RecordWeights.seen
    assert len(steps) == STEPS
    ema = dict(steps[0])  # the first update copies, then ema = decay * ema + (1 - decay) * w
    for weights in steps[1:]:
        ema = {n: decay * ema[n] + (1 - decay) * w for n, w in weights.items()}
    final = steps[-1]
    assert max((ema[n] - final[n]).abs().max().item() for n in ema) > 1e-4  # EMA != last weights
    ckpt = last_state(tmp_path)
    exported = vm.from_pretrained(tmp_path / "export").state_dict()
    for name in ema:
        torch.testing.assert_close(
            ckpt["state_dict"][f"model.{name}"], ema[name], rtol=0, atol=1e-6
        )
        torch.testing.assert_close(exported[name], ema[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(RecordWeights.tested[name], ema[name], rtol=0, atol=1e-6)
        # Lightning keeps the training weights next to them, for resuming
        torch.testing.assert_close(
            ckpt["current_model_state"][f"model.{name}"], final[name], rtol=0, atol=0
        )


def test_ema_weights_are_tested_after_fit_with_best_and_by_vmoe_test(tmp_path):
    """--test_weights best restores the best checkpoint, whose state_dict holds the EMA weights
    (the training weights sit in current_model_state): the test after fit, and ``vmoe test
    --ckpt_path`` on that checkpoint, must both evaluate the EMA weights."""
    RecordWeights.seen, RecordWeights.tested = [], {}
    assert (
        fit(
            tmp_path,
            "--ema.decay",
            "0.5",
            "--trainer.callbacks+=tests.train.test_options.RecordWeights",
            "--trainer.val_check_interval",
            str(STEPS),
            "--test_weights",
            "best",
        )
        == 0
    )
    best = next((tmp_path / "checkpoints").glob("best-*.ckpt"))
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    ema = {n[len("model.") :]: v for n, v in ckpt["state_dict"].items() if n.startswith("model.")}
    current = {
        n[len("model.") :]: v
        for n, v in ckpt["current_model_state"].items()
        if n.startswith("model.")
    }
    assert (
        max((ema[n] - current[n]).abs().max().item() for n in ema) > 1e-4
    )  # EMA != training weights
    for tested in ("after fit", "vmoe test"):
        if tested == "vmoe test":
            RecordWeights.tested = {}
            assert (
                main(
                    [
                        "test",
                        *quiet(
                            tmp_path,
                            "--trainer.logger",
                            "false",
                            "--trainer.limit_test_batches",
                            "1",
                            "--trainer.callbacks+=tests.train.test_options.RecordWeights",
                            "--ckpt_path",
                            str(best),
                        ),
                    ]
                )
                == 0
            )
        assert RecordWeights.tested, tested
        for name in ema:
            torch.testing.assert_close(
                RecordWeights.tested[name], ema[name], rtol=0, atol=0, msg=tested
            )


def test_ema_resume_equals_an_uninterrupted_run(tmp_path):
    """Ctrl-C at step 2, resume with --ckpt_path last: the average (state_dict) and the training
    weights (current_model_state) at step 4 equal those of a run that was never stopped."""
    opts = [
        "--ema.decay",
        "0.5",
        "--trainer.deterministic",
        "true",
        "--trainer.limit_val_batches",
        "0",
        "--data.init_args.train_transform",
        NO_AUG,
        "--last_checkpoint.every_n_train_steps",
        "2",
        "--test_after_fit",
        "false",
    ]
    assert fit(tmp_path / "straight", *opts) == 0
    kill = [
        "--trainer.callbacks+=tests.train.test_resume.KillAtStep",
        "--trainer.callbacks.step",
        "2",
    ]
    assert fit(tmp_path / "resumed", *opts, *kill) == 130
    assert fit(tmp_path / "resumed", *opts, "--ckpt_path", "last") == 0
    straight, resumed = last_state(tmp_path / "straight"), last_state(tmp_path / "resumed")
    for key in ("state_dict", "current_model_state"):
        for name, value in straight[key].items():
            torch.testing.assert_close(
                resumed[key][name], value, rtol=0, atol=1e-6, msg=f"{key} {name}"
            )
    diff = max(
        (straight["state_dict"][n] - v).abs().max().item()
        for n, v in straight["current_model_state"].items()
        if v.is_floating_point()
    )
    assert diff > 1e-4  # the average is not the training weights


def test_ema_decay_out_of_range_is_one_error_line(tmp_path, capsys):
    assert fit(tmp_path, "--ema.decay", "1.5") == 2
    assert "ema.decay=1.5 must be in (0, 1)" in capsys.readouterr().err


# --- losses from torch and timm -------------------------------------------------------------
def smoothed_one_hot(y, classes, smoothing):
    """The targets the hand-written losses used: off = s / C, on = 1 - s + s / C."""
    off = smoothing / classes
    return torch.full((y.shape[0], classes), off).scatter_(1, y.unsqueeze(1), 1.0 - smoothing + off)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_library_losses_equal_the_hand_written_ones(smoothing):
    torch.manual_seed(0)
    logits, y = 3 * torch.randn(16, 10), torch.randint(0, 10, (16,))
    soft = torch.softmax(torch.randn(16, 10), -1)  # mixup-like soft targets
    target = smoothed_one_hot(y, 10, smoothing)
    softmax, sigmoid = (
        tiny(label_smoothing=smoothing),
        tiny(loss="sigmoid", label_smoothing=smoothing),
    )
    for labels, hand in ((y, target), (soft, soft)):
        ce = torch.sum(-hand * torch.log_softmax(logits, -1), -1).mean()
        bce = F.binary_cross_entropy_with_logits(logits, hand, reduction="none").sum(-1).mean()
        torch.testing.assert_close(softmax.task_loss(logits, labels), ce, rtol=0, atol=1e-6)
        torch.testing.assert_close(sigmoid.task_loss(logits, labels), bce, rtol=0, atol=1e-6)


def test_learning_rate_monitor_logs_every_group(tmp_path):
    logger = (
        "{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: %s}}" % tmp_path
    )
    assert (
        fit(
            tmp_path,
            "--trainer.logger",
            logger,
            "--trainer.log_every_n_steps",
            "1",
            "--model.warmup_steps",
            "3",
            "--model.lr",
            "0.004",
            "--model.layer_decay",
            "0.5",
            "--trainer.limit_val_batches",
            "0",
            "--test_after_fit",
            "false",
        )
        == 0
    )
    rows = list(csv.DictReader(open(next(tmp_path.glob("lightning_logs/version_*/metrics.csv")))))
    keys = {k for row in rows for k, v in row.items() if v and k.startswith("train/lr")}
    assert "train/lr" not in keys and {"train/lr/pg1", "train/lr/pg2"} <= keys
    top = [float(r["train/lr/pg12"]) for r in rows if r.get("train/lr/pg12")]  # the head's group
    assert top == pytest.approx([0.004 * (s + 1) / 4 for s in range(3)] + [0.004])  # warmup, peak
