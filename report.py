"""Gather one run's outputs into a single static page, report.html, that opens from disk: no server, no network.

    python report.py                  # the CPU demo's folders -> runs/report.html
    python report.py --vqvae_dir=runs/vqvae_gpu --tokens_dir=runs/tokens_gpu --var_dir=runs/var_gpu \
        --samples_dir=runs/samples_gpu --out=runs/report_gpu.html

The page shows, each with a short caption: the processed data (images per class and split from manifest.csv, the
plots prepare.py wrote), the VQ-VAE (curves, codebook usage, test metrics, reconstructions), the VAR (curves, sample
grids over training), the sample sweep (a grid per sweep point) and its evaluation (metrics.csv as tables, plots,
memorisation), the samples' usefulness where eval_utility.py ran (TSTR / augmentation and detectability tables and
plots), and every step's resolved config.json. It reads only the steps' json, csv and png outputs: images are
linked relative to the page's folder, not copied, so move the page together with the folders it links to. A step
that has not run yet, or a file it did not write, is listed as missing.
"""
from __future__ import annotations

import html
import json
import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

from common.config import ConfigError, at_least, check_constants, check_output_folder, script_config
from common.image_data import SPLITS
from common.io import SideFileError, atomic_write_text, os_error_line, read_csv_rows, read_side_bytes
from common.io import read_json as guarded_read_json
from common.run_folder import RunFolderError, own_output_folder


@dataclass
class Config:
    data_dir: str = "data/processed"  # prepare.py's out: manifest.csv, per_class_by_split.png, contact_sheets/
    vqvae_dir: str = "runs/vqvae_cpu"  # train_vqvae.py's out_dir
    tokens_dir: str = "runs/tokens_cpu"  # folder of tokenize_multiscale_maps.py's token file and classes.json
    var_dir: str = "runs/var_cpu"  # train_var.py's out_dir
    samples_dir: str = "runs/samples_cpu"  # sample_var.py's out
    eval_dir: str = ""  # eval_var.py's out ('' = <samples_dir>/eval)
    utility_dir: str = ""  # eval_utility.py's out ('' = <samples_dir>/utility); its section shows only when it ran
    logs_dir: str = "runs/logs"  # run_demo.sh's step logs (<step>.log), linked when present
    out: str = "runs/report.html"  # the page; images are linked relative to its folder
    title: str = "VAR-Ultrasound run report"  # heading of the page
    epoch_grids: int = 8  # VAR sample grids over training shown: evenly spaced epochs, first and last included
    side_by_side: int = 8  # per class, NOP samples shown beside as many reconstructions of held-out images


GENERATOR = "VAR-Ultrasound report.py"  # marks a page this script wrote: only such a file is ever replaced
LOG_STEPS = (  # run_demo.sh's step names, in pipeline order: its logs are runs/logs/<step>.log
    "make_phantoms", "prepare", "train_vqvae", "tokenize", "train_var", "sample_var", "eval_var", "eval_utility",
    "report")


def validate(cfg: Config) -> None:
    """Every constant in its allowed range, and out a page to write or replace (never another file)."""
    check_constants(cfg, {"epoch_grids": at_least(1), "side_by_side": at_least(1)})
    out = Path(cfg.out)
    if out.suffix.lower() != ".html":
        raise ConfigError(f"--out={out}: must name an .html file")
    if out.is_dir():
        raise ConfigError(f"--out={out}: is a folder; give the page's path (e.g. {out / 'report.html'})")
    if out.exists():
        try:
            ours = GENERATOR.encode() in read_side_bytes(out)
        except SideFileError as err:
            raise ConfigError(f"--out={err}") from None
        if not ours:
            raise ConfigError(f"--out={out}: exists and was not written by report.py; refusing to overwrite it")
    check_output_folder("out", out.parent)


# ---------------------------------------------------------------- reading the steps' outputs

class ReportError(RuntimeError):
    """An output file that exists but cannot be read as the step writes it."""


def read_json(path: Path) -> Any:
    try:
        return guarded_read_json(path)
    except SideFileError as err:
        raise ReportError(f"{err}; re-run the step that writes it") from None


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a step's CSV."""
    try:
        return read_csv_rows(path)
    except SideFileError as err:
        raise ReportError(f"{err}; re-run the step that writes it") from None


def read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    columns, rows = read_table(path)
    absent = [c for c in required if c not in columns]
    if absent:
        raise ReportError(f"{path}: has no column {', '.join(absent)}; re-run the step that writes it")
    return rows


def epoch_files(folder: Path, pattern: str) -> list[tuple[int, Path]]:
    """(epoch, path) of the files whose name matches pattern (one group: the epoch number), by epoch."""
    found = [(int(m.group(1)), p) for p in folder.glob("*.png") if (m := re.fullmatch(pattern, p.name))]
    return sorted(found)


def spaced(items: list[Any], count: int) -> list[Any]:
    """At most count items, evenly spaced, the first and the last included."""
    if len(items) <= count:
        return items
    if count == 1:
        return items[-1:]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


POINT_NAME = re.compile(r"^(?:NOP|TP_K(\d+))_cfg(\d+(?:\.\d+)?(?:e[+-]?\d+)?)$")  # sample_var.py's names


def point_order(name: str) -> tuple:
    """Reference rows first, then per guidance value: NOP, then TP by increasing k."""
    match = POINT_NAME.match(name)
    if not match:
        return (0, name)
    k, guidance = match.groups()
    return (1, float(guidance), int(k or 0))


