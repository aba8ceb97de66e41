"""YAML ``model.moe`` is typed (``MoeifyConfig``): a misspelt or mistyped router option is one
line naming the key when the config is parsed, before any data or model is built; the nested
and the flat forms both parse, and --print_config writes the nested form."""

import re
import textwrap

import pytest
import yaml

import vmoe.train.module as module
from tests.helpers import last_stderr_line
from vmoe.cli import main
from vmoe.models import moe_layers
from vmoe.models.moeify import MoeifyConfig
from vmoe.moe.config import MoeLayerConfig, TopKRouterConfig
from vmoe.train import VmoeClassifier

DENSE = textwrap.dedent("""\
    model:
      model_name: vit_tiny_patch16_224
      model_kwargs: {img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}
    data:
      class_path: vmoe.data.DigitsDataModule
      init_args: {img_size: 16}
    trainer: {logger: false, max_steps: 1}
    """)


def write_config(tmp_path, moe_yaml: str):
    path = tmp_path / "x.yaml"
    path.write_text(DENSE.replace("model:\n", "model:\n" + textwrap.indent(moe_yaml, "  "), 1))
    return str(path)


@pytest.fixture
def nothing_built(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(module, "build_model", refuse)
    monkeypatch.setattr("vmoe.data.DigitsDataModule.setup", refuse)


@pytest.mark.parametrize(
    "moe_yaml, pattern",
    [
        (
            "moe: {last: 1, num_experts: 4, router: {name: top_k, num_selcted: 1}}\n",
            r"model\.moe\.router\.num_selcted: not an option of router \'top_k\' "
            r"\(its options: num_selected, ",
        ),
        (
            "moe: {last: 1, num_experts: 4, num_selcted: 1}\n",  # flat form
            r"model\.moe\.num_selcted: not an option of the MoE layer nor of router 'top_k'",
        ),
        (
            "moe: {last: 1, num_experts: 4, router: {name: top_k, capacity_factor: many}}\n",
            r"model\.moe\.router\.capacity_factor='many' must be a finite number > 0",
        ),
        (
            "moe: {last: 1, num_experts: 4, router: {name: top_q}}\n",
            r"model\.moe\.router\.name='top_q': unknown router "
            r"\(routers: top_k, expert_choice, soft\)",
        ),
        (
            "moe: {num_experts: 4}\n",
            r"model\.moe: give exactly one of model\.moe\.every, model\.moe\.last",
        ),
    ],
)
def test_a_bad_moe_option_is_one_line_at_parse_time(
    tmp_path, capsys, nothing_built, moe_yaml, pattern
):
    assert main(["fit", "--config", write_config(tmp_path, moe_yaml)]) == 2
    line = last_stderr_line(capsys)
    assert line.startswith('vmoe fit: error: Parser key "model.moe": '), line
    assert re.search(pattern, line), line
    assert "Union" not in line and "Given value" not in line


def test_print_config_writes_the_nested_form(tmp_path, capsys):
    flat = "moe: {last: 1, num_experts: 4, num_selected: 1, capacity_factor: 2.0}\n"
    assert main(["fit", "--config", write_config(tmp_path, flat), "--print_config"]) == 0
    moe = yaml.safe_load(capsys.readouterr().out)["model"]["moe"]
    assert moe["last"] == 1 and moe["num_experts"] == 4
    assert moe["router"] == TopKRouterConfig(num_selected=1, capacity_factor=2.0).to_dict()
    # what it writes parses back to the same config
    assert MoeifyConfig.from_dict(moe) == MoeifyConfig.from_dict(yaml.safe_load(flat)["moe"])


@pytest.mark.parametrize(
    "moe",
    [
        {
            "last": 1,
            "num_experts": 4,
            "router": {"name": "top_k", "num_selected": 1, "capacity_factor": 2.0},
        },
        {"last": 1, "num_experts": 4, "num_selected": 1, "capacity_factor": 2.0},
    ],
)
def test_nested_and_flat_model_moe_build_the_same_model(moe):
    model = VmoeClassifier(
        model_name="vit_tiny_patch16_224",
        num_classes=3,
        moe=moe,
        model_kwargs=dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2),
    )
    (layer,) = moe_layers(model.model).values()
    assert layer.config.router.num_selected == 1 and layer.config.router.capacity_factor == 2.0
    # the hyper-parameters hold the nested form, plain values (checkpoints load weights_only)
    assert model.hparams.moe == MoeifyConfig.from_dict(moe).to_dict()
    assert isinstance(model.hparams.moe["router"], dict)


@pytest.mark.parametrize(
    "moe, key",
    [
        ({"num_selcted": 1}, "model.model_kwargs.moe.num_selcted"),
        (
            {"router": {"name": "top_k", "capacity_factor": 0}},
            "model.model_kwargs.moe.router.capacity_factor",
        ),
        ({"num_slots": 2, "num_selected": 1}, "model.model_kwargs.moe"),  # fits no router
        ({"every": "2"}, "model.model_kwargs.moe.every"),
    ],
)
def test_a_bad_model_kwargs_moe_option_is_named_before_the_model_is_built(monkeypatch, moe, key):
    monkeypatch.setattr(module, "build_model", lambda **kw: pytest.fail("built"))
    with pytest.raises(ValueError, match=re.escape(key)):
        VmoeClassifier(model_name="vmoe_tiny_e4_k2", model_kwargs={"moe": moe})


def test_model_kwargs_moe_in_both_forms_reaches_the_variant():
    for moe in (
        {"num_experts": 8, "capacity_factor": 1.5},
        {"num_experts": 8, "router": {"capacity_factor": 1.5}},
    ):
        model = VmoeClassifier(
            model_name="vmoe_tiny_e4_k2", num_classes=3, model_kwargs={"moe": moe}
        )
        configs = {m.config for m in moe_layers(model.model).values()}
        assert configs == {
            MoeLayerConfig(
                num_experts=8, group_size_images=8, router=TopKRouterConfig(capacity_factor=1.5)
            )
        }


def test_a_soft_variant_takes_soft_options_without_naming_the_router():
    model = VmoeClassifier(
        model_name="soft_moe_tiny_e8", num_classes=3, model_kwargs={"moe": {"num_slots": 2}}
    )
    assert {m.num_slots for m in moe_layers(model.model).values()} == {2}


def test_resuming_compares_flat_and_nested_moe_as_equal():
    flat = {"last": 2, "num_experts": 8, "num_selected": 2}
    nested = MoeifyConfig.from_dict(flat).to_dict()
    assert (
        module._differences(
            "moe", module._comparable("moe", flat), module._comparable("moe", nested)
        )
        == []
    )
    changed = module._differences(
        "moe",
        module._comparable("moe", flat),
        module._comparable("moe", {**flat, "num_experts": 4}),
    )
    assert changed == ["moe.num_experts: checkpoint 8, now 4"]
