"""Auxiliary-loss-free bias balancing (DeepSeek-V3): the update rule by hand, selection by the
biased scores with unbiased combine weights, demand counting, load-CV reduction of a skewed
router, gradient accumulation (plain loop and ``vmoe fit``'s module), exact resume, logging,
and the counts summed over processes."""

import copy
import math
from types import SimpleNamespace

import lightning as L
import pytest
import timm
import torch

import vmoe.models as vm
from vmoe.moe import (
    MoeLayerConfig,
    MoeMlp,
    TopKRouter,
    TopKRouterConfig,
    attach_bias_updates,
    moe_layers,
    update_expert_biases,
)
from vmoe.moe.bias_balancing import bias_update, expert_load_buffer_names
from vmoe.train import RoutingStatsLogger, VmoeClassifier


def layer(**kw):
    options = dict(
        num_experts=4,
        num_selected=2,
        group_size=8,
        noise_std=0.0,
        bias_update_rate=0.1,
        importance_weight=0.0,
        load_weight=0.0,
    )
    options.update(kw)
    return MoeMlp(16, 32, **options)


def hand_counts(plan, E):
    """Chosen assignments per expert of the valid tokens, from the plan (kept or not)."""
    valid = (
        plan.valid
        if plan.valid is not None
        else torch.ones(plan.expert_index.shape[:2], dtype=torch.bool)
    )
    counts = torch.zeros(E)
    for e in range(E):
        counts[e] = ((plan.expert_index == e) & valid.unsqueeze(-1)).sum()
    return counts


# --- the update rule -------------------------------------------------------------------------
def test_bias_update_rule_by_hand():
    # mean 3: sign(3 - load) = [-1, 1, -1, 1], already mean 0
    assert torch.equal(
        bias_update(torch.tensor([6.0, 2.0, 4.0, 0.0]), 0.1), torch.tensor([-0.1, 0.1, -0.1, 0.1])
    )
    # mean 2: sign = [-1, 1, 1, 1] * 0.1, mean 0.05 removed
    torch.testing.assert_close(
        bias_update(torch.tensor([5.0, 1.0, 1.0, 1.0]), 0.1),
        torch.tensor([-0.15, 0.05, 0.05, 0.05]),
    )
    # an expert exactly at the mean does not move (sign 0); equal loads or no tokens: nothing
    torch.testing.assert_close(
        bias_update(torch.tensor([3.0, 1.0, 2.0]), 0.3), torch.tensor([-0.3, 0.3, 0.0])
    )
    assert torch.equal(bias_update(torch.full((4,), 7.0), 0.1), torch.zeros(4))
    assert torch.equal(bias_update(torch.zeros(4), 0.1), torch.zeros(4))


def test_update_expert_biases_step_by_step_and_resets_the_counts():
    m = layer()
    router = m.router
    assert router.expert_bias.dtype == router.expert_load.dtype == torch.float32
    router.expert_load.copy_(torch.tensor([5.0, 1.0, 1.0, 1.0]))
    out = update_expert_biases(m)
    assert list(out) == ["router"] and torch.equal(
        out["router"], torch.tensor([5.0, 1.0, 1.0, 1.0])
    )
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.15, 0.05, 0.05, 0.05]))
    assert torch.equal(router.expert_load, torch.zeros(4))
    router.expert_load.copy_(torch.tensor([0.0, 4.0, 2.0, 2.0]))  # mean 2: sign [1, -1, 0, 0]
    update_expert_biases(m)
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.05, -0.05, 0.05, 0.05]))
    # no bias-balanced router: nothing to do
    assert update_expert_biases(layer(bias_update_rate=None)) == {}


# --- float32 buffers under module casts ------------------------------------------------------
CASTS = {
    "to(bfloat16)": lambda m: m.to(torch.bfloat16),
    "bfloat16()": lambda m: m.bfloat16(),
    "half()": lambda m: m.half(),
    "to(float16)": lambda m: m.to(dtype=torch.float16),
    "double()": lambda m: m.double(),
    "to(cpu, bfloat16)": lambda m: m.to("cpu", torch.bfloat16),
}


