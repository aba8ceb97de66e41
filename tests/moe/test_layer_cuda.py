"""The whole MoE layer on a real GPU (skipped without one; run by ``benchmarks/gpu_check.sh``).

Routing runs without host synchronization (no ``.item()``, no data-dependent shapes), so that
the layer can be captured by CUDA graphs and the GPU never waits on the CPU. On the CPU, the
fullgraph ``torch.compile`` tests stand in for this; here it is checked directly: CUDA's sync
debug mode raises on any synchronizing call, and a captured forward+backward replays with new
inputs.
"""

import pytest
import torch

from vmoe.moe import MoeMlp

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# 4 images x 10 tokens, 3 images per group: 2 groups, the last one padded.
# dropless=False: the static-shape buffer path in eval mode too (no host sync, so CUDA graphs
# capture it; dropless inference reads its per-expert row counts on the host)
LAYER = dict(
    num_experts=8, num_selected=2, group_size_images=3, batch_priority=True, dropless=False
)


def make_layer(**extra):
    torch.manual_seed(0)
    return MoeMlp(64, 128, **LAYER, **extra).cuda()


def fwd_bwd(layer, x):
    """bf16 forward and backward; autocast's weight-cast cache off, as graph capture needs."""
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        y = layer(x)
    (y.float().square().sum() + layer.aux_loss).backward()
    return y


def test_forward_and_backward_never_synchronize_with_the_host():
    layer = make_layer().train()  # train: router noise and the load loss on
    x = torch.randn(4, 10, 64, device="cuda", requires_grad=True)
    fwd_bwd(layer, x)  # warm-up: Triton compilation and lazy initialization may synchronize
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fwd_bwd(layer, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("expert_gemm", ["bmm", "grouped_mm"])
def test_captured_forward_backward_replays_like_eager(expert_gemm):
    layer = make_layer(expert_gemm=expert_gemm).eval()  # eval: no noise, so eager can compare
    static_x = torch.randn(4, 10, 64, device="cuda", requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream before capture, as CUDA graphs need
        for _ in range(3):
            fwd_bwd(layer, static_x)
    torch.cuda.current_stream().wait_stream(side)
    layer.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = fwd_bwd(layer, static_x)

    reference = make_layer(expert_gemm=expert_gemm).eval()
    reference.load_state_dict(layer.state_dict())
    for seed in (1, 2):  # two inputs: the replay recomputes routing, not a frozen plan
        new_x = torch.randn(
            4, 10, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)
        )
        with torch.no_grad():
            static_x.copy_(new_x)
        graph.replay()
        x = new_x.clone().requires_grad_()
        reference.zero_grad(set_to_none=True)
        y = fwd_bwd(reference, x)
        torch.cuda.synchronize()
        assert torch.equal(layer.last_plan.expert_index, reference.last_plan.expert_index)
        assert torch.equal(layer.last_plan.slot, reference.last_plan.slot)
        torch.testing.assert_close(static_y, y, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(static_x.grad, x.grad, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(
            layer.experts.fc1_weight.grad, reference.experts.fc1_weight.grad, rtol=1e-2, atol=1e-2
        )


def test_grouped_mm_matches_bmm_on_the_gpu():
    bmm = make_layer().train()
    grouped = make_layer(expert_gemm="grouped_mm").train()
    grouped.load_state_dict(bmm.state_dict())
    x = torch.randn(4, 10, 64, device="cuda")
    outs = []
    for layer in (bmm, grouped):
        torch.manual_seed(3)  # same router noise
        xi = x.clone().requires_grad_()
        y = fwd_bwd(layer, xi)
        outs.append((y, xi.grad, layer.experts.fc2_weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)
