"""GPU check: every step's CUDA path on phantoms, with throughput and peak memory, and the checks that only a GPU
can make. Run it through bench/gpu_check.sh whenever a GPU is lent; --dry_run does the same at tiny sizes on the
CPU (the test suite runs it, so the script cannot rot while no GPU is lent).

    bash bench/gpu_check.sh                # one or more GPUs, the GPU presets shortened (a few minutes on an H200)
    bash bench/gpu_check.sh --dry_run      # CPU, tiny sizes, about a minute

Steps: phantoms -> prepare -> train_vqvae (GPU preset, a few hundred steps) -> tokenize -> train_var (GPU preset,
depth 10, about a hundred steps, host-sync warnings on) -> sample_var (batch 64) -> eval_var, each timed with its
log kept in the work folder and its peak GPU memory read from nvidia-smi; then the benchmarks at the GPU
presets' shapes (VQ-VAE training and tokenization, a VAR depth-16 step at batch 32 with its FLOP utilisation,
sampling at batch 64, ours against the reference VAR when VAR_REFERENCE_REPO names a checkout, Inception
features). Checks, each PASS or FAIL:
- tokens of the same images encoded in fp32 on the CPU and on CUDA are identical (no TF32 in the fp32 path);
- no host sync inside VAR training's step loop (torch's sync debug mode);
- one VAR depth-16 training step at batch 32 peaks under 40 GB;
- the VQ-VAE's attention runs on a fused kernel, not SDPA's math fallback;
- with two or more GPUs: train_var under torchrun on 2 GPUs, then resumed on 1.
Exit status 1 when a check fails or a step errs.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find common/


@dataclass
class Config:
    dry_run: bool = False  # tiny sizes on the CPU, checks that need CUDA reported as skipped
    work_dir: str = "runs/gpu_check"  # each run writes a fresh time-stamped folder here (data, runs, logs)
    peak_tflops: float = 0.0  # dense bf16 peak of the card for FLOP utilisation (0 = looked up from its name)
    max_step_gib: float = 40.0  # limit for the peak memory of a VAR depth-16 step at batch 32


import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from datetime import datetime  # noqa: E402

import torch  # noqa: E402

import bench_var  # noqa: E402
import bench_vqvae  # noqa: E402
from common.config import parse_config  # noqa: E402
from common.image_data import ImageSplit, list_classes  # noqa: E402
from models.vqvae import load_vqvae  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
D16 = ["--depth=16", "--embed_dim=1024", "--num_heads=16"]
GPU_SCALES = "--scales=1,2,3,4,5,6,8,10,13,16"


class GpuMemoryPeak:
    """Highest memory in use on GPU 0 (nvidia-smi, every 0.2 s) while a step runs: the process's whole footprint,
    CUDA context included, which is what decides whether a run fits. None without nvidia-smi."""

    def __init__(self) -> None:
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                self.peak_mib = max(self.peak_mib or 0.0, float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.2)

    def __enter__(self) -> "GpuMemoryPeak":
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class Report:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.rows: list[tuple[str, float, str, str]] = []
        self.checks: list[tuple[str, str, str]] = []

    def run(self, name: str, args: list[str], work: str, torchrun: int = 0) -> str:
        """Run one pipeline step as its own process, its log kept in logs/<name>.log; a failing step ends the check."""
        cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                                 if torchrun else []), *args]
        log_path = self.root / "logs" / f"{name}.log"
        print(f"\n== {name}: {' '.join(args)}", flush=True)
        start = time.perf_counter()
        with GpuMemoryPeak() as memory:
            done = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
        seconds = time.perf_counter() - start
        log_path.write_text(done.stdout + done.stderr)
        print("\n".join((done.stdout + done.stderr).strip().splitlines()[-4:]), flush=True)
        if done.returncode != 0:
            raise SystemExit(f"gpu_check: step {name} failed (exit {done.returncode}); see {log_path}")
        peak = f"{memory.peak_mib / 1024:.1f} GiB" if memory.peak_mib is not None else "n/a"
        self.rows.append((name, seconds, work, peak))
        return done.stdout + done.stderr

    def check(self, name: str, ok: bool | None, detail: str) -> None:
        verdict = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        self.checks.append((name, verdict, detail))
        print(f"[{verdict}] {name}: {detail}", flush=True)

    def summary(self) -> bool:
        print("\n== steps (wall time includes each process's start-up; memory: nvidia-smi peak on GPU 0)")
        for name, seconds, work, peak in self.rows:
            print(f"{name:<16} {seconds:7.1f} s  {work:<44} peak GPU memory {peak}")
        print("\n== checks")
        for name, verdict, detail in self.checks:
            print(f"[{verdict}] {name}: {detail}")
        return all(verdict != "FAIL" for _, verdict, _ in self.checks)


def count_images(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.png"))


def tokens_cpu_vs_cuda(root: Path, vqvae_path: Path, image_size: int, device: torch.device) -> tuple[float, int]:
    """Share of identical tokens when the same test images are encoded in fp32 on the CPU and on `device`."""
    data = root / "data" / "processed"
    split = ImageSplit(data, "test", image_size, list_classes(data))
    images = torch.stack([split[i][0] for i in range(min(32, len(split)))])
    tokens = []
    for where in (torch.device("cpu"), device):
        model = load_vqvae(vqvae_path, map_location=where).eval()
        with torch.no_grad():
            tokens.append(torch.cat([m.flatten(1).cpu() for m in model.img_to_idx(images.to(where))], dim=1))
    return float((tokens[0] == tokens[1]).double().mean()), len(images)


def vae_attention_kernels(vqvae_path: Path, image_size: int, device: torch.device) -> list[str]:
    """The scaled-dot-product-attention kernels one bf16 VQ-VAE forward pass launches (names from the profiler)."""
    model = load_vqvae(vqvae_path, map_location=device).eval()
    x = torch.zeros(2, 3, image_size, image_size, device=device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model.reconstruct(x)
    return sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key and e.key.startswith("aten::_")})


def peak_tflops(cfg: Config) -> float:
    if cfg.peak_tflops > 0 or not torch.cuda.is_available():
        return cfg.peak_tflops
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(Config, argv)
    if not cfg.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run it with --dry_run to try it on the CPU")
    root = (REPO / cfg.work_dir / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    (root / "logs").mkdir(parents=True)
    device = torch.device("cpu" if cfg.dry_run else "cuda")
    dry = cfg.dry_run
    print(f"gpu_check in {root}: {'dry run on the CPU' if dry else torch.cuda.get_device_name(0)}, "
          f"{torch.cuda.device_count()} GPU(s), torch {torch.__version__}", flush=True)
    report = Report(root)

    # The pipeline, with the GPU presets shortened (dry run: the CPU presets at tiny sizes).
    subjects, workers = ("3", "2") if dry else ("40", str(os.cpu_count() or 1))
    report.run("make_phantoms", [str(REPO / "data_preprocessing/make_phantoms.py"), "--out=data/raw",
                                 f"--n_subjects_per_class={subjects}", "--frames_per_subject=1" if dry else
                                 "--frames_per_subject=5", f"--workers={workers}"], "")
    report.run("prepare", [str(REPO / "data_preprocessing/prepare.py"), "--phantom_dir=data/raw",
                           "--out=data/processed", f"--workers={workers}"], "")
    n_images = count_images(root / "data" / "processed")
    vq_preset = "vqvae_cpu" if dry else "vqvae_gpu"
    vq_epochs = 1 if dry else 8
    report.run("train_vqvae", [str(REPO / "train_vqvae.py"), f"--config={REPO / 'configs' / vq_preset}.json",
                               "--data_dir=data/processed", "--out_dir=runs/vqvae", f"--epochs={vq_epochs}",
                               f"--plot_every={vq_epochs}", *(["--num_workers=0", "--batch_size=4"] if dry else ["--num_workers=8"])],
               f"{vq_epochs} epochs of ~{int(0.8 * n_images)} train images")
    vqvae_path = root / "runs" / "vqvae" / "best.pth"
    report.run("tokenize", [str(REPO / "tokenize_multiscale_maps.py"), "--data_dir=data/processed",
                            "--vqvae=runs/vqvae/best.pth", "--out=runs/tokens/tokens_multiscale_maps.npz",
                            "--num_workers=0", *(["--aug_copies=2"] if dry else [])], f"{n_images} images")
    var_preset, var_epochs, var_batch = ("var_cpu", 1, 4) if dry else ("var_gpu", 8, 64)
    var_args = [str(REPO / "train_var.py"), f"--config={REPO / 'configs' / var_preset}.json",
                "--tokens=runs/tokens/tokens_multiscale_maps.npz", "--vqvae=runs/vqvae/best.pth",
                f"--batch_size={var_batch}", "--sample_every=0", "--samples_per_class=4", "--sync_debug=true",
                *(["--kid_every=0"] if dry else [])]  # dry: KID's InceptionV3 on the CPU would double the check's time
    log = report.run("train_var", [*var_args, "--out_dir=runs/var", f"--epochs={var_epochs}"],
                     f"{var_epochs} epochs, batch {var_batch}")
    syncs = sorted(set(re.findall(r"(\S+:\d+): UserWarning: called a synchronizing CUDA operation", log)))
    report.check("no host sync in the VAR training step", None if dry else not syncs,
                 "dry run: CUDA only" if dry else f"{len(syncs)} syncing line(s) {syncs}" if syncs else "0 syncs")
    report.run("sample_var", [str(REPO / "sample_var.py"),
                              f"--config={REPO / 'configs' / ('sample_cpu' if dry else 'sample_gpu')}.json",
                              "--var=runs/var/best.pth", "--data_dir=data/processed", "--out=runs/samples",
                              *(["--samples_per_class=1", "--teachers_per_class=1", "--samples_per_teacher=1",
                                 "--coarse_ks=1", "--batch_size=8"] if dry else
                                ["--samples_per_class=64", "--teachers_per_class=4", "--samples_per_teacher=4",
                                 "--coarse_ks=1,4", "--batch_size=64"]), "--cfg=1.5"], "NOP + TP")
    report.run("eval_var", [str(REPO / "eval_var.py"), "--samples=runs/samples", "--cache=",
                            f"--device={device.type}"], f"{count_images(root / 'runs' / 'samples')} images")

    image_size = 64 if dry else 256
    share, n = tokens_cpu_vs_cuda(root, vqvae_path, image_size, device)
    report.check("fp32 tokens identical on the CPU and CUDA", share == 1.0,
                 f"{100 * share:.3f}% of the tokens of {n} test images identical" + (" (dry run: CPU vs CPU)" if dry else ""))
    if dry:
        report.check("VQ-VAE attention on a fused kernel", None, "dry run: CUDA only")
    else:
        kernels = vae_attention_kernels(vqvae_path, image_size, device)
        report.check("VQ-VAE attention on a fused kernel",
                     bool(kernels) and not any("math" in k for k in kernels), ", ".join(kernels) or "none seen")

    # Benchmarks at the GPU presets' shapes (dry run: tiny), in this process.
    print("\n== bench_vqvae", flush=True)
    bench_vqvae.main(["--device=cpu", "--iters=1", "--batch_size=2", "--eval_batch_size=2"] if dry else
                     ["--image_size=256", "--ch=160", "--z_channels=32", "--vocab_size=2048", "--ch_mult=1,1,2,2,4",
                      "--num_res_blocks=2", GPU_SCALES, "--batch_size=32", "--eval_batch_size=256", "--iters=10"])
    print("\n== bench_var (depth 16, batch 32)", flush=True)
    var = bench_var.main(["--device=cpu", "--depth=2", "--batch_size=2", "--scales=1,2,3,4", "--vocab_size=64",
                          "--steps=1", "--warmup_steps=1"] if dry else
                         [*D16, "--batch_size=32", GPU_SCALES, "--steps=10", f"--peak_tflops={peak_tflops(cfg)}"])
    report.check(f"VAR depth-16 step at batch 32 under {cfg.max_step_gib:g} GB",
                 None if dry else var["peak_gib"] * 2**30 / 1e9 < cfg.max_step_gib,
                 f"peak {var['peak_gib']:.2f} GiB" + (" (dry run: depth 2, CPU RSS)" if dry else "")
                 + (f", model FLOP utilisation {100 * var['mfu']:.1f}%" if var["mfu"] is not None else ""))
    if not dry:  # the same step compiled (train_var.py --compile=true); the compiler is too slow for a dry run
        print("\n== bench_var compiled (depth 16, batch 32)", flush=True)
        compiled = bench_var.main([*D16, "--batch_size=32", GPU_SCALES, "--steps=10", "--warmup_steps=3", "--compile=true",
                                   f"--peak_tflops={peak_tflops(cfg)}"])
        report.check("VAR depth-16 step compiled: faster than eager", compiled["step_seconds"] < var["step_seconds"],
                     f"{compiled['step_seconds'] * 1000:.0f} ms vs {var['step_seconds'] * 1000:.0f} ms"
                     + (f", model FLOP utilisation {100 * compiled['mfu']:.1f}%" if compiled["mfu"] is not None else ""))
        torch.cuda.empty_cache()  # the benchmarks below run as their own processes on the same GPU
    report.run("bench_sampling", [str(REPO / "bench/bench_sampling.py"), "--device=cpu", "--batch_size=2",
                                  "--scales=1,2,4", "--warmup=0", "--repeats=1"] if dry else
               [str(REPO / "bench/bench_sampling.py"), *D16, "--vqvae_ch=160", "--z_channels=32", "--vocab_size=2048",
                GPU_SCALES, "--vqvae_ch_mult=1,1,2,2,4", "--vqvae_res_blocks=2", "--batch_size=64"], "batch 64")
    # Ours against the reference VAR (a checkout named by VAR_REFERENCE_REPO) or ours alone: training step and
    # sampling (preallocated KV cache) in fp32 and bf16.
    reference = os.environ.get("VAR_REFERENCE_REPO", "")
    report.run("bench_models", [str(REPO / "bench/bench_models.py"), "--dry_run=true", "--device=cpu",
                                *([f"--reference_repo={reference}"] if reference else [])] if dry else
               [str(REPO / "bench/bench_models.py"), *D16, "--vqvae_ch=160", "--batch_size=32", "--sample_batch=32",
                "--repeats=3", *([f"--reference_repo={reference}"] if reference else [])],
               "ours vs the reference" if reference else "ours alone (VAR_REFERENCE_REPO unset)")
    report.run("bench_features", [str(REPO / "bench/bench_features.py"), "--device=cpu", "--batch_size=2",
                                  "--side=64", "--warmup=0", "--repeats=1"] if dry else [str(REPO / "bench/bench_features.py"), "--batch_size=128"],
               "Inception features")

    if dry or torch.cuda.device_count() < 2:
        report.check("torchrun on 2 GPUs, resumed on 1", None, "dry run" if dry else "only one GPU here")
    else:
        report.run("var_2gpu", [*var_args, "--out_dir=runs/var_2gpu", "--epochs=1"], "torchrun, 2 GPUs", torchrun=2)
        resumed = report.run("var_resume_1gpu", [*var_args, "--out_dir=runs/var_2gpu", "--epochs=2"], "1 GPU")
        report.check("torchrun on 2 GPUs, resumed on 1", "resuming from" in resumed, "epoch 2 ran on one GPU")

    ok = report.summary()
    print(f"\nlogs and outputs: {root}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