@pytest.mark.parametrize("cast", list(CASTS))
def test_bias_buffers_stay_float32_with_their_values_under_any_cast(cast):
    m = layer()
    bias = torch.tensor([0.1234567, -0.7654321, 1e-3 + 1e-7, 0.0])  # not bf16/fp16 values
    m.router.expert_bias.copy_(bias)
    m.router.expert_load.copy_(torch.tensor([257.0, 3.0, 2049.0, 1.0]))  # bf16 rounds 257
    load = m.router.expert_load.clone()
    CASTS[cast](m)
    assert m.router.weight.dtype != torch.float32  # the cast did happen
    for name in ("expert_bias", "expert_load"):
        assert getattr(m.router, name).dtype == torch.float32, name
        assert m.state_dict()[f"router.{name}"].dtype == torch.float32, name
    assert torch.equal(m.router.expert_bias, bias) and torch.equal(m.router.expert_load, load)
    m.float()
    assert torch.equal(m.router.expert_bias, bias)


def test_a_bf16_cast_layer_trains_with_bias_balancing_and_fp16_runs_forward():
    torch.manual_seed(0)
    m = layer().train().to(torch.bfloat16)
    optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
    attach_bias_updates(optimizer, m)
    biases = []
    for _step in range(3):
        x = torch.randn(2, 8, 16, dtype=torch.bfloat16)
        out = m(x)
        assert out.dtype == torch.bfloat16
        counts = hand_counts(m.last_plan, 4)
        torch.testing.assert_close(m.router.expert_load, counts)
        before = m.router.expert_bias.clone()
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        torch.testing.assert_close(m.router.expert_bias, before + bias_update(counts, 0.1))
        biases.append(m.router.expert_bias.clone())
    assert m.router.expert_bias.dtype == torch.float32 and biases[-1].abs().sum() > 0
    m.half()
    out = m(torch.randn(2, 8, 16, dtype=torch.float16))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert m.router.expert_load.dtype == torch.float32 and m.router.expert_load.sum() == 2 * 8 * 2


def test_an_upcycled_bf16_vit_trains_with_bias_balancing():
    """moeify casts the new layers to the dense model's dtype: the biases stay float32."""
    torch.manual_seed(0)
    dense = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=5)
    model = vm.upcycle(
        dense.to(torch.bfloat16), every=1, num_experts=4, num_selected=2, bias_update_rate=0.1
    ).train()
    routers = [m.router for m in moe_layers(model).values()]
    assert routers and all(r.weight.dtype == torch.bfloat16 for r in routers)
    assert all(r.expert_bias.dtype == r.expert_load.dtype == torch.float32 for r in routers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    attach_bias_updates(optimizer, model)
    for _step in range(3):
        loss = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)).float().pow(2).mean()
        loss.backward()
        assert torch.isfinite(loss)
        optimizer.step()
        optimizer.zero_grad()
    assert all(r.expert_bias.abs().sum() > 0 for r in routers)
    assert all(r.expert_bias.dtype == torch.float32 for r in routers)


# --- routing with the bias -------------------------------------------------------------------
def test_selection_uses_the_biased_scores_and_combine_weights_the_unbiased_ones():
    torch.manual_seed(0)
    for score_func in ("softmax", "sigmoid"):
        router = TopKRouter(
            16,
            4,
            num_selected=2,
            capacity_factor=4.0,
            noise_std=0.0,
            score_func=score_func,
            bias_update_rate=1e-3,
        )
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # every token picks expert 3
        x = torch.randn(2, 8, 16)
        plan, _ = router(x)
        logits = x @ router.weight.T
        exp = torch.exp(logits)
        gates = (
            torch.sigmoid(logits) if score_func == "sigmoid" else exp / exp.sum(-1, keepdim=True)
        )
        assert torch.all(plan.expert_index[..., 0] == 3)
        second = (gates[..., :3]).argmax(-1)  # the best unbiased of the others
        assert torch.equal(plan.expert_index[..., 1], second)
        torch.testing.assert_close(plan.combine_weight[..., 0], gates[..., 3])
        torch.testing.assert_close(
            plan.combine_weight[..., 1], gates.gather(-1, second.unsqueeze(-1))[..., 0]
        )
        torch.testing.assert_close(plan.gates, gates)  # the plan keeps the unbiased scores


