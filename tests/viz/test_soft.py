"""Soft MoE pictures: the numbers drawn equal direct computations from the recorded plans, the
sparse-only pictures refuse a Soft MoE layer by name, the report and the training callback
work on a Soft MoE model."""

import base64
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch

import vmoe.models as vm
import vmoe.viz as V
from vmoe.moe import SOFT_TRAIN_STATS
from vmoe.train import RoutingStatsLogger

NUM_CLASSES = 4
LAYERS = ["blocks.1.mlp", "blocks.3.mlp"]


def soft_model(num_slots=2, num_classes=NUM_CLASSES):
    """A tiny ViT for 16x16 images (16 patches + cls) with two Soft MoE layers, E=4, P=2."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=4,
        num_heads=2,
        mlp_ratio=2.0,
        num_classes=num_classes,
    )
    vm.moeify(model, every=2, router="soft", num_experts=4, num_slots=num_slots)
    # A sharper router than the init's, so the maps are not all alike.
    for layer in vm.moe_layers(model).values():
        layer.router.scale.data.fill_(4.0)
    return model.eval()


def batches(sizes=(6, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g))
        for n in sizes
    ]


@pytest.fixture(scope="module")
def recorded():
    """Two forwards recorded, and each layer's plans kept straight from the layers."""
    model, data = soft_model(), batches()
    plans = {n: [] for n in LAYERS}
    with torch.no_grad(), V.record_routing(model) as record:
        for x, _ in data:
            model(x)
            for n, layer in vm.moe_layers(model).items():
                plans[n].append(layer.last_plan)
    labels = torch.cat([y for _, y in data]).numpy()
    images = torch.cat([x for x, _ in data])
    return dict(model=model, data=data, record=record, plans=plans, labels=labels, images=images)


def _per_image(plans, field):
    """[B, N, E, P] over the forwards: with one image per routing group, group g = image g."""
    return torch.cat([getattr(p, field) for p in plans]).numpy()


def test_layers_are_soft_with_one_image_per_group(recorded):
    record = recorded["record"]
    assert record.layer_names == LAYERS and all(record.is_soft(n) for n in LAYERS)
    assert not any(record.is_top_k(n) for n in LAYERS)
    plan = recorded["plans"][LAYERS[0]][0]
    assert (plan.num_groups, plan.group_size, plan.num_experts, plan.slots_per_expert) == (
        6,
        17,
        4,
        2,
    )


