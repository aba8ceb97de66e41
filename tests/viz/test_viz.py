"""vmoe.viz: the pictures show the recorded routing (checked against the plans and the inputs)."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from sklearn.metrics import mutual_info_score
from timm.models.vision_transformer import VisionTransformer

import vmoe.viz as V
from vmoe.moe import MoeMlp, compute_capacity
from vmoe.viz.style import expert_colors

E, K, D = 4, 2, 32


def tiny_vit(img_size=16, patch_size=4, class_token=True, reg_tokens=0, cf=0.5, seed=0, **group):
    """A small timm ViT whose blocks 1 and 3 have an MoeMlp (until vmoe.models lands)."""
    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=D,
        depth=4,
        num_heads=4,
        num_classes=10,
        class_token=class_token,
        reg_tokens=reg_tokens,
        global_pool="token" if class_token else "avg",
    )
    group = group or {"group_size_images": 2}
    for i in (1, 3):
        # the capacity path in eval mode too (dropless=False): the maps show its drops
        model.blocks[i].mlp = MoeMlp(
            D, 64, num_experts=E, num_selected=K, capacity_factor=cf, dropless=False, **group
        )
    return model.eval()


def images(n, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(n, 3, h, w, generator=g)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def record_two_forwards(model, x, split=3):
    """Record two forwards (B=split, then the rest) and capture each MoE layer's input [B,N,d]."""
    inputs = {}
    layers = V.moe_layers(model)
    handles = [
        m.register_forward_hook(lambda mod, a, o, n=n: inputs.setdefault(n, []).append(a[0]))
        for n, m in layers.items()
    ]
    with torch.no_grad(), V.record_routing(model) as record:
        model(x[:split])
        model(x[split:])
    for h in handles:
        h.remove()
    return record, {n: torch.cat(v) for n, v in inputs.items()}


def flat_plan(record, name):
    """The recorded plans' fields flattened per forward: token t of image b is row b*N + t."""
    rows = []
    for f in record.forwards[name]:
        T = f.batch_size * f.tokens_per_image
        rows.append(
            (
                f.plan.expert_index.reshape(-1, f.plan.num_selected)[:T],
                f.plan.slot.reshape(-1, f.plan.num_selected)[:T],
            )
        )
    return torch.cat([r[0] for r in rows]).numpy(), torch.cat([r[1] for r in rows]).numpy()


# --- recording ------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [{"group_size_images": 2}, {"group_size": 7}])
def test_record_views_match_the_inputs_and_the_plan(group):
    # group_size=7 tokens: groups straddle images (N=17) and the last group is padded.
    model = tiny_vit(**group)
    x = images(5)
    record, inputs = record_two_forwards(model, x)
    assert record.num_images == 5 and record.grid_size == (4, 4) and record.num_prefix_tokens == 1
    for name, layer in V.moe_layers(model).items():
        view = record.tokens(name)
        assert view.expert.shape == (5, 17, K) and view.gates.shape == (5, 17, E)
        # Independent of grouping: each token's gates are softmax(x W^T) of its own input.
        gates = (inputs[name].float() @ layer.router.weight.detach().T).softmax(-1).numpy()
        np.testing.assert_allclose(view.gates, gates, atol=1e-5)
        np.testing.assert_array_equal(view.expert[..., 0], gates.argmax(-1))
        np.testing.assert_allclose(view.priority, gates.max(-1), atol=1e-5)
        expert, slot = flat_plan(record, name)
        np.testing.assert_array_equal(view.expert.reshape(-1, K), expert)
        np.testing.assert_array_equal(view.dropped.reshape(-1, K), slot < 0)
        np.testing.assert_array_equal(record.image(4, name).expert, view.expert[4])
    assert any(record.tokens(n).dropped.any() for n in record.layer_names)  # cf 0.5 drops


def test_record_removes_its_hooks_and_checks_image_size():
    model = tiny_vit()
    with V.record_routing(model) as record:
        model(images(2))
    model(images(2))  # outside: not recorded
    assert record.num_images == 2
    with pytest.raises(ValueError, match=r"32x32 pixels but the model expects 16x16"):
        with V.record_routing(model):
            model(images(1, size=32))


# --- patch map ------------------------------------------------------------------------------
def dropped_cells(ax, patch_h, patch_w):
    """(row, col) of the patches hatched as dropped in a panel (prefix squares sit at x < 0)."""
    cells = set()
    for p in ax.patches:
        if p.get_gid() == "dropped" and p.get_x() >= 0:
            cells.add((round(p.get_y() / patch_h), round(p.get_x() / patch_w)))
    return cells