def test_bpr_ranks_by_the_unbiased_gate_of_the_first_choice():
    """Two tokens want expert 2 as their second choice, it has one place: the token whose first
    choice has the larger unbiased gate takes it, although the bias ranks the other first."""
    router = TopKRouter(
        4,
        3,
        num_selected=2,
        capacity=1,
        capacity_multiple_of=None,
        noise_std=0.0,
        batch_priority=True,
        score_func="sigmoid",
        bias_update_rate=1e-3,
    )
    router.expert_bias.copy_(torch.tensor([0.0, 0.3, 0.0]))
    gates = torch.tensor(
        [
            [
                [0.6, 0.0, 0.35],  # first e0 (0.6), second e2 (biased 0.3 < 0.35)
                [0.1, 0.5, 0.4],
            ]
        ]
    )  # first e1 (biased 0.8, unbiased 0.5), second e2
    plan = router.route(gates)
    assert plan.expert_index.tolist() == [[[0, 2], [1, 2]]]
    assert plan.slot.tolist() == [[[0, 0], [0, -1]]]  # token 0 (0.6 > 0.5) keeps expert 2
    torch.testing.assert_close(plan.combine_weight, torch.tensor([[[0.6, 0.35], [0.5, 0.0]]]))


def test_counts_the_demand_of_valid_tokens_in_training_forwards_only():
    torch.manual_seed(0)
    m = layer(capacity_factor=0.5)  # drops assignments
    x = torch.randn(3, 5, 16)  # 15 tokens in groups of 8: one padding token
    m.train()(x)
    plan = m.last_plan
    assert plan.valid is not None and (~plan.valid).sum() == 1
    assert (~plan.kept).sum() > 1  # some were dropped: counted anyway
    torch.testing.assert_close(m.router.expert_load, hand_counts(plan, 4))
    assert m.router.expert_load.sum() == 15 * 2
    before = m.router.expert_load.clone()
    m.eval()(x)
    assert torch.equal(m.router.expert_load, before)


def test_activation_checkpointing_counts_each_token_once():
    torch.manual_seed(0)
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=10, moe=dict(bias_update_rate=1e-3))
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    tokens = 2 * (model.patch_embed.num_patches + model.num_prefix_tokens)
    for layer_ in moe_layers(model).values():
        assert layer_.router.expert_load.sum() == tokens * 2  # K=2 per token, not twice that


# --- balancing works -------------------------------------------------------------------------
def load_cv(load):
    return (load.std(unbiased=False) / load.mean()).item()


@pytest.mark.parametrize("score_func, skew", [("sigmoid", 0.5), ("softmax", 0.3)])
def test_bias_balancing_evens_out_a_skewed_router(score_func, skew):
    """A router whose weight favours expert 0 (no aux loss, no gradient): a few hundred bias
    updates bring the load CV of the chosen assignments far down. (A softmax saturated harder
    than this leaves the other experts' gates within the rate of each other, and the sign rule
    then balances them only to a CV of ~0.2.)"""
    torch.manual_seed(0)
    m = layer(
        num_selected=1, bias_update_rate=0.01, capacity_factor=4.0, score_func=score_func
    ).train()
    direction = torch.randn(16)
    with torch.no_grad():
        m.router.weight[0] += skew * direction
    data = torch.randn(300, 4, 16, 16) + direction  # 300 steps of 4 images x 16 tokens
    loads = []
    for step in range(300):
        m(data[step])
        loads.append(update_expert_biases(m)["router"])
    start, end = loads[0], torch.stack(loads[-50:]).sum(0)  # the last 50 steps' load
    assert load_cv(start) > 1.0  # nearly every token on expert 0
    assert load_cv(end) < 0.1 * load_cv(start)
    assert m.router.expert_bias[0] < m.router.expert_bias[1:].min()
    assert abs(m.router.expert_bias.sum().item()) < 1e-5  # the updates have mean 0


