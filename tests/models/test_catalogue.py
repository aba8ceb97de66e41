"""The catalogue of Google's released checkpoints (``vmoe.models.catalogue``): every README
entry, consistent with the registered model it names, listed by timm and in the docs; and
fetch + convert on first use through timm's pretrained machinery, against the loopback bucket
(``tests/checkpoints/bucket_server.py``) serving the tiny official checkpoint, registered as
``vmoe_vit.test_tiny_a``."""

import re

import numpy as np
import pytest
import timm
import torch

import vmoe.models as vm
from tests.checkpoints.bucket_server import BucketServer
from tests.helpers import ROOT, VMOE_REFERENCE, last_stderr_line
from vmoe.checkpoints.download import DownloadError
from vmoe.cli import main
from vmoe.models import catalogue as cat
from vmoe.models.variants import VARIANTS

# The prefixes listed under "Checkpoints" in google-research/vmoe's README.md (the snapshot
# read when the catalogue was written), in its order.
README_CHECKPOINTS = [
    "vmoe_s32_last2_ilsvrc2012_randaug_light1",
    "vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012",
    "vmoe_s32_last2_ilsvrc2012_randaug_medium",
    "vmoe_b16_imagenet21k_randaug_strong",
    "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012",
    "eee_s32_last2_ilsvrc2012",
    "eee_s32_last2_ilsvrc2012_ft_cifar100",
]

TINY = cat.OfficialCheckpoint(
    name="vmoe_tiny_a",
    model="vmoe_vit",
    tag="test_tiny_a",
    summary="the tiny checkpoint saved by the official JAX code (tests/fixtures)",
    pretraining="none (random initialization)",
    img_size=16,
    num_classes=10,
    representation_size=None,
    # the fixture's logits were recorded at capacity factor 4.0, 2 images per group
    moe=dict(
        blocks=[1, 3],
        num_experts=4,
        num_selected=2,
        capacity_factor=4.0,
        group_size_images=2,
        batch_priority=False,
    ),
    eval_capacity_factor=4.0,
    crop_pct=1.0,
    model_args=dict(
        patch_size=4,
        embed_dim=32,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        class_token=True,
        global_pool="token",
        fc_norm=False,
        act_layer="gelu_tanh",
    ),
)
TAG = TINY.timm_name
FILES = ["vmoe_tiny_a.index", "vmoe_tiny_a.data-00000-of-00001"]


def official_logits():
    official = np.load(VMOE_REFERENCE / "model_a_outputs.npz")
    images = torch.from_numpy(official["images"]).permute(0, 3, 1, 2)
    return images, torch.from_numpy(official["cf4.0/logits"])


def logits_of(model):
    images, expected = official_logits()
    with torch.no_grad():
        return model.eval()(images), expected


@pytest.fixture
def tiny_entry():
    cat.register_official_checkpoint(TINY)
    yield TINY
    cat.unregister_official_checkpoint(TINY.name)


@pytest.fixture
def bucket(tmp_path, monkeypatch, tiny_entry):
    """The tiny checkpoint on a loopback server; the cache in tmp_path/cache."""
    srv = BucketServer.serving(VMOE_REFERENCE / "vmoe_tiny_a").start()
    monkeypatch.setenv("VMOE_CHECKPOINT_BASE_URL", srv.base_url)
    monkeypatch.setenv("VMOE_CACHE_DIR", str(tmp_path / "cache"))
    yield srv
    srv.stop()


# ----------------------------------------------------------------------------- the catalogue


def test_the_catalogue_is_the_readme_list():
    assert [n for n in cat.CATALOGUE if n != TINY.name] == README_CHECKPOINTS
    for entry in cat.CATALOGUE.values():
        assert entry.url() == f"https://storage.googleapis.com/vmoe_checkpoints/{entry.name}.index"


