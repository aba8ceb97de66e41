"""Command-line overrides of ``model.moe`` (and ``model.model_kwargs``) merge into the config's:
dotted (``--model.moe.router.num_selected 1``) and nested (``--model.moe '{router: ...}'``)
forms, validated as a whole at parse time (a typo is one line naming it, exit 2); a misspelt
layer option names the closest valid ones. All of them failed on main (NestedArg refused, the
nested form replaced the placement, ``num_expert`` was told to go inside model.moe.router)."""

import re
import textwrap

import pytest
import yaml

from tests.helpers import QUICKSTART, last_stderr_line
from vmoe.cli import main
from vmoe.models.moeify import MoeifyConfig
from vmoe.moe.config import MoeLayerConfig

DENSE = textwrap.dedent("""\
    model:
      model_name: vit_tiny_patch16_224
      model_kwargs: {img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}
      moe: {last: 1, num_experts: 4, router: {name: top_k, num_selected: 2, capacity_factor: 1.5}}
    data:
      class_path: vmoe.data.DigitsDataModule
      init_args: {img_size: 16}
    trainer: {logger: false, max_steps: 1}
    """)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "dense.yaml"
    path.write_text(DENSE)
    return str(path)


def printed_model(capsys, *argv):
    assert main(["fit", *argv, "--print_config"]) == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)["model"]


def test_dotted_overrides_merge_into_the_configs_moe(config, capsys):
    moe = printed_model(
        capsys,
        "--config",
        config,
        "--model.moe.router.num_selected",
        "1",
        "--model.moe.num_experts",
        "8",
        "--model.moe.router.batch_priority",
        "true",
    )["moe"]
    got = MoeifyConfig.from_dict(moe)
    assert got.last == 1 and got.layer.num_experts == 8  # the placement stays
    router = got.layer.router
    assert (router.num_selected, router.capacity_factor, router.batch_priority) == (1, 1.5, True)


def test_the_nested_form_merges_too_and_a_placement_replaces_the_placement(config, capsys):
    moe = printed_model(
        capsys, "--config", config, "--model.moe", "{router: {num_selected: 1}, every: 2}"
    )["moe"]
    got = MoeifyConfig.from_dict(moe)
    assert (got.every, got.last) == (2, None)
    assert got.layer.num_experts == 4 and got.layer.router.num_selected == 1
    assert got.layer.router.capacity_factor == 1.5
    # null resets it
    assert printed_model(capsys, "--config", config, "--model.moe", "null")["moe"] is None


def test_another_router_drops_the_old_routers_options(config, capsys):
    moe = printed_model(
        capsys, "--config", config, "--model.moe.router", "{name: soft, num_slots: 2}"
    )["moe"]
    assert moe["router"]["name"] == "soft" and moe["router"]["num_slots"] == 2
    assert "num_selected" not in moe["router"] and moe["num_experts"] == 4


@pytest.mark.parametrize(
    "override, pattern",
    [
        (
            ["--model.moe.router.num_selcted", "1"],
            r"model\.moe\.router\.num_selcted: not an option of router 'top_k' .*"
            r"did you mean num_selected\?",
        ),
        (
            ["--model.moe.num_expert", "8"],
            r"model\.moe\.num_expert: not an option of the MoE layer nor of any router; "
            r"did you mean num_experts",
        ),
        (
            ["--model.moe", "{num_expert: 8, router: {name: top_k}}"],
            r"model\.moe\.num_expert: not an option of the MoE layer; did you mean num_experts\?",
        ),
        (["--model.moe.num_experts", "0"], r"model\.moe.*num_experts"),
        (["--model.moe.router.num_selected", "9"], r"num_selected=9 must be <= num_experts=4"),
    ],
)
def test_a_bad_override_is_one_line_at_parse_time(config, capsys, override, pattern):
    assert main(["fit", "--config", config, *override, "--print_config"]) == 2
    line = last_stderr_line(capsys)
    assert line.startswith('vmoe fit: error: Parser key "model.moe": '), line
    assert re.search(pattern, line), line


def test_a_variants_model_kwargs_moe_merges_key_by_key(tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  model_kwargs: {moe: {capacity_factor: 1.5}}\n")
    argv = ["--config", QUICKSTART, "--config", str(extra)]
    kwargs = printed_model(
        capsys,
        *argv,
        "--model.model_kwargs.moe.num_experts",
        "8",
        "--model.model_kwargs.drop_path_rate",
        "0.1",
    )["model_kwargs"]
    assert kwargs["drop_path_rate"] == 0.1 and kwargs["moe"]["num_experts"] == 8
    assert kwargs["moe"]["router"] == {"capacity_factor": 1.5}  # kept, not replaced
    assert main(["fit", *argv, "--model.model_kwargs.moe.num_expert", "8", "--print_config"]) == 2
    line = last_stderr_line(capsys)
    assert line.startswith('vmoe fit: error: Parser key "model.model_kwargs": ') and re.search(
        r"model\.model_kwargs\.moe\.num_expert: .*did you mean num_experts", line
    ), line


def test_a_misspelt_layer_option_next_to_a_router_mapping_names_the_closest():
    with pytest.raises(ValueError, match=r"^moe\.num_expert: not an option of the MoE layer; "):
        MoeLayerConfig.from_dict({"num_expert": 8, "router": {"name": "top_k"}})
    with pytest.raises(ValueError, match=r"did you mean num_experts\?"):
        MoeLayerConfig.from_dict({"num_expert": 8, "router": {"name": "top_k"}})
    # a router option there is still told where it goes
    with pytest.raises(ValueError, match=r"moe\.num_selected: give the router options inside"):
        MoeLayerConfig.from_dict({"num_selected": 1, "router": {"name": "top_k"}})
    with pytest.raises(ValueError, match=r"did you mean capacity_factor or capacity\?$"):
        MoeLayerConfig.from_dict({"router": {"name": "top_k", "capacity_facter": 2.0}})


@pytest.mark.parametrize(
    "override, pattern",
    [
        (
            ["--model.moe.router.num_selected", "1"],
            r"model\.moe\.router\.num_selected: the config sets no model\.moe to merge into .*"
            r"to change the MoE layers of vmoe_tiny_e4_k2, use "
            r"--model\.model_kwargs\.moe\.router\.num_selected 1$",
        ),
        (
            ["--model.moe.num_experts", "8"],
            r"use --model\.model_kwargs\.moe\.num_experts 8$",
        ),
        (  # a misspelt key is named first
            ["--model.moe.router.num_selectd", "1"],
            r"model\.moe\.router\.num_selectd: not an option of router 'top_k'.*"
            r"did you mean num_selected\?",
        ),
    ],
)
def test_a_partial_moe_over_a_registered_variant_names_model_kwargs(capsys, override, pattern):
    """The quickstart's model is a registered V-MoE (no model.moe to merge into): the error
    names the option that changes its MoE layers (it said "give exactly one of model.moe.every,
    model.moe.last, model.moe.blocks")."""
    assert main(["fit", "--config", QUICKSTART, *override, "--print_config"]) == 2
    line = last_stderr_line(capsys)
    message = re.sub(r"^vmoe fit: error: Parser key \"model.moe\": (.*)  \[.*$", r"\1", line)
    assert re.search(pattern, message), line