# --- gradient accumulation, optimizer hook, resume ---------------------------------------------
def test_two_micro_batches_and_one_update_use_the_counts_of_both():
    torch.manual_seed(0)
    m = layer().train()
    optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
    handle = attach_bias_updates(optimizer, m)
    counts = torch.zeros(4)
    for _micro in range(2):
        m(torch.randn(2, 8, 16)).pow(2).mean().backward()
        counts += hand_counts(m.last_plan, 4)
    assert torch.equal(m.router.expert_bias, torch.zeros(4))  # no update before the step
    optimizer.step()
    torch.testing.assert_close(m.router.expert_bias, bias_update(counts, 0.1))
    assert torch.equal(m.router.expert_load, torch.zeros(4))
    handle.remove()
    m(torch.randn(2, 8, 16))
    optimizer.step()
    assert m.router.expert_load.sum() > 0  # detached: no update


def train_steps(model, optimizer, batches):
    for micro_batches in batches:
        for x in micro_batches:
            (model(x).pow(2).mean() + vm.aux_loss(model)).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_a_state_dict_saved_between_micro_batches_resumes_exactly():
    def make():
        torch.manual_seed(0)
        return timm.create_model(
            "vmoe_tiny_e4_k2",
            num_classes=10,
            moe=dict(bias_update_rate=0.05, noise_std=0.0, score_func="sigmoid", renormalize=True),
        )

    torch.manual_seed(1)
    batches = [[torch.randn(2, 3, 16, 16) for _ in range(2)] for _ in range(5)]
    straight = make()
    opt = torch.optim.AdamW(straight.parameters(), lr=1e-2)
    attach_bias_updates(opt, straight)
    train_steps(straight, opt, batches)

    first = make()
    opt = torch.optim.AdamW(first.parameters(), lr=1e-2)
    attach_bias_updates(opt, first)
    train_steps(first, opt, batches[:2])
    (first(batches[2][0]).pow(2).mean() + vm.aux_loss(first)).backward()  # half of step 3
    saved = copy.deepcopy(
        {
            "model": first.state_dict(),
            "optimizer": opt.state_dict(),
            "grads": {n: p.grad.clone() for n, p in first.named_parameters()},
        }
    )
    assert any(k.endswith("router.expert_load") and v.sum() > 0 for k, v in saved["model"].items())

    resumed = make()
    resumed.load_state_dict(saved["model"])
    opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    opt.load_state_dict(saved["optimizer"])
    attach_bias_updates(opt, resumed)
    for n, p in resumed.named_parameters():
        p.grad = saved["grads"][n].clone()
    (resumed(batches[2][1]).pow(2).mean() + vm.aux_loss(resumed)).backward()
    opt.step()
    opt.zero_grad()
    train_steps(resumed, opt, batches[3:])
    ref, got = straight.state_dict(), resumed.state_dict()
    biases = [k for k in ref if k.endswith("expert_bias")]
    assert len(biases) == 2 and all(ref[k].abs().sum() > 0 for k in biases)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5, msg=k)


def test_vmoe_fit_module_updates_once_per_optimizer_step_with_accumulated_counts(tmp_path):
    torch.manual_seed(0)
    module = VmoeClassifier(
        model_name="vmoe_tiny_e4_k2",
        num_classes=10,
        schedule="constant",
        eval_capacity_factor=None,
        model_kwargs={
            "moe": {"bias_update_rate": 0.01, "load_weight": 0.0, "importance_weight": 0.0}
        },
    )
    layers = moe_layers(module.model)
    assert expert_load_buffer_names(module) == [f"model.{n}.router.expert_load" for n in layers]

    class Record(L.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.rows.append(
                {
                    n: (
                        hand_counts(m.last_plan, 4),
                        m.router.expert_load.clone(),
                        m.router.expert_bias.clone(),
                    )
                    for n, m in layers.items()
                }
            )

    record = Record()
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,)))
    trainer = L.Trainer(
        max_steps=2,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        limit_val_batches=0,
        callbacks=[record],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=4))
    assert len(record.rows) == 4 and trainer.global_step == 2
    assert module._ddp_params_and_buffers_to_ignore == expert_load_buffer_names(module)
    for name in layers:
        (c0, load0, bias0), (c1, load1, bias1), (c2, load2, bias2), (c3, load3, bias3) = (
            row[name] for row in record.rows
        )
        assert torch.equal(load0, c0) and torch.equal(bias0, torch.zeros(4))  # mid-window
        assert torch.equal(load1, torch.zeros(4))
        torch.testing.assert_close(bias1, bias_update(c0 + c1, 0.01))  # both micro-batches
        torch.testing.assert_close(bias3, bias1 + bias_update(c2 + c3, 0.01))