@pytest.mark.parametrize("name", README_CHECKPOINTS)
def test_each_entry_builds_the_registered_model_its_options_say(name):
    entry = cat.CATALOGUE[name]
    if entry.unsupported:  # E^3: listed, with the reason, not registered
        assert not entry.timm_name and "E^3" in entry.unsupported
        with pytest.raises(ValueError, match=f"{name}: not supported: E\\^3"):
            cat.official_checkpoint(name)
        return
    assert entry.timm_name in timm.list_pretrained("vmoe*")
    assert cat.official_checkpoint(entry.timm_name) is cat.official_checkpoint(name) is entry
    size = re.match(r"vmoe_(\w\d+)_", name).group(1)
    readme = cat.CATALOGUE[entry.fine_tuned_from or name].summary  # the README's words
    placement = {"on every odd block": "every2", "on the last two odd blocks": "last2"}[
        re.search(r"on (every odd block|the last two odd blocks)", readme).group(0)
    ]
    assert readme.startswith(f"V-MoE {size[0].upper()}/{size[1:]}, 8 experts")
    match = re.fullmatch(rf"vmoe_{size}_e(\d+)_k(\d+)_{placement}", entry.model)
    assert match, (entry.model, name)  # the model name says the checkpoint's size/placement
    experts, k = map(int, match.groups())
    with torch.device("meta"):
        model = timm.create_model(entry.timm_name)
    patch, hidden, depth, mlp, heads = VARIANTS[size]
    assert (model.embed_dim, len(model.blocks), model.patch_embed.patch_size[0]) == (
        hidden,
        depth,
        patch,
    )
    assert model.blocks[0].attn.num_heads == heads
    assert model.blocks[0].mlp.fc1.out_features == mlp  # block 0 is dense in both placements
    layers = vm.moe_layers(model)
    odd = list(range(1, depth, 2))
    assert list(layers) == [f"blocks.{i}.mlp" for i in (odd if placement == "every2" else odd[-2:])]
    for layer in layers.values():
        assert layer.num_experts == experts == 8
        assert layer.router.num_selected == k == entry.moe["num_selected"]
        assert layer.router.capacity_factor == entry.moe["capacity_factor"]
        assert layer.router.batch_priority is entry.moe["batch_priority"] is False
        assert layer.group_size_images == entry.moe["group_size_images"] == 8
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, entry.img_size, entry.img_size)
    assert model.patch_embed.img_size == (entry.img_size, entry.img_size)
    assert model.num_classes == cfg["num_classes"] == entry.num_classes
    assert isinstance(model.pre_logits, torch.nn.Identity) == (entry.representation_size is None)
    assert cfg["crop_pct"] == (1.0 if entry.img_size == 384 else 0.875)
    assert entry.eval_capacity_factor >= entry.moe["capacity_factor"]
    assert all(0 < top1 < 100 for _, top1 in entry.accuracy)
    if entry.fine_tuned_from:
        assert cat.CATALOGUE[entry.fine_tuned_from].model == entry.model
        assert entry.img_size == 384 and entry.representation_size is None
    assert entry.config == "" or entry.config.startswith("vmoe/configs/")


def test_untagged_names_stay_the_papers_models():
    model = timm.create_model("vmoe_b16_e8_k2_every2")
    assert model.pretrained_cfg.get("tag") is None and model.num_classes == 1000
    assert model.patch_embed.img_size == (224, 224) and model.pre_logits is not None
    assert not isinstance(model.pre_logits, torch.nn.Identity)
    assert "vmoe_b16_e8_k2_every2" not in timm.list_pretrained("vmoe*")


def test_the_docs_table_is_the_catalogue():
    page = (ROOT / "docs" / "guides" / "official-checkpoints.md").read_text()
    assert cat.catalogue_markdown() in page


def test_vmoe_list_pretrained(capsys, bucket):
    assert main(["list-pretrained"]) == 0
    out = capsys.readouterr().out
    for entry in cat.CATALOGUE.values():
        assert (entry.timm_name or entry.name) in out
    assert "not supported" in out and f"cache: {cat.cache_dir()}" in out


# ------------------------------------------------------------------ fetch + convert on first use


def test_first_use_downloads_and_converts_second_use_is_offline(bucket, tmp_path):
    model = timm.create_model(TAG, pretrained=True)
    logits, expected = logits_of(model)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)  # the official model
    assert [n for n, _ in bucket.requests] == FILES
    cache = tmp_path / "cache"
    assert sorted(p.name for p in (cache / "vmoe_tiny_a").iterdir()) == [
        "config.json",
        "model.safetensors",
        "vmoe_source.json",
    ]
    assert not (cache / "downloads" / "vmoe_tiny_a").exists()  # the official files are removed
    bucket.stop()  # offline from here
    again, _ = logits_of(timm.create_model(TAG, pretrained=True))
    assert torch.equal(again, logits)
    loaded, _ = logits_of(vm.from_pretrained(TAG))  # the cache is a save_pretrained directory
    assert torch.equal(loaded, logits)
    assert len(bucket.requests) == 2


def test_fine_tuning_options_through_timm(bucket):
    model = timm.create_model(TAG, pretrained=True, num_classes=3, img_size=32)
    assert model.head.out_features == 3 and model.pos_embed.shape == (1, 65, 32)
    reference = timm.create_model(TAG, pretrained=True)
    torch.testing.assert_close(
        model.blocks[1].mlp.router.weight, reference.blocks[1].mlp.router.weight
    )


