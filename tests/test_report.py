"""report.py on the tiny pipeline's outputs (tests/tiny_pipeline.py): prepare.py's manifest and plots for its
processed set, two epochs of train_var.py, a sample_var.py sweep and eval_var.py's metrics table. The VQ-VAE was not
trained by train_vqvae.py there, so that step must show as missing."""
from __future__ import annotations

import csv
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

import eval_var
import report
import sample_var
import train_var
from common.image_data import SPLITS
from data_preprocessing import prepare
from tiny_pipeline import CLASSES, SCALES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class PageParser(HTMLParser):
    """The links (src, href), the visible text, and the text of the elements marked missing."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.text: list[str] = []
        self.missing: list[str] = []
        self.open_missing = 0  # depth inside class="missing" elements

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.links += [values[a] for a in ("src", "href") if values.get(a)]
        if self.open_missing or "missing" in (values.get("class") or "").split():
            self.open_missing += 1

    def handle_endtag(self, tag: str) -> None:
        self.open_missing = max(0, self.open_missing - 1)

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self.open_missing:
            self.missing.append(data)


def parse(page: Path) -> PageParser:
    parser = PageParser()
    parser.feed(page.read_text())
    return parser


def processed_with_manifest(source: Path, out: Path) -> Path:
    """A copy of the tiny processed set with the manifest.csv and plots prepare.py writes (its own functions)."""
    shutil.copytree(source, out)
    rows = [{"source": f"raw/{p.name}", "class": p.parent.name, "split": p.parent.parent.name, "status": "ok",
             "output": p.relative_to(out).as_posix()} for p in sorted(out.glob("*/*/*.png"))]
    rows.append({"source": "raw/broken.png", "class": "liver", "split": "", "status": "skipped",
                 "reason": "unreadable"})
    prepare.write_manifest(out / "manifest.csv", rows)
    prepare.plot_counts(rows, out)
    prepare.contact_sheets(rows, out, prepare.Config(contact_sheet_images=4))
    return out


@pytest.fixture(scope="module")
def run(tiny_pipeline: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    data = processed_with_manifest(tiny_pipeline["data"], root / "processed")
    var, samples = root / "runs" / "var", root / "runs" / "samples"
    train_var.main([f"--tokens={tiny_pipeline['tokens']}", f"--vqvae={tiny_pipeline['vqvae']}", f"--out_dir={var}",
                    "--depth=2", "--embed_dim=32", "--num_heads=2", "--batch_size=8", "--epochs=2",
                    "--samples_per_class=2", "--sample_every=1", "--plot_every=1", "--device=cpu",
                    f"--data_dir={tiny_pipeline['data']}", "--kid_every=1", "--kid_per_class=2"])
    sample_var.main([f"--var={tiny_pipeline['var']}", f"--data_dir={tiny_pipeline['data']}", f"--out={samples}",
                     "--samples_per_class=2", "--teachers_per_class=1", "--samples_per_teacher=1", "--guidance=0,1.5",
                     "--top_k=10", "--device=cpu"])
    with open(samples / "samples_manifest.csv", newline="") as handle:
        points = sorted({r["point"] for r in csv.DictReader(handle)})
    # eval_var.py's own table writer on made-up numbers: its InceptionV3 pass is too slow for this test.
    rows = [{"point": p, "class": c, "n": 2, "kid": 0.1234567, "kid_lo": 0.1, "kid_hi": 0.15,
             "diversity": 0.3}
            for p in ["REAL", *points] for c in [*CLASSES, "all"]]
    eval_var.write_tables(rows, {}, SCALES, samples / "eval")
    folders = {"data_dir": data, "vqvae_dir": root / "runs" / "vqvae", "tokens_dir": tiny_pipeline["tokens"].parent,
               "var_dir": var, "samples_dir": samples, "logs_dir": root / "runs" / "logs"}
    page = root / "runs" / "report.html"
    report.main([f"--{k}={v}" for k, v in folders.items()] + [f"--out={page}"])
    return {"page": page, "points": points, **folders}


def test_every_linked_file_exists_beside_the_page(run: dict[str, Path]) -> None:
    page = run["page"]
    files = [unquote(urlparse(link).path) for link in parse(page).links if not link.startswith("#")]
    assert all(not urlparse(link).scheme for link in parse(page).links)  # nothing from the network
    assert len(files) > 20
    for name in files:
        assert not Path(name).is_absolute() and (page.parent / name).exists(), name
    linked = {(page.parent / name).resolve() for name in files}
    for expected in [run["data_dir"] / "contact_sheets" / "heart.png", run["var_dir"] / "samples" / "epoch_002.png",
                     run["var_dir"] / "kid.png",
                     run["samples_dir"] / "grids" / "TP_K2_cfg1.5.png", run["data_dir"] / "per_class_by_split.png"]:
        assert expected.resolve() in linked, expected


def test_the_page_names_every_class_and_sweep_point(run: dict[str, Path]) -> None:
    text = " ".join(parse(run["page"]).text)
    assert len(run["points"]) == 2 * (1 + len(SCALES))  # NOP and TP_K1..K4, at guidance 0 and 1.5
    for name in CLASSES + run["points"]:
        assert name in text, name
    counts = {(s, c): len(list((run["data_dir"] / s / c).glob("*.png"))) for s in SPLITS for c in CLASSES}
    row = " ".join(["heart", *(str(counts[s, "heart"]) for s in SPLITS), str(sum(counts[s, "heart"] for s in SPLITS))])
    assert row in " ".join(" ".join(text.split()).split())  # the class's row of the counts table
    assert "0.123 [0.100, 0.150]" in text and "0.300" in text and "0.1234567" not in text  # rounded, KID with its interval
    assert "unreadable" in text  # the skipped source's reason
    # train_var.py's KID (real InceptionV3 features) at both epochs, and the best one named.
    best = min(json.loads((run["var_dir"] / "history.json").read_text()), key=lambda r: r["kid"])
    named = f"KID of its samples against the val images {best['kid']:.4f} at epoch {best['epoch']} (best_kid.pth)"
    assert named in " ".join(text.split())


def test_a_step_not_run_is_listed_as_missing(run: dict[str, Path]) -> None:
    missing = parse(run["page"]).missing
    assert any(str(run["vqvae_dir"]) in m for m in missing)  # train_vqvae.py never ran
    assert any("kid_vs_k.png" in m for m in missing)  # eval_var.py's plots were not made
    assert not any(str(run["var_dir"]) in m or str(run["samples_dir"] / "grids") in m for m in missing)  # these ran


def test_a_rerun_rewrites_nothing_and_other_files_are_never_overwritten(run: dict[str, Path], tmp_path: Path) -> None:
    page = run["page"]
    before = page.stat().st_mtime_ns
    args = [f"--{k}={v}" for k, v in run.items() if k.endswith("_dir")] + [f"--out={page}"]
    report.main(args)
    assert page.stat().st_mtime_ns == before
    assert oct(page.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    other = tmp_path / "notes.html"
    other.write_text("<p>my notes</p>")
    with pytest.raises(SystemExit, match="not written by report.py"):
        report.main(args[:-1] + [f"--out={other}"])
    assert other.read_text() == "<p>my notes</p>"
    with pytest.raises(SystemExit, match="epoch_grids"):
        report.main(["--epoch_grids=0", f"--out={tmp_path / 'r.html'}"])


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_unreadable_output_stops_with_the_file_named(tmp_path: Path, capsys) -> None:
    (tmp_path / "processed").mkdir()
    (tmp_path / "processed" / "manifest.csv").write_text("file,label\na.png,heart\n")
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "history.json").write_text("[{")
    absent = {name: tmp_path / "absent" / name for name in ("data_dir", "vqvae_dir", "tokens_dir", "var_dir",
                                                            "samples_dir", "logs_dir")}
    for folders, message in [({"data_dir": tmp_path / "processed"}, "manifest.csv: has no column class"),
                             ({"var_dir": tmp_path / "var"}, "history.json: not valid JSON")]:
        with pytest.raises(SystemExit):
            report.main([f"--{k}={v}" for k, v in {**absent, **folders, "out": tmp_path / "report.html"}.items()])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()
    with pytest.raises(SystemExit, match="must name an .html file"):
        report.main([f"--out={tmp_path / 'report.txt'}"])