def describe_point(name: str, scales: list[str]) -> str:
    """A newcomer's reading of a sweep point's name."""
    if name == "REAL":
        return "real images: one half of the reference split against the other half, split by subject (noise floor)"
    if name == "REAL_TRAIN":
        return "the real training images against the reference split (a model that learnt the training subjects)"
    if name == "RECON":
        return "the VQ-VAE's reconstructions of real images (the tokenizer's ceiling)"
    match = POINT_NAME.match(name)
    if not match:
        return ""
    k, guidance = match.groups()
    if k is None:
        return f"no prefix: every scale generated from the class label, guidance {guidance}"
    side = f" (up to {scales[int(k) - 1]}x{scales[int(k) - 1]})" if 0 < int(k) <= len(scales) else ""
    full = " = the teacher's reconstruction" if scales and int(k) == len(scales) else ""
    return (f"teacher prefix: the first {k} token map(s){side} from a real image, the rest generated, "
            f"guidance {guidance}{full}")


# ---------------------------------------------------------------- HTML

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1360px; padding: 0 20px 40px; color: #222;
       line-height: 1.4; }
h1 { margin: 18px 0 4px; } h2 { border-bottom: 2px solid #ccc; margin-top: 36px; padding-bottom: 2px; }
h3 { margin: 22px 0 6px; }
nav { position: sticky; top: 0; background: #fff; padding: 6px 0; border-bottom: 1px solid #ddd; z-index: 1; }
nav a { margin-right: 14px; }
p.caption, figcaption { color: #444; font-size: 0.92em; max-width: 1000px; }
.figures { display: grid; grid-template-columns: repeat(3, 1fr); gap: 14px; align-items: start; }
.figures.two { grid-template-columns: repeat(2, 1fr); }
figure { margin: 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figure.wide { margin-top: 16px; }
.missing { color: #a33; } .done { color: #272; } .partial { color: #b60; }
table { border-collapse: collapse; font-size: 0.9em; margin: 6px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; } td.text, th.text { text-align: left; white-space: normal; }
table.metrics th { white-space: normal; max-width: 90px; text-align: center; }
tr.all td { font-weight: bold; background: #fafafa; } tbody.point { border-top: 2px solid #888; }
.scroll { overflow-x: auto; }
.side { display: flex; flex-wrap: wrap; gap: 28px; align-items: flex-start; }
.side .figures { display: block; flex: 1 1 420px; max-width: 720px; }
details { margin: 6px 0; } summary { cursor: pointer; } pre { background: #f6f6f6; padding: 8px; font-size: 0.85em; }
"""


TEXT_CLASS, ALL_CLASS = ' class="text"', ' class="all"'


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def number(text: str) -> str:
    """A CSV number for reading: integers as they are, others to 3 significant digits."""
    if text == "":
        return ""
    try:
        value = float(text)
    except ValueError:
        return text
    if re.fullmatch(r"-?\d+", text):
        return text
    rounded = f"{value:.3g}"  # 999.95 rounds to 1e+03: whole numbers from 1000 on, after rounding
    return f"{value:.0f}" if abs(float(rounded)) >= 1000 else rounded


def table(header: list[str], rows: list[list[str]], text_columns: int = 1, css: str = "") -> str:
    """A table of escaped cells; the first text_columns columns are left-aligned text; css: the table's class."""
    def cells(tag: str, values: list[str]) -> str:
        return "".join(f"<{tag}{TEXT_CLASS if i < text_columns else ''}>{esc(v)}</{tag}>"
                       for i, v in enumerate(values))
    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    attribute = f' class="{css}"' if css else ""
    return (f'<div class="scroll"><table{attribute}><thead><tr>{cells("th", header)}</tr></thead>'
            f'<tbody>{body}</tbody></table></div>')


class Page:
    """The page being built: sections of HTML, links relative to the page's folder, and what was missing."""

    def __init__(self, out: Path) -> None:
        self.folder = Path(os.path.abspath(out)).parent
        self.parts: list[str] = []
        self.missing: list[tuple[str, Path]] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def link(self, path: Path) -> str:
        return quote(Path(os.path.relpath(os.path.abspath(path), self.folder)).as_posix())

    def folder_link(self, folder: Path) -> str:
        """A link to the folder where it exists (a browser lists its files), its bare name where not."""
        return f'<a href="{self.link(folder)}">{esc(folder)}</a>' if folder.is_dir() else esc(folder)

    def note_missing(self, step: str, path: Path, why: str = "") -> None:
        self.missing.append((step, path))
        self.add(f'<p class="missing">missing: {esc(path)}{esc(why)}</p>')

    def figures(self, step: str, items: list[tuple[Path, str]], wide: bool = False, two: bool = False) -> None:
        """Images with captions, side by side (wide: one per row, the caption above, since it names the next large
        image); absent files are listed as missing below them."""
        def figure(path: Path, caption: str) -> str:
            href = self.link(path)
            image = f'<a href="{href}"><img src="{href}" alt="{esc(path.name)}" loading="lazy"></a>'
            if wide:
                return f'<figure class="wide"><figcaption>{caption}</figcaption>{image}</figure>'
            return f'<figure>{image}<figcaption>{caption}</figcaption></figure>'

        shown = [figure(path, caption) for path, caption in items if path.is_file()]
        if shown:
            self.add(("<div>" if wide else f'<div class="figures{" two" if two else ""}">') + "".join(shown) + "</div>")
        for path, _ in items:
            if not path.is_file():
                self.note_missing(step, path)


def step_status(path: Path, done: bool, detail: str = "") -> str:
    if done:
        return f'<span class="done">done</span>{esc(detail)}'
    if path.exists():
        return f'<span class="partial">incomplete</span>{esc(detail)}'
    return '<span class="missing">missing</span>'


# ---------------------------------------------------------------- sections

def data_section(page: Page, folder: Path) -> list[str]:
    """Counts per class and split, contact sheets and prepare.py's plots; returns the class names."""
    page.add('<h2 id="data">1. Data (prepare.py)</h2><p class="caption">The processed set every model learns from: '
             'each source image cropped to its scan area and resized to a square, split into train (fitting), '
             'val (choosing the best epoch) and test (final scores), with every subject in one split only.</p>')
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        page.note_missing("prepare", manifest, " (run data_preprocessing/prepare.py)")
        return []
    rows = read_csv(manifest, ("class", "split", "status", "reason"))
    kept = Counter((r["class"], r["split"]) for r in rows if r["status"] == "ok")
    classes = sorted({c for c, _ in kept})
    body = [[c] + [str(kept[c, s]) for s in SPLITS] + [str(sum(kept[c, s] for s in SPLITS))] for c in classes]
    body.append(["all"] + [str(sum(kept[c, s] for c in classes)) for s in SPLITS] + [str(sum(kept.values()))])
    page.add('<h3>Images per class and split</h3><div class="side"><div><p class="caption">From manifest.csv (one '
             'row per source image or frame): the images kept.</p>' + table(["class", *SPLITS, "total"], body))
    skipped = Counter(r["reason"] or "(no reason given)" for r in rows if r["status"] != "ok")
    if skipped:
        page.add('<p class="caption">Sources not used, by reason:</p>'
                 + table(["reason", "files"], [[reason, str(n)] for reason, n in skipped.most_common()]))
    page.add("</div>")
    page.figures("prepare", [(folder / "per_class_by_split.png", "The same counts as bars: a class with few images "
                              "is learnt worse; train_vqvae.py balances classes per epoch.")])
    page.add("</div>")
    if (folder / "scan_area_samples.png").is_file():
        page.add("<h3>Scan-area detection</h3>")
        page.figures("prepare", [(folder / "scan_area_samples.png", "A few originals per class with the detected scan "
                                  "area: the red tint is what gets blanked, the yellow box is the crop.")], two=True)
    page.add('<h3>Contact sheets</h3><p class="caption">A random sample of processed images per class, as the models '
             'see them (before resizing to the model\'s image size). Click an image for full size.</p>')
    page.figures("prepare", [(folder / "contact_sheets" / f"{c}.png", f"<b>{esc(c)}</b>") for c in classes])
    return classes


def scalar_and_scale_tables(metrics: dict[str, Any], scales: list[str]) -> str:
    """Scalars as name | value, per-scale lists as a table with a column per scale (other entries left out)."""
    scalars = [[k, number(str(v)) if isinstance(v, (int, float)) else str(v)]
               for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    lists = {k: v for k, v in metrics.items() if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)}
    text = table(["metric", "value"], scalars)
    if lists:
        width = max(len(v) for v in lists.values())
        names = [f"{s}x{s}" for s in scales] if len(scales) == width else [str(i + 1) for i in range(width)]
        text += table(["per scale", *names], [[k] + [number(str(x)) for x in v] for k, v in lists.items()])
    return text


def vqvae_section(page: Page, folder: Path, scales: list[str]) -> None:
    page.add('<h2 id="vqvae">2. VQ-VAE tokenizer (train_vqvae.py)</h2><p class="caption">The VQ-VAE turns an image '
             'into token maps at several scales (1x1 up to the finest) from one shared codebook, and back. The VAR '
             'only ever sees these tokens, so the VQ-VAE\'s reconstructions bound how good generated images can '
             'get.</p>')
    if not folder.is_dir():
        page.note_missing("train_vqvae", folder, " (run train_vqvae.py)")
        return
    page.figures("train_vqvae", [
        (folder / "loss.png", "Train and val loss per epoch (squared error + VQ loss). Val rising while train falls "
                              "means over-fitting; best.pth is the epoch with the lowest val loss."),
        (folder / "psnr_ssim.png", "Reconstruction quality on val: PSNR (dB) and SSIM, higher is better, over the whole "
                                   "image and inside the scan area (the blank outside a fan is easy to reproduce)."),
        (folder / "usage.png", "Codebook usage per scale: the fraction of codes picked at least once on val, and "
                               "the perplexity (effective number of codes in use)."),
        (folder / "code_usage_hist.png", "How often each code is picked on val (last epoch): a few codes doing all "
                                         "the work would be a poor vocabulary for the VAR."),
        (folder / "code_usage_hist_test.png", "The same on the test split, for best.pth."),
        (folder / "class_counts.png", "Images per class in each split and in one balanced training epoch."),
    ] + ([(folder / "gan.png", "Adversarial training (disc_weight > 0): the discriminator's and the generator's "
                               "hinge losses and the adaptive weight, per epoch from disc_start.")]
         if (folder / "gan.png").is_file() else []))
    page.add('<h3>Test metrics (best.pth on the test split)</h3>')
    metrics_path = folder / "test_metrics.json"
    if metrics_path.is_file():
        metrics = read_json(metrics_path)
        page.add('<p class="caption">From test_metrics.json: loss, PSNR (dB) and SSIM of the reconstructions (whole '
                 'image; _scan: inside the scan area), the KID of the reconstructions against the real test images '
                 '(kid_recon); usage (fraction of the codebook used) and perplexity per token-map scale.</p>'
                 + scalar_and_scale_tables(metrics, scales))
    else:
        page.note_missing("train_vqvae", metrics_path, " (written when training has finished)")
    recon_val = epoch_files(folder, r"recon_val_epoch(\d+)\.png")
    page.add('<h3>Reconstructions</h3><p class="caption">Per image: the original, the reconstruction, then the image '
             'decoded from the first k scales only, for k = 1, 2, ...: what each finer scale adds.</p>')
    page.figures("train_vqvae", [(folder / "recon_test.png", "Test images, best.pth.")]
                 + [(p, f"Val images after epoch {e} (the last saved).") for e, p in recon_val[-1:]], two=True)
    if not recon_val:
        page.note_missing("train_vqvae", folder / "recon_val_epochNNN.png")


def tokens_section(page: Page, folder: Path) -> None:
    page.add('<h2 id="tokens">3. Tokens (tokenize_multiscale_maps.py)</h2><p class="caption">Every processed image '
             'encoded once by the VQ-VAE\'s best.pth into its token maps: the VAR\'s training data.</p>')
    files = sorted(folder.glob("*.npz")) if folder.is_dir() else []
    if not files:
        page.note_missing("tokenize", folder / "tokens_multiscale_maps.npz", " (run tokenize_multiscale_maps.py)")
        return
    page.add(table(["token file", "size"], [[p.name, f"{p.stat().st_size / 1e6:.2f} MB"] for p in files]))
    classes_path = folder / "classes.json"
    if classes_path.is_file():
        page.add(f'<p class="caption">Classes (label = position): {esc(", ".join(map(str, read_json(classes_path))))}'
                 '</p>')


def var_section(page: Page, folder: Path, epoch_grids: int) -> None:
    page.add('<h2 id="var">4. VAR transformer (train_var.py)</h2><p class="caption">The VAR predicts an image\'s '
             'token maps scale by scale, coarse to fine, each from the class label and all coarser maps '
             '(next-scale prediction).</p>')
    if not folder.is_dir():
        page.note_missing("train_var", folder, " (run train_var.py)")
        return
    history_path = folder / "history.json"
    if history_path.is_file():
        records = [r for r in read_json(history_path) if isinstance(r, dict) and "val_loss" in r]
        config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        if records:
            best = min(records, key=lambda r: r["val_loss"])
            kids = [r for r in records if isinstance(r.get("kid"), (int, float))]
            best_kid = (f'; lowest KID of its samples against the val images {min(r["kid"] for r in kids):.4f} at epoch '
                        f'{min(kids, key=lambda r: r["kid"])["epoch"]} (best_kid.pth)') if kids else ""
            page.add(f'<p class="caption">{len(records)} of {esc(config.get("epochs", "?"))} epochs done; lowest val '
                     f'cross-entropy {best["val_loss"]:.3f} nats at epoch {best["epoch"]} (best.pth){best_kid}.</p>')
    else:
        page.note_missing("train_var", history_path)
    page.figures("train_var", [
        (folder / "loss.png", "Cross-entropy of the next-scale prediction over all tokens and on the finest scale "
                              "alone (which carries most tokens and is hardest): val, a train subset scored the same "
                              "way (eval mode, true labels: the gap is over-fitting), and the training steps' own "
                              "mean (with dropout, class drop and augmented copies)."),
        (folder / "accuracy.png", "Val accuracy per scale: how often the most likely token is the right one, "
                                  "against simple baselines. Coarse scales are easier than fine ones."),
        (folder / "lr.png", "Learning rate per step: warmup, then the decay schedule."),
    ] + ([(folder / "kid.png", "KID of a few samples per class against the val images, every kid_every epochs: "
                               "best_kid.pth is the epoch with the lowest (a small, noisy set: a guide, not a score).")]
         if (folder / "kid.png").is_file() else []))
    grids = epoch_files(folder / "samples", r"epoch_(\d+)\.png")
    page.add('<h3>Samples over training</h3><p class="caption">Images generated after an epoch, a row per class: '
             'they should turn from noise into recognisable organs.'
             + (f' {len(grids)} epochs saved; {epoch_grids} shown, evenly spaced.' if len(grids) > epoch_grids else '')
             + '</p>')
    if grids:
        page.figures("train_var", [(p, f"after epoch {e}") for e, p in spaced(grids, epoch_grids)])
    else:
        page.note_missing("train_var", folder / "samples" / "epoch_NNN.png")


def sweep_section(page: Page, folder: Path, scales: list[str]) -> list[str]:
    """A grid per sweep point; returns the points in reading order."""
    page.add('<h2 id="sweep">5. Sample sweep (sample_var.py)</h2><p class="caption">The trained VAR sampled at every '
             'sweep point. <b>NOP</b> (no prefix): every scale generated from the class alone. <b>TP_K&lt;k&gt;</b> '
             '(teacher prefix): the first k token maps are taken from a real image (the teacher, framed in red in '
             'the grids), the finer ones generated: larger k keeps more of the teacher. cfg&lt;g&gt;: sampled at '
             'classifier-free guidance scale g.</p>')
    manifest = folder / "samples_manifest.csv"
    if not manifest.is_file():
        page.note_missing("sample_var", manifest, " (run sample_var.py)")
        return []
    rows = read_csv(manifest, ("point", "class"))
    points = sorted({r["point"] for r in rows}, key=point_order)
    per_point = Counter(r["point"] for r in rows)
    page.add(table(["sweep point", "images", "what it is"],
                   [[p, str(per_point[p]), describe_point(p, scales)] for p in points], text_columns=3))
    page.add('<p class="caption">Each grid: a row per class; TP rows show each teacher (red frame) followed by its '
             'samples.</p>')
    page.figures("sample_var", [(folder / "grids" / f"{p}.png", f"<b>{esc(p)}</b>: {esc(describe_point(p, scales))}")
                                for p in points], wide=True)
    return points


def samples_beside_reconstructions(page: Page, samples: Path, evals: Path, points: list[str], count: int) -> None:
    """Per class, the VQ-VAE's reconstructions of training images (eval_var.py's train_recon/, evenly spaced over the
    sorted names and so over subjects: what a VAR that learnt the token distribution would draw) beside the samples
    of every NOP point: they should vary alike."""
    nop = [p for p in points if p.startswith("NOP")]
    if not nop:
        return
    recon = evals / "train_recon" / "train"
    if not recon.is_dir():
        page.note_missing("eval_var", recon, " (the reconstructions shown beside the samples; run eval_var.py)")
        return
    rows = read_csv(samples / "samples_manifest.csv", ("point", "class", "path"))

    def strip(paths: list[Path]) -> str:
        return "".join(f'<a href="{page.link(p)}"><img src="{page.link(p)}" alt="{esc(p.name)}" width="64" '
                       f'height="64" loading="lazy"></a>' for p in paths[:count])

    def row(c: str) -> str:
        strips = [strip(spaced(sorted((recon / c).glob("*.png")), count))]
        strips += [strip([samples / r["path"] for r in rows if r["point"] == p and r["class"] == c]) for p in nop]
        return f'<tr><td class="text">{esc(c)}</td>' + "".join(f'<td class="text">{s}</td>' for s in strips) + "</tr>"

    header = "".join(f'<th class="text">{esc(h)}</th>' for h in ["class", "reconstructions", *nop])
    body = "".join(row(c) for c in dict.fromkeys(r["class"] for r in rows))
    page.add(f'<h3>Samples beside reconstructions</h3><p class="caption">Per class, {count} reconstructions of training '
             f'images by the VQ-VAE (spread over its subjects) beside {count} samples of each NOP point: a class\'s '
             'samples should differ in layout as its reconstructions do, not repeat one average.</p>'
             f'<div class="scroll"><table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table></div>')


class Metric(NamedTuple):
    heading: str
    decimals: int  # shown to this many decimals (-1: as written, for counts)
    meaning: str


METRICS = {  # metrics.csv's columns shown, in order; [low, high] = bootstrap interval where metrics.csv has one
    "n": Metric("images", -1, "images in the set"),
    "kid": Metric("KID [interval]", 3, "Kernel Inception Distance to the real images over all pairs (lower = closer to "
                                       "real; about 0 for real-vs-real), with its bootstrap interval over both sets"),
    "fid": Metric("FID", 1, "Frechet Inception Distance (only with enough images)"),
    "precision": Metric("precision", 2, "share of the images inside a real image's k-NN ball (fidelity; a memoriser "
                                        "scores high)"),
    "recall": Metric("recall", 2, "share of the real images inside a generated image's k-NN ball"),
    "density": Metric("density", 2, "real balls per generated image, over k (about 1 for matching sets; above 1 where "
                                    "images crowd real ones)"),
    "coverage": Metric("coverage", 2, "share of real images whose k-NN ball holds a generated image (a collapsed "
                                      "model scores low)"),
    "precision_vs_recon": Metric("precision vs recon", 2, "precision against the tokenizer-level reference: "
                                                          "reconstructions of held-out images, as smooth as samples"),
    "recall_vs_recon": Metric("recall vs recon", 2, "recall against the tokenizer-level reference (RECON's is the "
                                                    "ceiling samples are measured against)"),
    "density_vs_recon": Metric("density vs recon", 2, "density against the tokenizer-level reference"),
    "coverage_vs_recon": Metric("coverage vs recon", 2, "coverage against the tokenizer-level reference (a "
                                                        "mode-collapsed set scores low)"),
    "feature_diversity": Metric("feature diversity", 3, "mean cosine distance of Inception features between images "
                                                        "of a class (higher = more varied; speckle moves it little)"),
    "diversity": Metric("MS-SSIM diversity", 3, "mean 1 - MS-SSIM over image pairs of a class: read only beside the "
                                                "RECON row (it counts speckle and shifts as diversity)"),
    "diversity_per_teacher": Metric("MS-SSIM div. / teacher", 3, "the same within one teacher's samples"),
    "psnr_teacher": Metric("PSNR vs teacher", 1, "dB, samples against their teacher (real image)"),
    "ssim_teacher": Metric("SSIM vs teacher", 3, "structural similarity to the teacher (1 = identical)"),
    "psnr_recon": Metric("PSNR vs recon", 1, "dB, against the teacher's VQ-VAE reconstruction (100 = identical)"),
    "ssim_recon": Metric("SSIM vs recon", 3, "structural similarity to the teacher's reconstruction"),
    "token_sim": Metric("token match", 3, "mean share of token positions equal to the closest training token row "
                                          "(augmented copies included)"),
    "nn_recon_sim": Metric("nearest-train-recon sim.", 3, "mean cosine similarity of each image to its nearest "
                                                          "training reconstruction (Inception features)"),
    "copy_fraction": Metric("copies", 3, "share flagged by the copy rule (token match or feature similarity above "
                                         "what any held-out image of the class reaches): memorisation"),
}


def metric_scales(path: Path) -> list[str]:
    """The token-map sides of metrics.csv's usage_<side> columns (none when it does not exist)."""
    if not path.is_file():
        return []
    return [c.removeprefix("usage_") for c in read_table(path)[0] if c.startswith("usage_")]


def metrics_tables(page: Page, path: Path, scales: list[str]) -> None:
    rows = read_csv(path, ("point", "class", *METRICS))
    columns = [c for c in METRICS if any(r[c] for r in rows)]
    empty = [METRICS[c].heading for c in METRICS if c not in columns]
    by_point: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_point[r["point"]].append(r)

    def cell(r: dict[str, str], c: str) -> str:
        if r[c] == "" or METRICS[c].decimals < 0:
            return r[c]
        digits = METRICS[c].decimals
        interval = f" [{float(r[c + '_lo']):.{digits}f}, {float(r[c + '_hi']):.{digits}f}]" if r.get(c + "_lo") else ""
        return f"{float(r[c]):.{digits}f}{interval}"

    head = "".join(f'<th title="{esc(METRICS[c].meaning)}">{esc(METRICS[c].heading)}</th>' for c in columns)
    bodies = []
    for point in sorted(by_point, key=point_order):
        group = by_point[point]
        lines = []
        for i, r in enumerate(group):
            first = (f'<td class="text" rowspan="{len(group)}" title="{esc(describe_point(point, scales))}"><b>'
                     f'{esc(point)}</b></td>' if i == 0 else "")
            lines.append(f'<tr{ALL_CLASS if r["class"] == "all" else ""}>{first}<td class="text">'
                         f'{esc(r["class"])}</td>' + "".join(f"<td>{esc(cell(r, c))}</td>" for c in columns) + "</tr>")
        bodies.append(f'<tbody class="point">{"".join(lines)}</tbody>')
    page.add('<h3>Metrics per sweep point and class</h3><p class="caption">From metrics.csv, rounded (PSNR to 0.1 dB, '
             'the rest to 3 decimals); the bold row of each point is over all classes. Hover a heading for its meaning '
             '(also listed below the table). Blank = not applicable (no teacher without a prefix) or too few images.'
             + (f' Left out, blank everywhere: {esc(", ".join(empty))}.' if empty else '') + '</p>'
             '<div class="scroll"><table class="metrics"><thead><tr><th class="text">point</th>'
             f'<th class="text">class</th>{head}'
             f'</tr></thead>{"".join(bodies)}</table></div>')
    page.add('<details><summary>What the columns mean</summary>'
             + table(["column", "meaning"], [[METRICS[c].heading, METRICS[c].meaning] for c in columns], text_columns=2)
             + "</details>")
    usage = [[p] + [f"{100 * float(r[f'usage_{s}']):.0f}%" if r[f"usage_{s}"] else "" for s in scales]
             + [f"{float(r[f'entropy_{s}']):.2f}" if r[f"entropy_{s}"] else "" for s in scales]
             for p in sorted(by_point, key=point_order) for r in by_point[p]
             if r["class"] == "all" and any(r[f"usage_{s}"] for s in scales)]
    if scales and usage:
        page.add('<h3>Token statistics per scale (all classes)</h3><p class="caption">Usage = share of the '
                 'codebook used at a scale; entropy in bits of the token distribution (higher = richer). The REAL row '
                 'holds the held-out (test) tokens\', REAL_TRAIN the training tokens\'. Per-class values are in '
                 f'<a href="{page.link(path)}">metrics.csv</a>.</p>'
                 + table(["point"] + [f"usage {s}x{s}" for s in scales] + [f"entropy {s}x{s}" for s in scales], usage,
                         css="metrics"))


def copy_controls(page: Page, path: Path) -> None:
    """The copy check's controls from metrics.json: planted copies must be flagged, held-out reconstructions not."""
    try:
        info = guarded_read_json(path)["info"]
        c = info["controls"]
        rates = [c["planted_recon_flagged"], c["planted_augmented_flagged"], c["held_out_recon_flagged"]]
    except (SideFileError, KeyError, TypeError):
        page.note_missing("eval_var", path, " (no copy-check controls: re-run eval_var.py)")
        return
    shown = ["" if r is None else f"{100 * r:.0f}%" for r in rates]
    page.add('<h3>Copy check and its controls</h3><p class="caption">A sample counts as a possible copy when its token '
             'maps match a training image\'s (augmented copies included) more closely, or its features lie closer to a '
             'training image\'s reconstruction, than the closest held-out image of its class does, by a margin '
             f'(copy_margin {esc(str(info.get("copy_margin", "")))} of the way to an exact copy; thresholds from the '
             f'{esc(str(info.get("copy_split", "")))} reconstructions). The rule is checked on every run: planted '
             'copies must be flagged (target at least 95%), held-out reconstructions must not (at most 5%). '
             'The planted augmented copies are training images augmented as tokenize_multiscale_maps.py augments '
             '(fresh crops, shifts and mirrorings), encoded and decoded by the VQ-VAE.</p>'
             + table(["control", "flagged", "should be"],
                     [[f"planted training reconstructions ({c.get('per_class', '')} per class)", shown[0], ">= 95%"],
                      [f"planted augmented copies ({c.get('per_class', '')} per class)", shown[1], ">= 95%"],
                      [f"{info.get('ref_split', '')} reconstructions (held out)", shown[2], "<= 5%"]]))


def eval_section(page: Page, folder: Path) -> None:
    page.add('<h2 id="eval">6. Evaluation (eval_var.py)</h2><p class="caption">How real, how varied and how close to '
             'their teachers the samples are, and whether they copy training images, next to reference rows: '
             '<b>REAL</b> (two halves of the held-out images, split by subject: the noise floor), <b>REAL_TRAIN</b> '
             '(the real training images against the held-out ones: what a model that learnt the training subjects '
             'can reach) and <b>RECON</b> (the VQ-VAE\'s reconstructions: what the VAR can reach through this '
             'tokenizer). The <i>vs recon</i> columns score precision, recall, density and coverage against '
             'reconstructions of held-out images, as smooth as the samples; RECON\'s are the ceiling. Every '
             'k-NN ball is bounded by images of other subjects. Intervals are bootstrap intervals over both sets '
             '(eval_var.py --compare tells whether two evaluations differ).</p>')
    path = folder / "metrics.csv"
    if not path.is_file():
        page.note_missing("eval_var", path, " (run eval_var.py)")
        return
    metrics_tables(page, path, metric_scales(path))
    copy_controls(page, folder / "metrics.json")
    page.add("<h3>Plots</h3>")
    page.figures("eval_var", [
        (folder / "kid_vs_k.png", "KID against the prefix length k (TP), a panel per class and one for all; NOP as "
                                  "dashed lines, real-vs-real and reconstructions as black lines."),
        (folder / "feature_diversity_vs_k.png", "Feature diversity against k: how different a class's images are in "
                                                "Inception features, beside the real images' and the "
                                                "reconstructions'."),
        (folder / "coverage_vs_recon_vs_k.png", "Coverage against the tokenizer-level reference (reconstructions "
                                                "of held-out images) against k, beside the test reconstructions' "
                                                "(the ceiling): low coverage = mode collapse."),
        (folder / "diversity_vs_k.png", "MS-SSIM diversity against k: within the class (solid) and within one "
                                        "teacher's samples (dotted), beside the reconstructions' (its ceiling)."),
        (folder / "teacher_similarity_vs_k.png", "PSNR and SSIM against the teacher (solid) and its reconstruction "
                                                 "(dashed): rising with k."),
        (folder / "token_usage_entropy.png", "Codebook usage and token entropy per scale, every sweep point against "
                                             "the held-out and the training tokens."),
        (folder / "memorisation_hist.png", "Memorisation: each sample's similarity to its nearest training image, "
                                           "against the held-out real images'; samples right of the threshold "
                                           "line may be copies."),
    ], two=True)
    page.add('<h3>Memorisation: the closest sample / training-image pairs</h3>')
    page.figures("eval_var", [(folder / "memorisation_pairs.png", "The samples most similar to a training image, "
                                                                  "each beside that image: near-identical pairs "
                                                                  "would mean the model copies.")], wide=True)


def interval(row: dict[str, Any]) -> str:
    """mean [low, high] of an eval_utility.py row, to 3 decimals (the mean alone where one seed gave no interval)."""
    if row["low"] is None:
        return f"{row['mean']:.3f}"
    return f"{row['mean']:.3f} [{row['low']:.3f}, {row['high']:.3f}]"


def utility_section(page: Page, folder: Path) -> None:
    """eval_utility.py's tables and plots: TSTR and augmentation, their differences, detectability."""
    metrics = read_json(folder / "metrics.json")
    info, rows, detect = metrics["info"], metrics["tstr"], metrics["detectability"]
    page.add('<h2 id="utility">7. Usefulness of the samples (eval_utility.py)</h2><p class="caption">'
             f'A {esc(info["arch"])} classifier ({esc(info["init"])}, {info["epochs"]} epochs, '
             f'{info["image_size"]} px) trained on the real training split, on real + synthetic images, and on the '
             f'synthetic images of sweep point {esc(info["point"])} alone, scored on the real test split; mean and 95% '
             f'interval over {info["seeds"]} seeds (t). See docs/7_utility.md for what would fool each number.</p>')
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    metric_names = ["accuracy", "balanced_accuracy", "macro_f1", "macro_auc"]

    def find(setting: str, name: str, metric: str) -> dict[str, Any]:
        return next(r for r in rows if r["setting"] == setting and r["class"] == name and r["metric"] == metric)

    page.add(table(["trained on", "synthetic images added"] + [m.replace("_", " ") for m in metric_names],
                   [[s, ", ".join(f"{c} {n}" for c, n in info["synthetic_images_added"][s].items())]
                    + [interval(find(s, "all", m)) for m in metric_names] for s in settings], text_columns=2))
    page.add('<p class="caption">Each setting minus real-only, paired by seed: "better" or "worse" only where the '
             'interval excludes 0.</p>')
    page.add(table(["setting", "metric", "difference", "verdict"],
                   [[d["setting"], d["metric"].replace("_", " "), interval(d), d["verdict"]]
                    for d in metrics["differences"]], text_columns=2))
    classes = info["classes"]
    page.add("<h3>Per class (recall / F1 / one-vs-rest AUC, means over seeds)</h3>")
    page.add(table(["trained on"] + classes,
                   [[s] + [" / ".join(f"{find(s, c, m)['mean']:.2f}" if find(s, c, m)["mean"] is not None else "n/a"
                                      for m in ("recall", "f1", "auc")) for c in classes] for s in settings]))
    page.add(f'<h3>Detectability</h3><p class="caption">A classifier telling real training images from synthetic ones '
             f'of the same class ({detect["images_per_side"]} of each), {detect["folds"]} folds split by subject; AUC '
             f'of the held-out scores averaged over seeds, with a 95% subject bootstrap interval (0.5 = '
             f'indistinguishable, 1 = always told apart). Per seed: '
             f'{esc(", ".join(f"{a:.3f}" for a in detect["per_seed"]))}.</p>')
    page.add(table(["class", "AUC", "images per side"],
                   [["all", interval({"mean": detect["auc"], "low": detect["low"], "high": detect["high"]}),
                     str(detect["images_per_side"])]]
                   + [[c, interval({"mean": d["auc"], "low": d["low"], "high": d["high"]}), str(d["images_per_side"])]
                      for c, d in detect["per_class"].items()]))
    page.figures("eval_utility", [
        (folder / "learning_curves.png", "Learning curves of every run: losses, and the balanced accuracy on the real "
                                         "val split (on the held-out fold for detectability)."),
        (folder / "confusion_matrices.png", "Confusion matrices on the real test split, seeds summed."),
        (folder / "roc.png", "One-vs-rest ROC per class on the real test split."),
        (folder / "detectability_roc.png", "ROC of the real-vs-synthetic classifier, all classes and per class."),
    ], two=True)


def config_section(page: Page, configs: list[tuple[str, Path]]) -> None:
    page.add('<h2 id="configs">8. Resolved configurations</h2><p class="caption">The constants each step ran with '
             '(its config.json: defaults, preset and command-line overrides together). Click to open.</p>')
    for step, path in configs:
        if path.is_file():
            page.add(f"<details><summary>{esc(step)}: {esc(path)}</summary>"
                     f"<pre>{esc(json.dumps(read_json(path), indent=2))}</pre></details>")
        else:
            page.note_missing(step, path)


# ---------------------------------------------------------------- main

def build(cfg: Config) -> str:
    out = Path(cfg.out)
    data, vqvae, tokens, var, samples = map(Path, (cfg.data_dir, cfg.vqvae_dir, cfg.tokens_dir, cfg.var_dir,
                                                    cfg.samples_dir))
    evals = Path(cfg.eval_dir) if cfg.eval_dir else samples / "eval"
    utility = Path(cfg.utility_dir) if cfg.utility_dir else samples / "utility"
    has_utility = (utility / "metrics.json").is_file()
    logs = Path(cfg.logs_dir)
    page = Page(out)
    classes = data_section(page, data)
    vqvae_config = read_json(vqvae / "config.json") if (vqvae / "config.json").is_file() else {}
    vqvae_scales = [str(s) for s in vqvae_config.get("scales", [])]
    vqvae_section(page, vqvae, vqvae_scales)
    tokens_section(page, tokens)
    var_section(page, var, cfg.epoch_grids)
    points = sweep_section(page, samples, metric_scales(evals / "metrics.csv") or vqvae_scales)
    samples_beside_reconstructions(page, samples, evals, points, cfg.side_by_side)
    eval_section(page, evals)
    if has_utility:
        utility_section(page, utility)
    prepare_config = read_json(data / "config.json") if (data / "config.json").is_file() else {}
    phantoms = ([("make_phantoms", Path(prepare_config["phantom_dir"]) / "config.json")]
                if prepare_config.get("phantom_dir") and not prepare_config.get("recipe") else [])
    config_section(page, phantoms + [("prepare", data / "config.json"), ("train_vqvae", vqvae / "config.json"),
                          ("train_var", var / "config.json"), ("sample_var", samples / "config.json"),
                          ("eval_var", evals / "config.json")]
                   + ([("eval_utility", utility / "config.json")] if has_utility else []))

    var_config = var / "config.json"
    var_epochs = read_json(var_config).get("epochs") if var_config.is_file() else None
    var_done = len(read_json(var / "history.json")) if (var / "history.json").is_file() else 0
    steps = [
        ("data (prepare.py)", data, (data / "manifest.csv").is_file(), f": {len(classes)} classes"),
        ("VQ-VAE (train_vqvae.py)", vqvae, (vqvae / "test_metrics.json").is_file(), ""),
        ("tokens (tokenize_multiscale_maps.py)", tokens, any(tokens.glob("*.npz")) if tokens.is_dir() else False, ""),
        ("VAR (train_var.py)", var, var_epochs is not None and var_done >= var_epochs,
         f": {var_done} of {var_epochs} epochs" if var_epochs else ""),
        ("samples (sample_var.py)", samples, (samples / "samples_manifest.csv").is_file(),
         f": {len(points)} sweep points" if points else ""),
        ("evaluation (eval_var.py)", evals, (evals / "metrics.csv").is_file(), ""),
    ] + ([("usefulness (eval_utility.py)", utility, True, "")] if has_utility else [])
    status = "".join(f'<tr><td class="text">{esc(name)}</td><td class="text">{page.folder_link(folder)}</td>'
                     f'<td class="text">{step_status(folder, done, detail)}</td></tr>'
                     for name, folder, done, detail in steps)
    log_files = [logs / f"{s}.log" for s in LOG_STEPS if (logs / f"{s}.log").is_file()]
    log_links = ('<p class="caption">Step logs (run_demo.sh): '
                 + ", ".join(f'<a href="{page.link(p)}">{esc(p.name)}</a>' for p in log_files) + "</p>"
                 if log_files else "")
    missing = "".join(f"<li>{esc(step)}: {esc(path)}</li>" for step, path in page.missing)
    head = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="generator" content="{GENERATOR}">'
            f'<title>{esc(cfg.title)}</title><style>{STYLE}</style></head><body>'
            f'<h1>{esc(cfg.title)}</h1><p class="caption">Class-conditional ultrasound image generation with VAR: the '
            'processed data, the VQ-VAE tokenizer, the VAR transformer, its samples and their evaluation, read from '
            'the steps\' output folders. Click any image to see it at full size.'
            + (f' Classes: {esc(", ".join(classes))}.' if classes else '') + '</p>'
            '<nav><a href="#data">data</a><a href="#vqvae">VQ-VAE</a><a href="#tokens">tokens</a><a href="#var">VAR</a>'
            '<a href="#sweep">sweep</a><a href="#eval">evaluation</a>'
            + ('<a href="#utility">usefulness</a>' if has_utility else '') + '<a href="#configs">configs</a></nav>'
            '<h2 id="status">Steps</h2><div class="scroll"><table><thead><tr><th class="text">step</th>'
            f'<th class="text">folder</th><th class="text">status</th></tr></thead><tbody>{status}</tbody></table>'
            f'</div>{log_links}'
            + (f'<details><summary class="missing">{len(page.missing)} expected file(s) missing</summary><ul>{missing}'
               '</ul></details>' if page.missing else ''))
    return head + "".join(page.parts) + "</body></html>\n"


def main(argv: list[str] | None = None) -> None:
    cfg = script_config(Config, argv, validate)
    inputs = [cfg.data_dir, cfg.vqvae_dir, cfg.tokens_dir, cfg.var_dir, cfg.samples_dir, cfg.eval_dir, cfg.logs_dir]
    try:
        # One page among other files: its folder may hold others' folders, but is none of them.
        with own_output_folder(Path(cfg.out).parent, "report.py", inputs, shared=True):
            atomic_write_text(cfg.out, build(cfg))
    except (ReportError, RunFolderError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except OSError as err:
        print(f"error: {os_error_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    print(f"wrote {cfg.out}: open it in a browser (file://{os.path.abspath(cfg.out)})")


if __name__ == "__main__":
    main()