def test_files_fetched_by_hand_keep_working(tmp_path, monkeypatch, tiny_entry):
    monkeypatch.setenv("VMOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VMOE_CHECKPOINT_BASE_URL", "http://127.0.0.1:9/nothing-here")
    index = str(VMOE_REFERENCE / "vmoe_tiny_a.index")  # the official files, fetched by hand
    by_hand = timm.create_model(TAG, pretrained=True, pretrained_cfg_overlay=dict(file=index))
    logits, expected = logits_of(by_hand)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    converted = tmp_path / "converted"
    assert main(["convert", index.removesuffix(".index"), "--out", str(converted)]) == 0
    weights = str(converted / "model.safetensors")
    from_file = timm.create_model(TAG, pretrained=True, pretrained_cfg_overlay=dict(file=weights))
    assert torch.equal(logits_of(from_file)[0], logits)
    local = timm.create_model(f"local-dir:{tmp_path / 'cache' / 'vmoe_tiny_a'}", pretrained=True)
    assert torch.equal(logits_of(local)[0], logits)


def test_a_corrupted_download_is_never_converted(bucket, tmp_path):
    bucket.corrupt[FILES[1]] = (100_000, 2)
    with pytest.raises(DownloadError, match="corrupted .* again after fetching it anew"):
        timm.create_model(TAG, pretrained=True)
    cache = tmp_path / "cache"
    assert not (cache / "vmoe_tiny_a").exists()
    assert not list((cache / "downloads" / "vmoe_tiny_a").glob("*.data-*"))
    logits, expected = logits_of(timm.create_model(TAG, pretrained=True))  # fine next time
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_files_of_another_model_are_refused(tmp_path, monkeypatch, tiny_entry):
    srv = BucketServer.serving(
        VMOE_REFERENCE / "vmoe_tiny_a_repr", rename={"vmoe_tiny_a_repr": "vmoe_tiny_a"}
    ).start()
    monkeypatch.setenv("VMOE_CHECKPOINT_BASE_URL", srv.base_url)
    monkeypatch.setenv("VMOE_CACHE_DIR", str(tmp_path / "cache"))
    try:
        with pytest.raises(ValueError, match="is not the vmoe_vit.test_tiny_a model .*pre_logits"):
            cat.fetch_pretrained(TAG, progress=False)
    finally:
        srv.stop()
    assert not (tmp_path / "cache" / "vmoe_tiny_a").exists()


def test_offline_first_use_is_one_line_saying_how_to_fetch_by_hand(bucket, tmp_path, capsys):
    url = bucket.base_url
    bucket.stop()
    assert main(["convert", TAG, "--out", str(tmp_path / "out")]) == 2
    line = last_stderr_line(capsys)
    assert line.startswith(f"vmoe convert: error: could not download {url}/vmoe_tiny_a.index")
    assert "offline?" in line and "fetch the files by hand" in line
    assert "vmoe convert DIR/vmoe_tiny_a --out OUT" in line
    assert not (tmp_path / "out").exists()


def test_not_found_is_one_line(bucket, tmp_path, capsys):
    bucket.missing.add(FILES[1])
    assert main(["convert", "vmoe_tiny_a", "--out", str(tmp_path / "out")]) == 2
    line = last_stderr_line(capsys)
    assert f"could not download {bucket.base_url}/{FILES[1]} (HTTP 404 Not Found)" in line


def test_unsupported_checkpoints_are_one_line(capsys, tmp_path):
    assert main(["convert", "eee_s32_last2_ilsvrc2012", "--out", str(tmp_path / "o")]) == 2
    assert "eee_s32_last2_ilsvrc2012: not supported: E^3" in last_stderr_line(capsys)


def test_a_misspelt_name_is_one_line_with_the_closest(capsys, tmp_path):
    assert main(["convert", "vmoe_s32_last2_ilsvrc2012_randaug_light", "--out", str(tmp_path)]) == 2
    line = last_stderr_line(capsys)
    assert (
        "not a released checkpoint; did you mean vmoe_s32_last2_ilsvrc2012_randaug_light1" in line
    )


