"""The experts' GEMM choice: 'bmm' (default) vs 'grouped_mm' (torch.nn.functional.grouped_mm).

grouped_mm is the grouped-GEMM path for Hopper GPUs; PyTorch also runs it on the CPU in
bfloat16, so its wiring (weights cast to bf16, biases, gradients reaching the float32
parameters, errors) is checked here against bmm. Its speed is measured on a GPU by
``benchmarks/moe_layer.py --dtype bf16`` (column ``floor_gmm/floor``; run by
``benchmarks/gpu_check.sh``).
"""

import pytest
import timm
import torch

from vmoe.models import from_pretrained, moe_layers, save_pretrained
from vmoe.moe import MoeMlp
from vmoe.moe.experts import Experts


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def run_experts(experts, x):
    x = x.detach().requires_grad_()
    with bf16_autocast():
        y = experts(x)
    y.float().square().sum().backward()
    grads = {n: p.grad.clone() for n, p in experts.named_parameters()}
    experts.zero_grad(set_to_none=True)
    return y, x.grad, grads


def test_grouped_mm_experts_match_bmm_values_and_gradients():
    torch.manual_seed(0)
    bmm = Experts(4, 32, 64, same_init=False)
    grouped = Experts(4, 32, 64, same_init=False, gemm="grouped_mm")
    grouped.load_state_dict(bmm.state_dict())
    x = torch.randn(4, 24, 32).to(torch.bfloat16)
    y_ref, gx_ref, g_ref = run_experts(bmm, x)
    y, gx, g = run_experts(grouped, x)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 24, 32)
    # Same bf16 operands, fp32 accumulation in both: equal up to bf16 rounding of the output.
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx.float(), gx_ref.float(), rtol=3e-2, atol=3e-2)
    for name in g_ref:
        assert g[name].dtype == torch.float32  # gradients reach the float32 parameters
        torch.testing.assert_close(g[name], g_ref[name], rtol=3e-2, atol=3e-2)
    # Experts differ (same_init=False): a mix-up of experts in the grouped path would show.
    swapped = y_ref.float()[[1, 0, 2, 3]]
    assert (y.float() - swapped).abs().max() > 0.1


def test_moe_mlp_with_grouped_mm_equals_bmm_layer():
    torch.manual_seed(0)
    kwargs = dict(num_experts=4, num_selected=2, group_size=16, same_init=False)
    ref = MoeMlp(32, 64, **kwargs).train()
    layer = MoeMlp(32, 64, expert_gemm="grouped_mm", **kwargs).train()
    layer.load_state_dict(ref.state_dict())
    assert "gemm='grouped_mm'" in repr(layer)
    x = torch.randn(3, 10, 32)
    outs = []
    for module in (ref, layer):
        torch.manual_seed(1)  # same router noise
        xi = x.clone().requires_grad_()
        with bf16_autocast():
            y = module(xi)
        (y.float().square().sum() + module.aux_loss).backward()
        outs.append((y, xi.grad, module.experts.fc1_weight.grad, module.router.weight.grad))
    assert torch.equal(ref.last_plan.expert_index, layer.last_plan.expert_index)
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(b.float(), a.float(), rtol=3e-2, atol=3e-2)


def test_grouped_mm_compiles_fullgraph():
    torch.manual_seed(0)
    layer = MoeMlp(
        32, 64, num_experts=4, num_selected=2, group_size=16, expert_gemm="grouped_mm"
    ).eval()
    x = torch.randn(2, 8, 32)
    with torch.no_grad(), bf16_autocast():
        expected = layer(x)
        got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=0)


def test_grouped_mm_without_bf16_is_a_clear_error():
    layer = MoeMlp(32, 64, num_experts=4, num_selected=2, group_size=16, expert_gemm="grouped_mm")
    with pytest.raises(RuntimeError, match=r"bfloat16 expert buffers, got torch.float32.*autocast"):
        layer(torch.randn(2, 8, 32))


def test_grouped_mm_rejects_unaligned_widths_and_unknown_names():
    with pytest.raises(ValueError, match=r"multiples of 8.*hidden_features.: 60"):
        Experts(4, 32, 60, gemm="grouped_mm")
    with pytest.raises(ValueError, match=r"gemm must be one of .*'cublas'"):
        Experts(4, 32, 64, gemm="cublas")
    Experts(4, 30, 60, gemm="bmm")  # bmm takes any width


def test_expert_gemm_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=10, moe=dict(expert_gemm="grouped_mm"))
    assert all(layer.experts.gemm == "grouped_mm" for layer in moe_layers(model).values())
    save_pretrained(model, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    assert all(layer.experts.gemm == "grouped_mm" for layer in moe_layers(loaded).values())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), bf16_autocast():
        assert torch.equal(model.eval()(x), loaded.eval()(x))
