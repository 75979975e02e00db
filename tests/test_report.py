"""report.py on the tiny pipeline's outputs (tests/tiny_pipeline.py): prepare.py's manifest and plots for its
processed set, two epochs of train_var.py, a sample_var.py sweep and eval_var.py's metrics table. The VQ-VAE was not
trained by train_vqvae.py there, so that step must show as missing.

report.py's rules on small folders built in each test: the refusals of a bad --out or an unreadable step output,
which files and epochs each section shows and in what order, the numbers its tables write (counts, rounding, KID
with its std, token usage), the best epochs it names, what it lists as missing, and each step's status (issue 16).
The captions' wording is not pinned."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

import eval_var
import report
import sample_var
import train_var
from common.config import ConfigError
from common.image_data import SPLITS
from config_refusal import refusal_of
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
    for c in CLASSES:  # stand-ins for eval_var.py's reconstructions of the training images
        shutil.copytree(tiny_pipeline["data"] / "train" / c, samples / "eval" / "train_recon" / "train" / c)
    folders = {"data_dir": data, "vqvae_dir": root / "runs" / "vqvae", "tokens_dir": tiny_pipeline["tokens"].parent,
               "var_dir": var, "samples_dir": samples, "logs_dir": root / "runs" / "logs"}
    page = root / "runs" / "report.html"
    report.main([f"--{k}={v}" for k, v in folders.items()] + [f"--out={page}"])
    return {"page": page, "points": points, **folders}


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_each_class_s_samples_are_shown_beside_its_reconstructions(run: dict[str, Path]) -> None:
    page = run["page"].read_text()
    table = page[page.index("Samples beside reconstructions"):]
    table = table[:table.index("</table>")]
    cells = [cell.split("</td>")[0] for cell in table.split("<td")[1:]]
    nop = [p for p in run["points"] if p.startswith("NOP")]
    assert len(nop) == 2 and len(cells) == len(CLASSES) * (2 + len(nop))  # class, reconstructions, a strip per point
    with open(run["samples_dir"] / "samples_manifest.csv", newline="") as handle:
        samples = list(csv.DictReader(handle))
    for i, c in enumerate(CLASSES):
        row = cells[i * (2 + len(nop)):(i + 1) * (2 + len(nop))]
        assert c in row[0]
        recon = sorted((run["samples_dir"] / "eval" / "train_recon" / "train" / c).glob("*.png"))
        assert [unquote(src) for src in re.findall(r'src="([^"]+)"', row[1])] == [
            os.path.relpath(p, run["page"].parent) for p in recon]  # every one of the class's, none of another's
        for point, strip in zip(nop, row[2:]):
            shown = {unquote(src) for src in re.findall(r'src="([^"]+)"', strip)}
            assert shown == {os.path.relpath(run["samples_dir"] / r["path"], run["page"].parent)
                             for r in samples if r["point"] == point and r["class"] == c}


def test_side_by_side_must_show_at_least_one_image(tmp_path: Path) -> None:
    config = report.Config(out=str(tmp_path / "report.html"))
    report.validate(replace(config, side_by_side=1))
    with pytest.raises(ConfigError, match=r"^--side_by_side=0: must be >= 1$"):
        report.validate(replace(config, side_by_side=0))


@pytest.mark.e2e
def test_a_step_not_run_is_listed_as_missing(run: dict[str, Path]) -> None:
    missing = parse(run["page"]).missing
    assert any(str(run["vqvae_dir"]) in m for m in missing)  # train_vqvae.py never ran
    assert any("kid_vs_k.png" in m for m in missing)  # eval_var.py's plots were not made
    assert not any(str(run["var_dir"]) in m or str(run["samples_dir"] / "grids") in m for m in missing)  # these ran


@pytest.mark.e2e
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


def refusal(tmp_path: Path, **overrides) -> str | None:
    return refusal_of(report.validate, replace(report.Config(out=str(tmp_path / "site" / "report.html")), **overrides))


def test_out_must_be_a_page_this_script_wrote_and_epoch_grids_at_least_one(tmp_path):
    assert refusal(tmp_path, epoch_grids=1) is None and (tmp_path / "site").is_dir()
    assert refusal(tmp_path, epoch_grids=0) == "--epoch_grids=0: must be >= 1"
    assert refusal(tmp_path, out=str(tmp_path / "r.htm")) == f"--out={tmp_path / 'r.htm'}: must name an .html file"
    assert refusal(tmp_path, out=str(tmp_path / "R.HTML")) is None
    (tmp_path / "dir.html").mkdir()
    assert refusal(tmp_path, out=str(tmp_path / "dir.html")) == (
        f"--out={tmp_path / 'dir.html'}: is a folder; give the page's path (e.g. {tmp_path / 'dir.html' / 'report.html'})")
    (tmp_path / "notes.html").write_text("<p>mine</p>")
    assert refusal(tmp_path, out=str(tmp_path / "notes.html")) == (
        f"--out={tmp_path / 'notes.html'}: exists and was not written by report.py; refusing to overwrite it")
    (tmp_path / "old.html").write_bytes(f'<meta name="generator" content="{report.GENERATOR}">\xff'.encode("latin-1"))
    assert refusal(tmp_path, out=str(tmp_path / "old.html")) is None
    (tmp_path / "file").write_text("x")
    assert refusal(tmp_path, out=str(tmp_path / "file" / "r.html")) == f"--out: {tmp_path / 'file'} exists and is not a folder"


def test_unreadable_outputs_are_refused_with_the_file_named(tmp_path):
    (tmp_path / "h.json").write_text("[{")
    with pytest.raises(report.ReportError) as err:
        report.read_json(tmp_path / "h.json")
    assert str(err.value).startswith(f"{tmp_path / 'h.json'}: not valid JSON: Expecting")
    assert str(err.value).endswith("); re-run the step that writes it")
    (tmp_path / "ok.json").write_text('{"a": [1]}')
    assert report.read_json(tmp_path / "ok.json") == {"a": [1]}
    (tmp_path / "m.csv").write_text("split,file\ntrain,a.png\n")
    with pytest.raises(report.ReportError) as err:
        report.read_csv(tmp_path / "m.csv", ("class", "split", "status"))
    assert str(err.value) == f"{tmp_path / 'm.csv'}: has no column class, status; re-run the step that writes it"
    assert report.read_csv(tmp_path / "m.csv", ("file",)) == [{"split": "train", "file": "a.png"}]
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(report.ReportError, match="has no column point$|has no column point;"):
        report.read_csv(tmp_path / "empty.csv", ("point",))
    assert report.read_csv(tmp_path / "empty.csv", ()) == []


def test_epoch_files_are_sorted_by_epoch_number_and_match_the_whole_name(tmp_path):
    for name in ("epoch_10.png", "epoch_9.png", "epoch_011.png", "xepoch_1.png", "epoch_2.png.bak", "epoch_3.jpg",
                 "epoch_.png"):
        (tmp_path / name).write_text("")
    assert report.epoch_files(tmp_path, r"epoch_(\d+)\.png") == [
        (9, tmp_path / "epoch_9.png"), (10, tmp_path / "epoch_10.png"), (11, tmp_path / "epoch_011.png")]


def test_spaced_keeps_the_first_and_last_and_spreads_the_rest():
    assert report.spaced(list(range(10)), 4) == [0, 3, 6, 9]
    assert report.spaced(list(range(6)), 3) == [0, 2, 5]  # round(2.5) = 2
    assert report.spaced(list(range(7)), 2) == [0, 6]
    assert report.spaced(list(range(5)), 1) == [4]
    assert report.spaced(list(range(3)), 3) == [0, 1, 2] and report.spaced([1], 1) == [1]


def test_points_read_reference_rows_first_then_by_guidance_nop_then_k():
    names = ["TP_K10_cfg1.5", "TP_K2_cfg1.5", "NOP_cfg1.5", "RECON", "TP_K1_cfg0", "REAL", "NOP_cfg0", "TP_K1_cfg2e-1",
             "NOP_cfg"]
    assert sorted(names, key=report.point_order) == [
        "NOP_cfg", "REAL", "RECON", "NOP_cfg0", "TP_K1_cfg0", "TP_K1_cfg2e-1", "NOP_cfg1.5", "TP_K2_cfg1.5",
        "TP_K10_cfg1.5"]
    assert report.point_order("TP_K3_cfg1e+1") == (1, 10.0, 3) and report.point_order("NOP_cfg2") == (1, 2.0, 0)


def test_each_point_is_described_by_its_prefix_and_guidance():
    scales = ["1", "2", "4"]
    assert report.describe_point("REAL", scales).startswith("real images: one half of the reference split")
    assert report.describe_point("RECON", scales).startswith("the VQ-VAE's reconstructions of real images")
    assert report.describe_point("NOP_cfg1.5", scales) == "no prefix: every scale generated from the class label, guidance 1.5"
    teacher = "teacher prefix: the first {} token map(s){} from a real image, the rest generated, guidance {}"
    assert report.describe_point("TP_K2_cfg1.5", scales) == teacher.format(2, " (up to 2x2)", "1.5")
    assert report.describe_point("TP_K1_cfg3", scales) == teacher.format(1, " (up to 1x1)", "3")
    assert report.describe_point("TP_K3_cfg0", scales) == teacher.format(3, " (up to 4x4)", "0") + \
        " = the teacher's reconstruction"
    assert report.describe_point("TP_K4_cfg0", scales) == teacher.format(4, "", "0")
    assert report.describe_point("TP_K0_cfg0", scales) == teacher.format(0, "", "0")
    assert report.describe_point("TP_K1_cfg0", []) == teacher.format(1, "", "0")
    assert report.describe_point("real", scales) == "" and report.describe_point("TP_K1", scales) == ""


def test_numbers_are_rounded_to_three_significant_digits_and_integers_kept():
    cases = {"": "", "abc": "abc", "12": "12", "-3": "-3", "1000": "1000", "0.123456": "0.123", "2.50": "2.5",
             "1234.5": "1234", "-1500.7": "-1501", "1e-05": "1e-05", "999.4": "999", "-0.0004567": "-0.000457",
             "nan": "nan", "12.0": "12"}
    assert {text: report.number(text) for text in cases} == cases


def test_numbers_that_round_to_a_thousand_are_written_whole():
    assert report.number("999.95") == "1000" and report.number("-999.7") == "-1000"


def test_a_table_escapes_its_cells_and_left_aligns_the_text_columns():
    assert report.table(["a", "b<"], [["x", "1"], ["y&", "2"]]) == (
        '<div class="scroll"><table><thead><tr><th class="text">a</th><th>b&lt;</th></tr></thead><tbody>'
        '<tr><td class="text">x</td><td>1</td></tr><tr><td class="text">y&amp;</td><td>2</td></tr></tbody></table></div>')
    assert report.table(["a", "b", "c"], [["1", "2", "3"]], text_columns=2, css="metrics") == (
        '<div class="scroll"><table class="metrics"><thead><tr><th class="text">a</th><th class="text">b</th><th>c</th>'
        '</tr></thead><tbody><tr><td class="text">1</td><td class="text">2</td><td>3</td></tr></tbody></table></div>')
    assert report.table(["a"], [], text_columns=0) == (
        '<div class="scroll"><table><thead><tr><th>a</th></tr></thead><tbody></tbody></table></div>')
    assert report.esc('"<&>\'') == "&quot;&lt;&amp;&gt;&#x27;"


def test_links_are_relative_to_the_page_and_missing_files_are_listed(tmp_path, monkeypatch):
    (tmp_path / "runs" / "my run").mkdir(parents=True)
    (tmp_path / "runs" / "my run" / "a#1.png").write_text("")
    (tmp_path / "runs" / "b.png").write_text("")
    monkeypatch.chdir(tmp_path / "runs")
    page = report.Page(Path("pages") / "report.html")
    assert page.folder == tmp_path / "runs" / "pages" and page.parts == [] and page.missing == []
    assert page.link(Path("my run") / "a#1.png") == "../my%20run/a%231.png"
    assert page.link(tmp_path / "runs" / "pages" / "x.png") == "x.png"
    assert page.folder_link(Path("my run")) == '<a href="../my%20run">my run</a>'
    assert page.folder_link(Path("none<")) == "none&lt;"
    page.note_missing("step", Path("none.png"), " (run <it>)")
    assert page.missing == [("step", Path("none.png"))]
    assert page.parts == ['<p class="missing">missing: none.png (run &lt;it&gt;)</p>']
    page.parts.clear()
    items = [(Path("my run") / "a#1.png", "first <b>"), (Path("c.png"), "absent"), (Path("b.png"), "second")]
    page.figures("s", items)
    figure = ('<figure><a href="../{0}"><img src="../{0}" alt="{1}" loading="lazy"></a><figcaption>{2}</figcaption>'
              '</figure>')
    assert page.parts == ['<div class="figures">' + figure.format("my%20run/a%231.png", "a#1.png", "first <b>")
                          + figure.format("b.png", "b.png", "second") + "</div>",
                          '<p class="missing">missing: c.png</p>']
    assert page.missing == [("step", Path("none.png")), ("s", Path("c.png"))]
    page.parts.clear()
    page.figures("s", items[2:], two=True)
    assert page.parts == ['<div class="figures two">' + figure.format("b.png", "b.png", "second") + "</div>"]
    page.parts.clear()
    page.figures("s", items[2:], wide=True, two=True)
    assert page.parts == ['<div><figure class="wide"><figcaption>second</figcaption><a href="../b.png"><img '
                          'src="../b.png" alt="b.png" loading="lazy"></a></figure></div>']
    page.parts.clear()
    page.figures("s", items[1:2])
    assert page.parts == ['<p class="missing">missing: c.png</p>']


def test_a_step_is_done_incomplete_or_missing(tmp_path):
    assert report.step_status(tmp_path, True, ": 3 <x>") == '<span class="done">done</span>: 3 &lt;x&gt;'
    assert report.step_status(tmp_path, False, ": 1 of 2") == '<span class="partial">incomplete</span>: 1 of 2'
    assert report.step_status(tmp_path / "none", False, ": 1") == '<span class="missing">missing</span>'
    assert report.step_status(tmp_path, True) == '<span class="done">done</span>'


def manifest(folder: Path, rows: list[tuple[str, str, str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "class", "split", "status", "reason"])
        writer.writerows([(f"s{i}", *r) for i, r in enumerate(rows)])


def test_the_data_section_counts_kept_images_per_class_and_split(tmp_path):
    data = tmp_path / "data"
    manifest(data, [("liver", "train", "ok", ""), ("heart", "test", "ok", ""), ("liver", "train", "ok", ""),
                    ("liver", "val", "ok", ""), ("heart", "train", "skipped", "too small"), ("zeta", "", "skipped", ""),
                    ("heart", "", "skipped", "too small"), ("heart", "", "duplicate", "")])
    (data / "contact_sheets").mkdir()
    (data / "contact_sheets" / "heart.png").write_text("")
    page = report.Page(tmp_path / "report.html")
    assert report.data_section(page, data) == ["heart", "liver"]
    text = "".join(page.parts)
    assert report.table(["class", "train", "val", "test", "total"],
                        [["heart", "0", "0", "1", "1"], ["liver", "2", "1", "0", "3"], ["all", "2", "1", "1", "4"]]) in text
    assert report.table(["reason", "files"], [["too small", "2"], ["(no reason given)", "2"]]) in text
    assert 'href="data/contact_sheets/heart.png"' in text and "scan_area_samples" not in text
    assert page.missing == [("prepare", data / "per_class_by_split.png"), ("prepare", data / "contact_sheets" / "liver.png")]
    (data / "scan_area_samples.png").write_text("")
    manifest(data, [("liver", "train", "ok", "")])
    page = report.Page(tmp_path / "report.html")
    assert report.data_section(page, data) == ["liver"]
    text = "".join(page.parts)
    assert '<div class="figures two"><figure><a href="data/scan_area_samples.png">' in text
    assert "Sources not used" not in text
    page = report.Page(tmp_path / "report.html")
    assert report.data_section(page, tmp_path / "none") == []
    assert page.missing == [("prepare", tmp_path / "none" / "manifest.csv")]
    assert page.parts[-1] == f'<p class="missing">missing: {tmp_path / "none" / "manifest.csv"} (run data_preprocessing/prepare.py)</p>'


def test_scalar_metrics_and_per_scale_lists_become_two_tables():
    metrics = {"loss": 0.123456, "epoch": 7, "name": "best.pth", "ok": True, "usage": [0.5, 0.25, 1],
               "perplexity": [1.0, 3.5, 12.345], "notes": {"a": 1}, "labels": ["a", "b", "c"], "none": None}
    assert report.scalar_and_scale_tables(metrics, ["1", "2", "4"]) == (
        report.table(["metric", "value"], [["loss", "0.123"], ["epoch", "7"], ["name", "best.pth"]])
        + report.table(["per scale", "1x1", "2x2", "4x4"], [["usage", "0.5", "0.25", "1"],
                                                            ["perplexity", "1", "3.5", "12.3"]]))
    assert report.scalar_and_scale_tables({"usage": [0.5, 0.25], "ppl": [1, 2, 3]}, ["1", "2", "4"]) == (
        report.table(["metric", "value"], [])
        + report.table(["per scale", "1x1", "2x2", "4x4"], [["usage", "0.5", "0.25"], ["ppl", "1", "2", "3"]]))
    assert report.scalar_and_scale_tables({"usage": [0.5, 0.25]}, ["1", "2", "4"]) == (
        report.table(["metric", "value"], []) + report.table(["per scale", "1", "2"], [["usage", "0.5", "0.25"]]))
    assert report.scalar_and_scale_tables({"kid": 2.0}, []) == report.table(["metric", "value"], [["kid", "2"]])


def test_the_vqvae_section_shows_its_test_metrics_and_the_last_val_reconstructions(tmp_path):
    folder = tmp_path / "vq"
    folder.mkdir()
    (folder / "test_metrics.json").write_text(json.dumps({"psnr": 23.4567, "usage": [0.5, 1]}))
    for name in ("recon_val_epoch2.png", "recon_val_epoch10.png", "recon_test.png", "loss.png", "gan.png"):
        (folder / name).write_text("")
    page = report.Page(tmp_path / "report.html")
    report.vqvae_section(page, folder, ["1", "2"])
    text = "".join(page.parts)
    assert report.scalar_and_scale_tables({"psnr": 23.4567, "usage": [0.5, 1]}, ["1", "2"]) in text
    assert 'href="vq/recon_val_epoch10.png"' in text and "recon_val_epoch2" not in text
    assert '<div class="figures two"><figure><a href="vq/recon_test.png">' in text
    assert "Val images after epoch 10 (the last saved)." in text and 'href="vq/gan.png"' in text
    assert [p.name for _, p in page.missing] == ["psnr_ssim.png", "usage.png", "code_usage_hist.png",
                                                 "code_usage_hist_test.png", "class_counts.png"]
    for name in ("test_metrics.json", "recon_val_epoch2.png", "recon_val_epoch10.png", "gan.png"):
        (folder / name).unlink()
    page = report.Page(tmp_path / "report.html")
    report.vqvae_section(page, folder, [])
    assert "gan.png" not in "".join(page.parts)
    assert [p.name for _, p in page.missing][-2:] == ["test_metrics.json", "recon_val_epochNNN.png"]
    assert (f'<p class="missing">missing: {folder / "test_metrics.json"} (written when training has finished)</p>'
            in page.parts)
    assert {s for s, _ in page.missing} == {"train_vqvae"}
    page = report.Page(tmp_path / "report.html")
    report.vqvae_section(page, tmp_path / "none", [])
    assert page.missing == [("train_vqvae", tmp_path / "none")]


def test_the_tokens_section_lists_the_token_files_and_the_classes(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "b.npz").write_bytes(b"x" * 1_234_567)
    (folder / "a.npz").write_bytes(b"x" * 5000)
    (folder / "classes.json").write_text('["heart", "li<ver"]')
    page = report.Page(tmp_path / "report.html")
    report.tokens_section(page, folder)
    text = "".join(page.parts)
    assert report.table(["token file", "size"], [["a.npz", "0.01 MB"], ["b.npz", "1.23 MB"]]) in text
    assert "Classes (label = position): heart, li&lt;ver</p>" in text and page.missing == []
    (folder / "classes.json").unlink()
    page = report.Page(tmp_path / "report.html")
    report.tokens_section(page, folder)
    assert "Classes" not in "".join(page.parts)
    for f in (folder / "a.npz", folder / "b.npz"):
        f.unlink()
    for where in (folder, tmp_path / "none"):
        page = report.Page(tmp_path / "report.html")
        report.tokens_section(page, where)
        assert page.missing == [("tokenize", where / "tokens_multiscale_maps.npz")]
        assert page.parts[-1] == (f'<p class="missing">missing: {where / "tokens_multiscale_maps.npz"} '
                                  '(run tokenize_multiscale_maps.py)</p>')


def history(folder: Path, records: list, epochs: int | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "history.json").write_text(json.dumps(records))
    if epochs is not None:
        (folder / "config.json").write_text(json.dumps({"epochs": epochs}))


def test_the_var_section_names_the_best_epochs_and_spaces_the_sample_grids(tmp_path):
    folder = tmp_path / "var"
    history(folder, [{"epoch": 1, "val_loss": 3.0, "kid": 0.5}, {"epoch": 2, "val_loss": 2.5, "kid": None},
                     {"epoch": 3, "val_loss": 2.75, "kid": 0.25}, {"epoch": 4, "val_loss": 2.5004, "kid": 0.3},
                     {"epoch": 5}, "junk"], epochs=9)
    (folder / "samples").mkdir()
    for e in range(1, 8):
        (folder / "samples" / f"epoch_{e:03d}.png").write_text("")
    (folder / "kid.png").write_text("")
    page = report.Page(tmp_path / "report.html")
    report.var_section(page, folder, 3)
    text = "".join(page.parts)
    assert ("4 of 9 epochs done; lowest val cross-entropy 2.500 nats at epoch 2 (best.pth); lowest KID of its samples "
            "against the val images 0.2500 at epoch 3 (best_kid.pth).") in text
    assert " 7 epochs saved; 3 shown, evenly spaced." in text
    shown = [e for e in range(1, 8) if f'href="var/samples/epoch_{e:03d}.png"' in text]
    assert shown == [1, 4, 7] and "after epoch 4</figcaption>" in text and 'href="var/kid.png"' in text
    assert page.missing == [("train_var", folder / name) for name in ("loss.png", "accuracy.png", "lr.png")]

    history(folder, [{"epoch": 1, "val_loss": 3.0}], epochs=None)
    (folder / "config.json").unlink()
    (folder / "kid.png").unlink()
    page = report.Page(tmp_path / "report.html")
    report.var_section(page, folder, 7)
    text = "".join(page.parts)
    assert "1 of ? epochs done; lowest val cross-entropy 3.000 nats at epoch 1 (best.pth).</p>" in text
    assert "epochs saved" not in text and "kid.png" not in text
    assert sum(f'href="var/samples/epoch_{e:03d}.png"' in text for e in range(1, 8)) == 7

    history(folder, [{"epoch": 1}], epochs=2)
    for p in (folder / "samples").iterdir():
        p.unlink()
    page = report.Page(tmp_path / "report.html")
    report.var_section(page, folder, 7)
    assert "epochs done" not in "".join(page.parts)
    assert page.missing[-1] == ("train_var", folder / "samples" / "epoch_NNN.png")
    (folder / "history.json").unlink()
    page = report.Page(tmp_path / "report.html")
    report.var_section(page, folder, 7)
    assert page.missing[0] == ("train_var", folder / "history.json")
    page = report.Page(tmp_path / "report.html")
    report.var_section(page, tmp_path / "none", 7)
    assert page.missing == [("train_var", tmp_path / "none")]


def sweep_manifest(folder: Path, points: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "samples_manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "point", "class"])
        writer.writerows([(f"{p}/{i}.png", p, "a") for i, p in enumerate(points)])


def test_the_sweep_section_counts_images_per_point_in_reading_order(tmp_path):
    folder = tmp_path / "samples"
    sweep_manifest(folder, ["TP_K2_cfg1.5", "NOP_cfg1.5", "TP_K2_cfg1.5", "TP_K1_cfg1.5", "NOP_cfg0"])
    (folder / "grids").mkdir()
    (folder / "grids" / "NOP_cfg0.png").write_text("")
    page = report.Page(tmp_path / "report.html")
    assert report.sweep_section(page, folder, ["1", "2"]) == ["NOP_cfg0", "NOP_cfg1.5", "TP_K1_cfg1.5", "TP_K2_cfg1.5"]
    text = "".join(page.parts)
    assert report.table(["sweep point", "images", "what it is"],
                        [[p, n, report.describe_point(p, ["1", "2"])] for p, n in
                         (("NOP_cfg0", "1"), ("NOP_cfg1.5", "1"), ("TP_K1_cfg1.5", "1"), ("TP_K2_cfg1.5", "2"))],
                        text_columns=3) in text
    assert ('<figure class="wide"><figcaption><b>NOP_cfg0</b>: no prefix: every scale generated from the class label, '
            'guidance 0</figcaption><a href="samples/grids/NOP_cfg0.png">') in text
    assert page.missing == [("sample_var", folder / "grids" / f"{p}.png") for p in ("NOP_cfg1.5", "TP_K1_cfg1.5",
                                                                                    "TP_K2_cfg1.5")]
    page = report.Page(tmp_path / "report.html")
    assert report.sweep_section(page, tmp_path / "none", []) == []
    assert page.missing == [("sample_var", tmp_path / "none" / "samples_manifest.csv")]
    assert page.parts[-1] == f'<p class="missing">missing: {tmp_path / "none" / "samples_manifest.csv"} (run sample_var.py)</p>'


COLUMNS = eval_var.COLUMNS + ["usage_1", "usage_4", "entropy_1", "entropy_4"]


def metrics_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)


def test_metric_scales_are_the_usage_columns_of_metrics_csv(tmp_path):
    metrics_csv(tmp_path / "m.csv", [])
    assert report.metric_scales(tmp_path / "m.csv") == ["1", "4"]
    assert report.metric_scales(tmp_path / "none.csv") == []
    (tmp_path / "e.csv").write_text("")
    assert report.metric_scales(tmp_path / "e.csv") == []


def test_the_metrics_table_rounds_each_column_groups_points_and_leaves_out_blank_columns(tmp_path):
    path = tmp_path / "eval" / "metrics.csv"
    metrics_csv(path, [
        {"point": "TP_K1_cfg1.5", "class": "a", "n": "4", "kid": "0.1234567", "kid_lo": "0.1", "kid_hi": "0.15", "recall": "0.5",
         "psnr_teacher": "21.46", "diversity": "0.30000", "usage_1": "0.5", "usage_4": "0.125", "entropy_1": "1.5",
         "entropy_4": "3.14159"},
        {"point": "TP_K1_cfg1.5", "class": "all", "n": "8", "kid": "0.2", "fid": "123.456",
         "psnr_teacher": "100", "usage_1": "0.25", "usage_4": "", "entropy_1": "1", "entropy_4": ""},
        {"point": "REAL", "class": "all", "n": "9", "kid": "-0.01", "kid_lo": "-0.0301", "kid_hi": "0.02", "copy_fraction": "0.1111",
         "usage_1": "", "usage_4": "", "entropy_1": "", "entropy_4": ""},
        {"point": "NOP_cfg1.5", "class": "all", "n": "3", "usage_1": "1", "usage_4": "0.0625", "entropy_1": "0",
         "entropy_4": "2"}])
    page = report.Page(tmp_path / "report.html")
    report.metrics_tables(page, path, ["1", "4"])
    text = "".join(page.parts)
    shown = ["n", "kid", "fid", "recall", "diversity", "psnr_teacher", "copy_fraction"]
    head = "".join(f'<th title="{report.esc(report.METRICS[c].meaning)}">{report.esc(report.METRICS[c].heading)}</th>'
                   for c in shown)
    assert f'<th class="text">class</th>{head}</tr></thead>' in text
    left_out = [report.METRICS[c].heading for c in report.METRICS if c not in shown]
    assert f" Left out, blank everywhere: {report.esc(', '.join(left_out))}.</p>" in text

    def point(name, rows):
        cells = []
        for i, (cls, values) in enumerate(rows):
            first = (f'<td class="text" rowspan="{len(rows)}" title="{report.esc(report.describe_point(name, ["1", "4"]))}">'
                     f'<b>{name}</b></td>' if i == 0 else "")
            cells.append(f'<tr{report.ALL_CLASS if cls == "all" else ""}>{first}<td class="text">{cls}</td>'
                         + "".join(f"<td>{report.esc(v)}</td>" for v in values) + "</tr>")
        return f'<tbody class="point">{"".join(cells)}</tbody>'

    assert (point("REAL", [("all", ["9", "-0.010 [-0.030, 0.020]", "", "", "", "", "0.111"])])
            + point("NOP_cfg1.5", [("all", ["3", "", "", "", "", "", ""])])
            + point("TP_K1_cfg1.5", [("a", ["4", "0.123 [0.100, 0.150]", "", "0.50", "0.300", "21.5", ""]),
                                     ("all", ["8", "0.200", "123.5", "", "", "100.0", ""])])
            + "</table></div>") in text
    assert report.table(["column", "meaning"], [[report.METRICS[c].heading, report.METRICS[c].meaning] for c in shown],
                        text_columns=2) in text
    assert report.table(["point", "usage 1x1", "usage 4x4", "entropy 1x1", "entropy 4x4"],
                        [["NOP_cfg1.5", "100%", "6%", "0.00", "2.00"], ["TP_K1_cfg1.5", "25%", "", "1.00", ""]],
                        css="metrics") in text
    assert 'per-class values are in <a href="eval/metrics.csv">metrics.csv</a>' in text.replace("Per-class", "per-class")

    metrics_csv(path, [{"point": "REAL", "class": "all", **{c: "1" for c in report.METRICS}}])
    page = report.Page(tmp_path / "report.html")
    report.metrics_tables(page, path, [])
    text = "".join(page.parts)
    assert "Left out" not in text and "Token statistics" not in text
    page = report.Page(tmp_path / "report.html")
    report.metrics_tables(page, path, ["1", "4"])
    assert "Token statistics" not in "".join(page.parts)


def test_the_eval_section_shows_the_tables_and_lists_missing_plots(tmp_path):
    folder = tmp_path / "eval"
    metrics_csv(folder / "metrics.csv", [{"point": "REAL", "class": "all", "n": "9", "usage_1": "0.5", "usage_4": "1",
                                          "entropy_1": "1", "entropy_4": "2"}])
    (folder / "kid_vs_k.png").write_text("")
    page = report.Page(tmp_path / "report.html")
    report.eval_section(page, folder)
    text = "".join(page.parts)
    assert report.table(["point", "usage 1x1", "usage 4x4", "entropy 1x1", "entropy 4x4"],
                        [["REAL", "50%", "100%", "1.00", "2.00"]], css="metrics") in text
    assert '<div class="figures two"><figure><a href="eval/kid_vs_k.png">' in text
    assert [p.name for _, p in page.missing] == ["metrics.json", "feature_diversity_vs_k.png",
                                                 "coverage_vs_recon_vs_k.png", "diversity_vs_k.png",
                                                 "teacher_similarity_vs_k.png",
                                                 "token_usage_entropy.png", "memorisation_hist.png",
                                                 "memorisation_pairs.png"]  # metrics.json: the copy controls
    assert {s for s, _ in page.missing} == {"eval_var"}
    controls = {"planted_recon_flagged": 1.0, "planted_augmented_flagged": None, "held_out_recon_flagged": 0.05,
                "per_class": 10}
    (folder / "metrics.json").write_text(json.dumps({"info": {"controls": controls, "copy_split": "val",
                                                              "ref_split": "test"}, "rows": []}))
    page = report.Page(tmp_path / "report.html")
    report.eval_section(page, folder)
    assert report.table(["control", "flagged", "should be"],
                        [["planted training reconstructions (10 per class)", "100%", ">= 95%"],
                         ["planted augmented copies (10 per class)", "", ">= 95%"],
                         ["test reconstructions (held out)", "5%", "<= 5%"]]) in "".join(page.parts)
    page = report.Page(tmp_path / "report.html")
    report.eval_section(page, tmp_path / "none")
    assert page.missing == [("eval_var", tmp_path / "none" / "metrics.csv")]


def test_each_config_is_shown_as_indented_json_or_listed_as_missing(tmp_path):
    (tmp_path / "c.json").write_text('{"lr": 0.001, "name": "<a>"}')
    page = report.Page(tmp_path / "report.html")
    report.config_section(page, [("train", tmp_path / "c.json"), ("sample", tmp_path / "none.json")])
    assert page.parts[1] == (f"<details><summary>train: {tmp_path / 'c.json'}</summary><pre>{{\n  &quot;lr&quot;: 0.001,"
                             f"\n  &quot;name&quot;: &quot;&lt;a&gt;&quot;\n}}</pre></details>")
    assert page.missing == [("sample", tmp_path / "none.json")]


def folders(tmp_path: Path) -> report.Config:
    runs = tmp_path / "runs"
    return report.Config(data_dir=str(runs / "data"), vqvae_dir=str(runs / "vq"), tokens_dir=str(runs / "tok"),
                         var_dir=str(runs / "var"), samples_dir=str(runs / "samples"), logs_dir=str(runs / "logs"),
                         out=str(runs / "report.html"), title="Run <1>", epoch_grids=2)


def status_rows(text: str) -> list[str]:
    body = text.split('<h2 id="status">Steps</h2>')[1].split("<tbody>")[1].split("</tbody>")[0]
    return body.split("</tr>")[:-1]


def test_the_page_heads_with_each_step_s_status_the_logs_and_what_is_missing(tmp_path):
    cfg = folders(tmp_path)
    runs = tmp_path / "runs"
    text = report.build(cfg)
    assert text.startswith('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="generator" '
                           f'content="{report.GENERATOR}"><title>Run &lt;1&gt;</title><style>')
    assert "<h1>Run &lt;1&gt;</h1>" in text and text.endswith("</body></html>\n") and "Classes:" not in text
    assert [r.rsplit('<td class="text">', 1)[1] for r in status_rows(text)] == [
        '<span class="missing">missing</span></td>'] * 6
    assert "Step logs" not in text and '</tbody></table></div><details><summary class="missing">' in text
    assert ('</style></head><body><h1>Run &lt;1&gt;</h1>' in text and '<nav><a href="#data">data</a><a href="#vqvae">'
            'VQ-VAE</a><a href="#tokens">tokens</a><a href="#var">VAR</a><a href="#sweep">sweep</a><a href="#eval">'
            'evaluation</a><a href="#configs">configs</a></nav><h2 id="status">Steps</h2>' in text)
    missing = text.split('<summary class="missing">')[1].split("</details>")[0]
    assert missing.startswith("11 expected file(s) missing</summary><ul><li>prepare: ")
    assert f"<li>eval_var: {runs / 'samples' / 'eval' / 'config.json'}</li></ul>" in missing

    manifest(runs / "data", [("liver", "train", "ok", ""), ("heart", "val", "ok", "")])
    (runs / "data" / "config.json").write_text(json.dumps({"phantom_dir": str(runs / "phantoms"), "recipe": ""}))
    (runs / "phantoms").mkdir()
    (runs / "phantoms" / "config.json").write_text('{"n": 1}')
    (runs / "vq").mkdir()
    (runs / "vq" / "config.json").write_text(json.dumps({"scales": [1, 2]}))
    (runs / "tok").mkdir()
    history(runs / "var", [{"epoch": 1, "val_loss": 2.0}, {"epoch": 2, "val_loss": 1.0}], epochs=3)
    sweep_manifest(runs / "samples", ["NOP_cfg1", "TP_K2_cfg1", "NOP_cfg1"])
    metrics_csv(runs / "eval" / "metrics.csv", [{"point": "REAL", "class": "all", "n": "9", "usage_1": "1",
                                                 "usage_4": "1", "entropy_1": "1", "entropy_4": "1"}])
    (runs / "logs").mkdir()
    for step in ("report", "train_var", "prepare", "other"):
        (runs / "logs" / f"{step}.log").write_text("")
    text = report.build(replace(cfg, eval_dir=str(runs / "eval")))
    assert "Classes: heart, liver.</p>" in text
    rows = status_rows(text)
    assert [r.split('<td class="text">')[1] for r in rows] == [
        "data (prepare.py)</td>", "VQ-VAE (train_vqvae.py)</td>", "tokens (tokenize_multiscale_maps.py)</td>",
        "VAR (train_var.py)</td>", "samples (sample_var.py)</td>", "evaluation (eval_var.py)</td>"]
    link = '<td class="text"><a href="{0}">{1}</a></td>'
    assert rows[0] == ('<tr><td class="text">data (prepare.py)</td>' + link.format("data", runs / "data")
                       + '<td class="text"><span class="done">done</span>: 2 classes</td>')
    assert rows[1].endswith('<span class="partial">incomplete</span></td>')
    assert rows[2].endswith(link.format("tok", runs / "tok") + '<td class="text"><span class="partial">incomplete</span></td>')
    assert rows[3].endswith('<span class="partial">incomplete</span>: 2 of 3 epochs</td>')
    assert rows[4].endswith('<span class="done">done</span>: 2 sweep points</td>')
    assert rows[5] == ('<tr><td class="text">evaluation (eval_var.py)</td>' + link.format("eval", runs / "eval")
                       + '<td class="text"><span class="done">done</span></td>')
    assert ('<p class="caption">Step logs (run_demo.sh): <a href="logs/prepare.log">prepare.log</a>, '
            '<a href="logs/train_var.log">train_var.log</a>, <a href="logs/report.log">report.log</a></p>') in text
    # The sweep's points are described with metrics.csv's scales (1, 4), not the VQ-VAE config's (1, 2).
    assert report.esc(report.describe_point("TP_K2_cfg1", ["1", "4"])) in text
    assert f"<summary>make_phantoms: {runs / 'phantoms' / 'config.json'}</summary>" in text
    assert text.index("make_phantoms: ") < text.index("<summary>prepare: ")
    configs = text.split('<h2 id="configs">')[1]
    assert [s.split(":")[0] for s in configs.split("<summary>")[1:]] == ["make_phantoms", "prepare", "train_vqvae",
                                                                        "train_var"]
    missing = text.split('<summary class="missing">')[1].split("</summary>")[0]
    assert missing == f"{text.count('<li>')} expected file(s) missing"

    (runs / "tok" / "t.npz").write_text("")
    (runs / "vq" / "test_metrics.json").write_text("{}")
    history(runs / "var", [{"epoch": e, "val_loss": 1.0} for e in (1, 2, 3)], epochs=3)
    (runs / "data" / "config.json").write_text(json.dumps({"phantom_dir": str(runs / "phantoms"), "recipe": "r.json"}))
    text = report.build(replace(cfg, eval_dir=str(runs / "eval")))
    rows = status_rows(text)
    assert [r.count('<span class="done">done</span>') for r in rows] == [1, 1, 1, 1, 1, 1]
    assert rows[3].endswith("done</span>: 3 of 3 epochs</td>") and "make_phantoms" not in text
    (runs / "vq" / "config.json").write_text(json.dumps({"scales": [1, 2]}))
    (runs / "eval" / "metrics.csv").unlink()
    (runs / "data" / "config.json").write_text(json.dumps({"recipe": ""}))
    text = report.build(cfg)
    assert report.esc(report.describe_point("TP_K2_cfg1", ["1", "2"])) in text and "make_phantoms" not in text
    assert status_rows(text)[5].endswith('<span class="missing">missing</span></td>')
    (runs / "var" / "config.json").unlink()  # epochs unknown, no sweep points: no detail
    (runs / "samples" / "samples_manifest.csv").unlink()
    rows = status_rows(report.build(cfg))
    assert rows[3].endswith('incomplete</span></td>') and rows[4].endswith('incomplete</span></td>')


def test_main_writes_the_page_atomically_and_stops_on_an_unreadable_output(tmp_path, capsys):
    cfg = folders(tmp_path)
    args = [f"--{k}={v}" for k, v in vars(cfg).items()]
    report.main(args)
    page = tmp_path / "runs" / "report.html"
    assert page.read_text() == report.build(cfg)
    assert capsys.readouterr().out == f"wrote {page}: open it in a browser (file://{os.path.abspath(page)})\n"
    history(tmp_path / "runs" / "var", [], epochs=1)
    (tmp_path / "runs" / "var" / "history.json").write_text("[")
    with pytest.raises(SystemExit) as err:
        report.main(args)
    assert err.value.code == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'runs' / 'var' / 'history.json'}: not valid JSON")
    with pytest.raises(ConfigError):
        report.validate(replace(cfg, out=str(tmp_path / "x.txt")))