def test_vmoe_convert_name(bucket, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", "vmoe_tiny_a", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    cached = tmp_path / "cache" / "vmoe_tiny_a"
    assert (out / "config.json").read_text() == (cached / "config.json").read_text()
    logits, expected = logits_of(vm.from_pretrained(out))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    other = tmp_path / "k1"
    args = ["convert", TAG, "--out", str(other), "--num-selected", "1", "--capacity-factor", "2"]
    assert main(args) == 0
    assert len(bucket.requests) == 2  # from the cache
    layer = vm.moe_layers(vm.from_pretrained(other))["blocks.1.mlp"]
    assert (layer.router.num_selected, layer.router.capacity_factor) == (1, 2.0)


def test_vmoe_fit_fine_tunes_a_released_checkpoint_in_one_command(bucket, tmp_path):
    root = tmp_path / "run"
    code = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "finetune_vmoe_b16.yaml"),
            "--model.pretrained_dir",
            TAG,
            "--model.img_size",
            "16",
            "--data",
            "vmoe.data.DigitsDataModule",
            "--data.img_size",
            "16",
            "--data.batch_size",
            "8",
            "--data.num_workers",
            "0",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.strategy",
            "auto",
            "--trainer.precision",
            "32-true",
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "null",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.limit_test_batches",
            "1",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--trainer.default_root_dir",
            str(root),
            "--torch_num_threads",
            "1",
        ]
    )
    assert code == 0
    assert [n for n, _ in bucket.requests] == FILES
    tuned = vm.from_pretrained(root / "export")
    start = timm.create_model(TAG, pretrained=True)
    assert tuned.num_classes == 10 and tuned.embed_dim == 32  # the released model, a new head
    assert not torch.equal(tuned.blocks[0].attn.qkv.weight, start.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(
        tuned.blocks[0].attn.qkv.weight, start.blocks[0].attn.qkv.weight, rtol=0, atol=0.1
    )  # trained two steps from the checkpoint's weights


def test_processes_fetching_at_once_download_once(bucket, tmp_path):
    """Two fetches at once (DDP ranks): the lock makes one download, the other reads the cache."""
    import threading

    bucket.delay, bucket.chunk = 0.01, 16384  # slow enough for the two to overlap
    results, errors = [], []

    def fetch():
        try:
            results.append(cat.fetch_pretrained(TAG, progress=False))
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert [n for n, _ in bucket.requests] == FILES  # each file fetched once


def test_first_use_shows_where_it_fetches_from_and_a_progress_bar(bucket, capsys):
    cat.fetch_pretrained(TAG)
    err = capsys.readouterr().err
    assert f"vmoe: fetching vmoe_tiny_a from {bucket.base_url} into {cat.cache_dir()}" in err
    assert FILES[1] in err and "B/s" in err  # tqdm's bar of the shard


@pytest.fixture
def file_size_limit():
    """A real file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so writes fail with EFBIG)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    yield lambda n: resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_full_disk_mid_download_is_one_line_and_converts_nothing(
    bucket, tmp_path, capsys, file_size_limit
):
    file_size_limit(100_000)  # the shard is 251 kB
    code = main(["convert", "vmoe_tiny_a", "--out", str(tmp_path / "out")])
    file_size_limit(2**62)
    assert code == 2
    line = last_stderr_line(capsys)
    shard = tmp_path / "cache" / "downloads" / "vmoe_tiny_a" / FILES[1]
    assert line.startswith(f"vmoe convert: error: could not write download {shard}: file too")
    assert not (tmp_path / "cache" / "vmoe_tiny_a").exists() and not (tmp_path / "out").exists()
    left = sorted(p.name for p in shard.parent.iterdir())
    assert left == [FILES[0]]  # the complete, verified index stays; no partial shard
    assert main(["convert", "vmoe_tiny_a", "--out", str(tmp_path / "out")]) == 0


def test_vmoe_fit_offline_is_one_line(bucket, tmp_path, capsys):
    url = bucket.base_url
    bucket.stop()
    args = ["fit", "--config", str(ROOT / "configs" / "finetune_vmoe_b16.yaml")]
    args += ["--model.pretrained_dir", TAG, "--trainer.accelerator", "cpu"]
    args += ["--data", "vmoe.data.DigitsDataModule", "--data.num_workers", "0"]
    args += ["--trainer.default_root_dir", str(tmp_path / "run")]
    assert main(args) == 2
    line = last_stderr_line(capsys)
    assert line.startswith(f"vmoe fit: error: could not download {url}/vmoe_tiny_a.index")
    assert "fetch the files by hand" in line


def test_features_only_from_a_tag(bucket):
    features = timm.create_model(TAG, pretrained=True, features_only=True, out_indices=2)
    model = timm.create_model(TAG, pretrained=True)
    images, _ = official_logits()
    maps = features(images)
    assert len(maps) == 2 and maps[-1].shape == (4, 32, 4, 4)
    torch.testing.assert_close(
        features.model.blocks[3].mlp.router.weight, model.blocks[3].mlp.router.weight
    )