# --- steps that fp16's GradScaler skips ------------------------------------------------------
@pytest.mark.parametrize("optimizer_name", ["sgd", "fused_adamw"])
def test_a_step_the_grad_scaler_skips_moves_no_bias_and_keeps_the_counts(optimizer_name):
    """An inf gradient: GradScaler skips the step (SGD: step() is not called; fused AdamW:
    step() runs with found_inf set and changes nothing). No bias moves, the counts wait, and
    the next real step updates from the counts of both (today's main moved the biases on the
    skipped fused step)."""
    torch.manual_seed(0)
    m = layer().train()
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
    else:
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
        assert optimizer._step_supports_amp_scaling
    attach_bias_updates(optimizer, m)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)

    def step(poison):
        out = m(torch.randn(2, 8, 16))
        scaler.scale(out.pow(2).mean()).backward()
        if poison:
            m.router.weight.grad[0, 0] = math.inf
        counts = hand_counts(m.last_plan, 4)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        return counts

    weights = copy.deepcopy(m.state_dict())
    skipped = step(poison=True)
    assert scaler.get_scale() == 2.0**3  # the scaler did skip (and backed off)
    assert torch.equal(m.router.weight, weights["router.weight"])  # no parameter moved
    assert torch.equal(m.router.expert_bias, torch.zeros(4))
    assert torch.equal(m.router.expert_load, skipped)  # kept for the next real step
    real = step(poison=False)
    assert scaler.get_scale() == 2.0**3 and not torch.equal(
        m.router.weight, weights["router.weight"]
    )
    torch.testing.assert_close(m.router.expert_bias, bias_update(skipped + real, 0.1))
    assert torch.equal(m.router.expert_load, torch.zeros(4))