def test_patch_map_shows_the_plan_experts_and_drops():
    model = tiny_vit(cf=0.5)
    x = images(5)
    record, _ = record_two_forwards(model, x)
    N, P = 17, 1
    # Pick an image with a dropped patch so the hatch check is not vacuous.
    b = next(
        i for i in range(5) if any(record.image(i, n).dropped[P:].any() for n in record.layer_names)
    )
    fig, numbers = V.patch_map(record, b, image=x[b])
    assert numbers["expert"].shape == (2, K, 4, 4)
    colors = expert_colors(E)
    for li, name in enumerate(record.layer_names):
        expert, slot = flat_plan(record, name)
        for k in range(K):
            want = expert[b * N + P : (b + 1) * N, k].reshape(4, 4)
            want_drop = slot[b * N + P : (b + 1) * N, k].reshape(4, 4) < 0
            np.testing.assert_array_equal(numbers["expert"][li, k], want)
            np.testing.assert_array_equal(numbers["dropped"][li, k], want_drop)
            np.testing.assert_array_equal(
                numbers["prefix_expert"][li, k], expert[b * N : b * N + P, k]
            )
            # What is drawn: the colors image is the palette at those experts; hatches on drops.
            ax = fig.axes[li * K + k]
            drawn = next(im for im in ax.images if im.get_gid() == "patch_colors")
            np.testing.assert_allclose(np.asarray(drawn.get_array()), colors[want])
            assert dropped_cells(ax, 4, 4) == set(zip(*np.nonzero(want_drop)))
    assert numbers["dropped"].any()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [f"expert {e}" for e in range(E)] + ["dropped (over capacity)"]