def test_dispatch_map_draws_the_plans_dispatch_weights(recorded, tmp_path):
    record, plans = recorded["record"], recorded["plans"]
    fig, numbers = V.dispatch_map(record, index=7, image=recorded["images"][7])
    assert numbers["layers"] == LAYERS and list(numbers["slots"]) == list(range(8))
    assert numbers["dispatch"].shape == (2, 8, 4, 4) and numbers["prefix_dispatch"].shape == (
        2,
        8,
        1,
    )
    for i, name in enumerate(LAYERS):
        d = _per_image(plans[name], "dispatch_weight")[7].reshape(17, 8)  # [N, E*P]
        np.testing.assert_array_equal(numbers["dispatch"][i], d[1:].T.reshape(8, 4, 4))
        np.testing.assert_array_equal(numbers["prefix_dispatch"][i], d[:1].T)
        # one image per group: every slot's weights over the image sum to 1
        np.testing.assert_allclose(
            numbers["dispatch"][i].sum((1, 2)) + numbers["prefix_dispatch"][i][:, 0], 1.0, atol=1e-5
        )
    fig.savefig(tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 5000
    _, some = V.dispatch_map(record, index=0, layers=[LAYERS[1]], slots=[5, 2])
    d = _per_image(plans[LAYERS[1]], "dispatch_weight")[0].reshape(17, 8)
    np.testing.assert_array_equal(some["dispatch"][0], d[1:, [5, 2]].T.reshape(2, 4, 4))
    with pytest.raises(ValueError, match=r"slots must be .* in \[0, 8\)"):
        V.dispatch_map(record, slots=[8])


def test_combine_entropy_map_is_the_entropy_of_the_plans_combine_weights(recorded, tmp_path):
    record, plans = recorded["record"], recorded["plans"]
    fig, numbers = V.combine_entropy_map(record, index=3, image=recorded["images"][3])
    for i, name in enumerate(LAYERS):
        c = _per_image(plans[name], "combine_weight")[3].reshape(17, 8).astype(np.float64)
        entropy = -(c * np.log(c)).sum(-1)
        np.testing.assert_allclose(numbers["entropy"][i], entropy[1:].reshape(4, 4), atol=1e-5)
        np.testing.assert_allclose(numbers["prefix_entropy"][i], entropy[:1], atol=1e-5)
    np.testing.assert_allclose(numbers["max_entropy"], np.log(8))
    assert 0 < numbers["entropy"].min() and numbers["entropy"].max() < np.log(8)
    fig.savefig(tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 5000


def test_slot_similarity_is_the_cosine_of_dispatch_vectors_over_every_group(recorded, tmp_path):
    record, plans = recorded["record"], recorded["plans"]
    fig, numbers = V.slot_similarity(record)
    for i, name in enumerate(LAYERS):
        d = _per_image(plans[name], "dispatch_weight").reshape(11, 17, 8).astype(np.float64)
        unit = d / np.linalg.norm(d, axis=1, keepdims=True)
        cos = np.einsum("gna,gnb->gab", unit, unit).mean(0)  # 11 groups
        np.testing.assert_allclose(numbers["similarity"][i], cos, atol=1e-5)
        np.testing.assert_allclose(
            numbers["expert_similarity"][i], cos.reshape(4, 2, 4, 2).mean((1, 3)), atol=1e-5
        )
        assert numbers["mean_off_diagonal"][i] == pytest.approx(
            cos[~np.eye(8, dtype=bool)].mean(), abs=1e-5
        )
    fig.savefig(tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 5000


def test_class_expert_matrix_counts_the_combine_weights(recorded):
    record, plans, labels = recorded["record"], recorded["plans"], recorded["labels"]
    _, numbers = V.class_expert_matrix(record, labels)
    classes = np.unique(labels)
    for i, name in enumerate(LAYERS):
        c = (
            _per_image(plans[name], "combine_weight")[:, 1:].sum(-1).astype(np.float64)
        )  # [B, 16, E]
        want = np.stack([c[labels == k].sum((0, 1)) for k in classes])
        np.testing.assert_allclose(numbers["counts"][i], want, rtol=1e-5)
        # each class's row holds one unit per patch of its images
        np.testing.assert_allclose(
            numbers["counts"][i].sum(-1), [16 * (labels == k).sum() for k in classes], rtol=1e-5
        )
        np.testing.assert_allclose(numbers["matrix"][i].sum(-1), 1.0)


@pytest.mark.parametrize(
    "draw",
    [
        lambda r, m: V.patch_map(r),
        lambda r, m: V.priority_map(r),
        lambda r, m: V.expert_load(r),
        lambda r, m: r.tokens(LAYERS[0]),
        lambda r, m: r.reroute(LAYERS[1], 1.0, True),
        lambda r, m: V.capacity_sweep(m, batches((2,))),
        lambda r, m: V.evaluate(m, batches((2,))),
        lambda r, m: V.expert_load_counts(m.blocks[1].mlp.last_plan, m.blocks[1].mlp.router),
    ],
    ids=[
        "patch_map",
        "priority_map",
        "expert_load",
        "tokens",
        "reroute",
        "capacity_sweep",
        "evaluate",
        "expert_load_counts",
    ],
)
def test_sparse_only_pictures_say_the_layer_is_soft(recorded, draw):
    with pytest.raises(
        ValueError, match=r"(blocks\.[13]\.mlp'? is a Soft MoE layer|Soft MoE plan)"
    ):
        draw(recorded["record"], recorded["model"])


def test_soft_pictures_refuse_sparse_layers():
    model = timm.create_model("vmoe_tiny_e4_k2", num_classes=NUM_CLASSES).eval()
    with torch.no_grad(), V.record_routing(model) as record:
        model(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="no Soft MoE layer"):
        V.dispatch_map(record)
    with pytest.raises(ValueError, match="'blocks.1.mlp' is a sparse MoE layer"):
        V.combine_entropy_map(record, layers=["blocks.1.mlp"])
    with pytest.raises(ValueError, match="not a Soft MoE layer"):
        record.soft_tokens("blocks.1.mlp")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    model, data = soft_model(), batches((8, 8))
    out = tmp_path_factory.mktemp("soft_report")
    written = V.write_routing_report(
        model, data, out, num_examples=2, capacity_factors=(0.5, 1.0), progress=False
    )
    return dict(model=model, data=data, out=out, report=written)


def test_report_has_the_soft_pictures_and_notes_the_sparse_ones(report):
    out, rep = report["out"], report["report"]
    pngs = [f for f in rep["files"] if f.endswith(".png")]
    assert sorted(pngs) == sorted(p.name for p in out.glob("*.png"))
    assert set(pngs) == {
        "dispatch_map_0.png",
        "dispatch_map_1.png",
        "combine_entropy.png",
        "slot_similarity.png",
        "class_expert.png",
    }
    assert all((out / f).stat().st_size > 5000 for f in pngs)
    assert not {"examples", "priority_map", "expert_load", "capacity_sweep"} & set(rep)
    page = (out / "index.html").read_text()
    for name in pngs:
        assert base64.b64encode((out / name).read_bytes()).decode() in page
    assert page.count("<figcaption>") == len(pngs)
    assert "Capacity sweep omitted" in page and "drop no token" in page
    assert "Soft MoE: which patches each slot mixes" in page
    assert page.count("<td>none (Soft MoE)</td>") == 2  # the layer table: no dropped assignments
    assert json.loads((out / "report.json").read_text()) == rep
    assert rep["class_expert"]["weighting"] == "combine"


def test_report_numbers_equal_the_library_functions(report):
    model, data, rep = report["model"], report["data"], report["report"]
    with torch.no_grad(), V.record_routing(model) as record:
        for x, _ in data:
            model(x)
    soft = rep["soft"]
    first = soft["dispatch_maps"][0]
    _, numbers = V.dispatch_map(record, index=first["index"])
    np.testing.assert_allclose(first["dispatch"], numbers["dispatch"], atol=1e-7)
    _, sim = V.slot_similarity(record)
    _, ent = V.combine_entropy_map(record, index=soft["combine_entropy"]["index"])
    np.testing.assert_allclose(soft["combine_entropy"]["entropy"], ent["entropy"], atol=1e-6)
    for i, name in enumerate(LAYERS):
        got = soft["layers"][name]
        np.testing.assert_allclose(got["slot_similarity"], sim["similarity"][i], atol=1e-6)
        c = torch.cat([p.combine_weight for p in record.plans(name)]).double()
        np.testing.assert_allclose(
            got["importance"], (c.sum((0, 1, 3)) / c.sum()).numpy(), atol=1e-6
        )
        entropy = -(c.flatten(2) * c.flatten(2).log()).sum(-1).mean()
        assert got["combine_entropy"] == pytest.approx(float(entropy), abs=1e-5)
        assert (got["num_experts"], got["slots_per_expert"], got["group_size"]) == (4, 2, 17)


def test_cli_routing_report_and_capacity_sweep_on_a_saved_soft_model(tmp_path, capsys):
    from vmoe.cli import main

    vm.save_pretrained(soft_model(num_classes=10), tmp_path / "model")
    args = [
        "--model",
        str(tmp_path / "model"),
        "--data",
        "digits",
        "--max-images",
        "24",
        "--batch-size",
        "12",
        "--no-progress",
    ]
    assert (
        main(["routing-report", *args, "--out", str(tmp_path / "report"), "--examples", "1"]) == 0
    )
    rep = json.loads((tmp_path / "report" / "report.json").read_text())
    assert "soft" in rep and "capacity_sweep" not in rep and rep["data"]["num_images"] == 24
    assert (tmp_path / "report" / "dispatch_map_0.png").stat().st_size > 5000
    assert main(["capacity-sweep", *args, "--out", str(tmp_path / "sweep")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"layer 'blocks\.1\.mlp' is a Soft MoE layer: the capacity sweep", err)


def test_routing_stats_logger_on_a_soft_model(tmp_path):
    model = soft_model()
    logged = []
    logger = SimpleNamespace(log_metrics=lambda values, step: logged.append(values))
    pl_module = SimpleNamespace(
        model=model,
        device=torch.device("cpu"),
        log=lambda name, value, **k: logged.append({name: value}),
    )
    trainer = SimpleNamespace(
        loggers=[logger],
        log_dir=str(tmp_path),
        default_root_dir=str(tmp_path),
        global_step=1,
        sanity_checking=False,
        is_global_zero=True,
        current_epoch=0,
        max_epochs=1,
    )
    cb = RoutingStatsLogger(every_n_steps=1)
    x = torch.randn(4, 3, 16, 16)
    model(x)
    cb.on_train_batch_end(trainer, pl_module, None, (x, torch.zeros(4)), 0)
    values = logged.pop()
    want = vm.routing_stats(model)
    assert set(values) == {f"routing/{n[:-4]}/{k}" for n in LAYERS for k in SOFT_TRAIN_STATS}
    for n in LAYERS:
        assert values[f"routing/{n[:-4]}/combine_entropy"] == pytest.approx(
            float(want[n]["combine_entropy"])
        )
    assert all(np.isfinite(v) for v in values.values())
    cb.on_validation_epoch_start(trainer, pl_module)
    cb.on_validation_batch_end(trainer, pl_module, None, (x, torch.zeros(4)), 0)
    assert not logged  # no dropped fraction to log for Soft MoE layers
    cb.on_validation_epoch_end(trainer, pl_module)
    assert (
        set(cb.last_figures) == {"routing_map"}
        and cb.last_figures["routing_map"].stat().st_size > 5000
    )