def test_vmoe_fit_module_moves_no_bias_on_a_step_the_grad_scaler_skips(tmp_path):
    """Lightning's 16-mixed path (a CPU GradScaler): on_before_optimizer_step runs before
    scaler.step skips the step; the biases must not move there (today's main: they did)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    module = VmoeClassifier(
        model_name="vmoe_tiny_e4_k2",
        num_classes=10,
        schedule="constant",
        eval_capacity_factor=None,
        model_kwargs={
            "moe": {"bias_update_rate": 0.01, "load_weight": 0.0, "importance_weight": 0.0}
        },
    )
    layers = moe_layers(module.model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)

    class PoisonFirstStepAndRecord(L.Callback):
        def __init__(self):
            self.rows = []

        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 0:  # every micro-batch of the first optimizer step
                next(iter(layers.values())).router.weight.grad[0, 0] = math.inf

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.rows.append(
                {
                    n: (
                        hand_counts(m.last_plan, 4),
                        m.router.expert_load.clone(),
                        m.router.expert_bias.clone(),
                    )
                    for n, m in layers.items()
                }
            )

    record = PoisonFirstStepAndRecord()
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,)))
    trainer = L.Trainer(
        max_epochs=1,
        accumulate_grad_batches=2,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        limit_val_batches=0,
        callbacks=[record],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=4))
    assert len(record.rows) == 4 and scaler.get_scale() == 2.0**3  # one step skipped
    for name in layers:
        (c0, _, bias0), (c1, load1, bias1), (c2, load2, bias2), (c3, load3, bias3) = (
            row[name] for row in record.rows
        )
        assert torch.equal(bias1, torch.zeros(4))  # the skipped step moved no bias
        assert torch.equal(load1, c0 + c1)  # and kept its counts
        torch.testing.assert_close(bias3, bias_update(c0 + c1 + c2 + c3, 0.01))
        assert torch.equal(load3, torch.zeros(4))


def test_routing_stats_logger_logs_the_bias_per_expert():
    torch.manual_seed(0)
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=10, moe=dict(bias_update_rate=0.5))
    model(torch.randn(2, 3, 16, 16))
    update_expert_biases(model)
    logged = []
    logger = SimpleNamespace(log_metrics=lambda values, step: logged.append((values, step)))
    trainer = SimpleNamespace(global_step=1, loggers=[logger], is_global_zero=True)
    RoutingStatsLogger(every_n_steps=1).on_train_batch_end(
        trainer, SimpleNamespace(model=model), None, None, 0
    )
    ((values, step),) = logged
    for name, m in moe_layers(model).items():
        short = name[:-4]
        got = [values[f"routing/{short}/expert_bias_{e}"] for e in range(4)]
        assert got == pytest.approx(m.router.expert_bias.tolist())
        assert any(abs(v) > 0.1 for v in got)


# --- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [0, -1e-3, math.inf, math.nan, True, "1e-3"])
def test_bad_bias_update_rate_is_refused(rate):
    with pytest.raises(ValueError, match="bias_update_rate="):
        layer(bias_update_rate=rate)


@pytest.mark.parametrize("router", ["expert_choice", "soft"])
def test_bias_and_sigmoid_only_apply_to_top_k(router):
    for option in (dict(bias_update_rate=1e-3), dict(score_func="sigmoid")):
        with pytest.raises(
            ValueError, match=f"{next(iter(option))}=.*only applies to router 'top_k'"
        ):
            MoeMlp(16, 32, num_experts=4, router=router, **option)
        # the nested form: not an option of that router
        with pytest.raises(
            ValueError, match=f"moe.router.{next(iter(option))}: not an option of router"
        ):
            MoeLayerConfig.from_dict({"router": {"name": router, **option}})


def test_typed_configs_hold_and_check_the_new_options():
    config = MoeLayerConfig(
        num_experts=4,
        router=TopKRouterConfig(score_func="sigmoid", bias_update_rate=1e-3),
        shared_experts=1,
        shared_gate=True,
    )
    layer_ = MoeMlp(16, 32, config=config)
    assert (
        layer_.config == config.replace(group_size_images=8)
        and layer_.router.expert_bias is not None
        and layer_.shared.gate is not None
    )
    nested = config.to_dict()
    assert (
        nested["router"]["score_func"] == "sigmoid" and nested["router"]["bias_update_rate"] == 1e-3
    )
    assert nested["shared_experts"] == 1 and nested["shared_gate"] is True
    assert MoeLayerConfig.from_dict(nested) == config
    flat = dict(
        num_experts=4,
        score_func="sigmoid",
        bias_update_rate=1e-3,
        shared_experts=1,
        shared_gate=True,
    )
    assert MoeLayerConfig.from_dict(flat) == config
    with pytest.raises(ValueError, match="bias_update_rate=0 must be None"):
        TopKRouterConfig(bias_update_rate=0)
    with pytest.raises(ValueError, match="moe.router.score_func='tanh' must be one of"):
        MoeLayerConfig.from_dict({"router": {"name": "top_k", "score_func": "tanh"}})
    with pytest.raises(ValueError, match="moe.shared_hidden_features=8 needs shared_experts >= 1"):
        MoeLayerConfig.from_dict({"shared_hidden_features": 8})
    # evaluation settings keep the new options
    layer_.capacity_factor = 4.0
    assert (
        layer_.config.router.score_func == "sigmoid"
        and layer_.config.router.bias_update_rate == 1e-3
    )


# (the counts summed over processes, under expert parallelism + DDP: tests/moe/test_parallel.py,
# check_bias_balancing_over_ranks)