@pytest.mark.parametrize(
    "img_size,patch_size,class_token,reg_tokens,labels",
    [
        ((16, 24), 8, True, 0, ["cls"]),  # non-square grid 2x3
        (16, 4, False, 0, []),  # no class token
        (12, 2, True, 2, ["cls", "reg1", "reg2"]),  # 6x6 grid, registers
    ],
)
def test_patch_map_any_grid_and_prefix(img_size, patch_size, class_token, reg_tokens, labels):
    model = tiny_vit(img_size, patch_size, class_token, reg_tokens)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = images(3, (h, w))
    record, _ = record_two_forwards(model, x, split=2)
    grid = (h // patch_size, w // patch_size)
    P = len(labels)
    assert (
        record.grid_size == grid
        and record.num_prefix_tokens == P
        and record.prefix_labels == labels
    )
    fig, numbers = V.patch_map(
        record, 2, image=x[2].permute(1, 2, 0).numpy()
    )  # HWC array works too
    assert numbers["expert"].shape == (2, K) + grid and numbers["prefix_expert"].shape == (2, K, P)
    N = P + grid[0] * grid[1]
    expert, _ = flat_plan(record, record.layer_names[1])
    np.testing.assert_array_equal(
        numbers["expert"][1, 0], expert[2 * N + P : 3 * N, 0].reshape(grid)
    )
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert texts == set(labels)


# --- priority map ---------------------------------------------------------------------------
def test_priority_map_reroutes_with_the_router():
    model = tiny_vit(cf=1.0)
    x = images(6)
    record, _ = record_two_forwards(model, x, split=4)
    name = record.layer_names[0]
    saved = [
        (m.router.capacity_factor, m.router.batch_priority) for m in V.moe_layers(model).values()
    ]
    # Re-routing with the layer's own settings reproduces the recorded plan exactly.
    np.testing.assert_array_equal(record.reroute(name, 1.0, False), record.tokens(name).kept)
    # Huge capacity: nothing dropped.
    assert record.reroute(name, 8.0, True).all()
    # BPR at low capacity: in every group, an expert keeps the highest-priority first choices.
    kept = record.reroute(name, 0.25, True)
    assert not kept[..., 0].all()
    for f_start, f in zip((0, 4), record.forwards[name]):
        S = f.plan.group_size
        expert0 = record.tokens(name).expert[f_start : f_start + f.batch_size, :, 0].reshape(-1)
        prio = record.tokens(name).priority[f_start : f_start + f.batch_size].reshape(-1)
        kept0 = kept[f_start : f_start + f.batch_size, :, 0].reshape(-1)
        for g in range(f.plan.num_groups):
            sl = slice(g * S, min((g + 1) * S, len(prio)))
            for e in range(E):
                sel = expert0[sl] == e
                if kept0[sl][sel].any() and (~kept0[sl][sel]).any():
                    assert (
                        prio[sl][sel][kept0[sl][sel]].min() >= prio[sl][sel][~kept0[sl][sel]].max()
                    )
    fig, numbers = V.priority_map(record, 5, image=x[5], capacity_factors=(0.25,))
    np.testing.assert_allclose(
        numbers["priority"][0], record.tokens(name).priority[5, 1:].reshape(4, 4)
    )
    np.testing.assert_array_equal(
        numbers["skipped"][("bpr", 0.25)][0], ~kept[5, 1:].any(-1).reshape(4, 4)
    )
    assert saved == [
        (m.router.capacity_factor, m.router.batch_priority) for m in V.moe_layers(model).values()
    ]


# --- expert load ----------------------------------------------------------------------------
def test_expert_load_counts_the_plan():
    model = tiny_vit(cf=0.5)
    record, _ = record_two_forwards(model, images(5))
    fig, numbers = V.expert_load(record)
    for li, name in enumerate(record.layer_names):
        expert, slot = flat_plan(record, name)  # padding already cut off
        for k in range(K):
            np.testing.assert_array_equal(
                numbers["routed"][li, k], np.bincount(expert[:, k], minlength=E)
            )
            np.testing.assert_array_equal(
                numbers["kept"][li, k], np.bincount(expert[slot[:, k] >= 0, k], minlength=E)
            )
        groups = [(f.plan.num_groups, f.plan.capacity) for f in record.forwards[name]]
        assert numbers["capacity"][li] == sum(g * c for g, c in groups)
        assert numbers["dropped_fraction"][li] == pytest.approx((slot < 0).mean())
    assert numbers["routed"].sum() == 2 * 5 * 17 * K and (numbers["dropped_fraction"] > 0).all()
    assert "dropped" in fig.axes[0].get_title()


# --- class x expert -------------------------------------------------------------------------
def test_class_expert_matrix_rows_order_and_mutual_information():
    model = tiny_vit(cf=0.5)
    record, _ = record_two_forwards(model, images(8), split=5)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 3])
    fig, numbers = V.class_expert_matrix(record, labels, class_names=["a", "b", "c", "d", "e"])
    np.testing.assert_array_equal(numbers["classes"], [0, 1, 2, 3])
    np.testing.assert_allclose(numbers["matrix"].sum(-1), 1.0)
    for li, name in enumerate(record.layer_names):
        first = record.tokens(name).expert[:, 1:, 0]  # patches only, first choice
        for c in range(4):
            np.testing.assert_array_equal(
                numbers["counts"][li, c], np.bincount(first[labels == c].ravel(), minlength=E)
            )
        token_class = np.repeat(labels, first.shape[1])
        want = mutual_info_score(token_class, first.ravel()) / math.log(2)  # nats -> bits
        assert numbers["mutual_information_bits"][li] == pytest.approx(want, rel=1e-9)
        load = numbers["counts"][li].sum(0)
        assert (np.diff(load[numbers["expert_order"][li]]) <= 0).all()
        rank = np.argsort(numbers["expert_order"][li])
        top_rank = rank[numbers["matrix"][li].argmax(-1)][numbers["class_order"][li]]
        assert (np.diff(top_rank) >= 0).all()  # classes grouped by their most used expert
        assert f"{numbers['mutual_information_bits'][li]:.3f} bits" in fig.axes[li].get_title()
    assert V.mutual_information(np.eye(4) * 5) == pytest.approx(2.0)
    assert V.mutual_information(np.ones((3, 4))) == pytest.approx(0.0)


# --- capacity sweep -------------------------------------------------------------------------
def batches(model, n=12, seed=3):
    """Labels = the no-drop predictions with every third one changed: accuracy 2/3, not 0 or 1."""
    x = images(n, seed=seed)
    layers = V.moe_layers(model)
    with V.routing_settings(layers, capacity_factor=100.0), torch.no_grad():
        pred = model(x).argmax(-1)
    y = pred.clone()
    y[::3] = (y[::3] + 1) % 10
    return [(x[i : i + 4], y[i : i + 4]) for i in range(0, n, 4)]


def test_capacity_sweep_matches_plain_evaluation_and_restores_settings():
    model = tiny_vit(cf=0.5).train()
    data = batches(model)
    layers = list(V.moe_layers(model).values())
    layers[0].router.capacity = 8  # an explicit capacity must be restored too
    before = [
        (m.router.capacity_factor, m.router.capacity, m.router.batch_priority) for m in layers
    ]
    # Plain evaluation with room for every token (cf 2 = K*S slots over E experts: C >= S).
    with V.routing_settings(V.moe_layers(model), capacity_factor=2.0), torch.no_grad():
        model.eval()
        plain = np.mean([float((model(xb).argmax(-1) == yb).float().mean()) for xb, yb in data])
        model.train()
    fig, numbers = V.capacity_sweep(model, data, capacity_factors=(0.25, 2.0))
    assert plain == pytest.approx(2 / 3)
    for mode in ("vanilla", "bpr"):
        assert numbers["accuracy"][mode][1] == pytest.approx(plain)
        assert (
            numbers["dropped_fraction"][mode][1] == 0.0 and numbers["dropped_fraction"][mode][0] > 0
        )
        S = 2 * 17
        C = min(compute_capacity(S * K, E, 2.0), S)  # the router caps C at the group size
        G = 2  # 4 images per batch / 2 per group
        per_layer = 2 * E * G * C * (D * 64 + 64 * D) + 2 * G * S * D * E
        assert numbers["moe_flops_per_image"][mode][1] == pytest.approx(2 * per_layer / 4)
    assert numbers["moe_flops_per_image"]["bpr"][0] < numbers["moe_flops_per_image"]["bpr"][1]
    assert before == [
        (m.router.capacity_factor, m.router.capacity, m.router.batch_priority) for m in layers
    ]
    assert model.training
    assert [line.get_label() for line in fig.axes[0].get_lines()][:2] == [
        "vanilla (earlier tokens first)",
        "BPR (largest gate first)",
    ]


def test_capacity_sweep_restores_settings_on_error():
    model = tiny_vit(cf=0.5)
    good = batches(model, n=4)

    class Failing:
        def __iter__(self):
            yield good[0]
            raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        V.capacity_sweep(model, Failing(), capacity_factors=(1.0,), reference=False)
    assert all(
        m.capacity_factor == 0.5 and not m.batch_priority for m in V.moe_layers(model).values()
    )


# --- bad input ------------------------------------------------------------------------------
def test_clear_errors():
    dense = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=D, depth=2, num_heads=4, num_classes=10
    )
    with pytest.raises(ValueError, match="no MoE layers"):
        with V.record_routing(dense):
            pass
    with pytest.raises(ValueError, match="no MoE layers"):
        V.capacity_sweep(dense, [(images(2), torch.zeros(2, dtype=torch.long))])
    model = tiny_vit()
    with pytest.raises(ValueError, match="32x32 pixels but the model expects 16x16"):
        V.capacity_sweep(model, [(images(2, size=32), torch.zeros(2, dtype=torch.long))])
    with pytest.raises(ValueError, match="no images"):
        V.capacity_sweep(model, [])
    with V.record_routing(model) as empty:
        pass
    for fn in (V.expert_load, V.patch_map, lambda r: V.class_expert_matrix(r, [])):
        with pytest.raises(ValueError, match="no forward pass was recorded"):
            fn(empty)
    with pytest.raises(ValueError, match="layers must name MoE layers"):
        with V.record_routing(model, layers=["blocks.0.mlp"]):
            pass
    record, _ = record_two_forwards(model, images(3), split=2)
    with pytest.raises(ValueError, match=r"image is 32x32 pixels .* covers 16x16"):
        V.patch_map(record, 0, image=images(1, size=32)[0])
    with pytest.raises(ValueError, match="image index"):
        V.patch_map(record, 3)
    with pytest.raises(ValueError, match="labels must be 3 ints"):
        V.class_expert_matrix(record, [0, 1])
    with pytest.raises(ValueError, match="capacity_factor"):
        V.priority_map(record, 0, capacity_factors=(0.0,))
    assert all(m.capacity_factor == 0.5 for m in V.moe_layers(model).values())


def test_expert_choice_layers_load_and_matrix():
    model = tiny_vit()
    model.blocks[3].mlp = MoeMlp(
        D, 64, num_experts=E, router="expert_choice", capacity_factor=1.0, group_size_images=2
    )
    record, _ = record_two_forwards(model, images(4), split=2)
    _, load = V.expert_load(record, layers=["blocks.3.mlp"])
    picked = sum(
        np.bincount(
            p.expert_index[p.kept & p.valid[..., None] if p.valid is not None else p.kept].numpy(),
            minlength=E,
        )
        for p in record.plans("blocks.3.mlp")
    )
    np.testing.assert_array_equal(load["kept"][0, 0], picked)
    assert load["dropped_fraction"][0] == 0.0
    _, m = V.class_expert_matrix(record, [0, 1, 0, 1], layers=["blocks.3.mlp"], choice=None)
    np.testing.assert_allclose(m["matrix"].sum(-1), 1.0)
    with pytest.raises(ValueError, match="expert-choice"):
        V.patch_map(record, 0, layers=["blocks.3.mlp"])
    with pytest.raises(ValueError, match="expert-choice"):
        V.class_expert_matrix(record, [0, 1, 0, 1], layers=["blocks.3.mlp"])
    with pytest.raises(ValueError, match="differ in"):
        V.expert_load(record)
