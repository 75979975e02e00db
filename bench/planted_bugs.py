"""Bugs planted by hand, one at a time, where mutmut makes no mutants (decorated functions: the context managers of
common/io.py, DeadCodes.reinit under @torch.no_grad()). Each is planted in a scratch copy of TREE, and the given
tests run against it; a bug the tests do not notice survives. Prints each bug's fate and the score.

    python bench/planted_bugs.py . io tests/test_io.py -m "not e2e"
    python bench/planted_bugs.py . dead tests/test_train_vqvae.py -m "not e2e" -k "dead or reinit or counters"

TREE may be another checkout (e.g. an older commit's, for a before/after comparison) holding the same code.
"""
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

IO = "common/io.py"
VQ = "train_vqvae.py"
SETS = {
    "io": [
        ("_sync: no flush before the fsync", IO, "    handle.flush()\n    os.fsync(handle.fileno())", "    os.fsync(handle.fileno())"),
        ("_sync: no fsync", IO, "    handle.flush()\n    os.fsync(handle.fileno())", "    handle.flush()"),
        ("atomic_write: rename before the sync", IO, "        _sync(handle)\n        os.replace(tmp_name, path)\n",
         "        os.replace(tmp_name, path)\n        _sync(handle)\n"),
        ("atomic_write: no folder fsync", IO, "        os.replace(tmp_name, path)\n    _fsync_dir(path.parent)\n",
         "        os.replace(tmp_name, path)\n"),
        ("_fsync_dir: no fsync", IO, "    try:\n        os.fsync(fd)\n    except OSError:\n        pass\n", "    try:\n        pass\n    except OSError:\n        pass\n"),
        ("_fsync_dir: folder fd never closed", IO, "    finally:\n        os.close(fd)\n", "    finally:\n        pass\n"),
        ("_fsync_dir: a folder that cannot be opened fails the write", IO,
         "    except OSError:\n        return\n", "    except OSError:\n        raise\n"),
        ("_fsync_dir: a folder fsync error fails the write", IO, "        os.fsync(fd)\n    except OSError:\n        pass\n",
         "        os.fsync(fd)\n    except OSError:\n        raise\n"),
        ("atomic_write_group: each file renamed right after its own sync", IO,
         "                _sync(handle)\n            except OSError as err:\n                err.filename = str(path)\n                raise\n        for path, _, tmp_name in opened:\n            os.replace(tmp_name, path)\n",
         "                _sync(handle)\n            except OSError as err:\n                err.filename = str(path)\n                raise\n            os.replace(_, path)\n"),
        ("atomic_write_group: no folder fsync", IO, "    for folder in {path.parent for path, _, _ in opened}:\n        _fsync_dir(folder)\n", ""),
        ("atomic_write_group: only the first folder synced", IO, "    for folder in {path.parent for path, _, _ in opened}:\n",
         "    for folder in [path.parent for path, _, _ in opened][:1]:\n"),
        ("atomic_write_group: a failed sync not named by its file", IO, "                err.filename = str(path)\n                raise\n", "                raise\n"),
        ("atomic_write_group: renamed in reverse order", IO, "        for path, _, tmp_name in opened:\n            os.replace",
         "        for path, _, tmp_name in reversed(opened):\n            os.replace"),
    ],
    "dead": [
        ("reinit: always drawn with replacement", VQ, "if len(pool) >= len(dead)", "if False"),
        ("reinit: without replacement past the pool's size (cut short)", VQ, "if len(pool) >= len(dead)", "if True"),
        ("reinit: the draw seeded by seed + step", VQ, "manual_seed(seed * 1_000_003 + step)", "manual_seed(seed + step)"),
        ("reinit: the pool from every image", VQ, "feats = feats[:pool_images].float()", "feats = feats.float()"),
        ("reinit: the raw features at every scale", VQ, "rest = feats if k == 0 else feats - f_hats[k - 1]", "rest = feats"),
        ("reinit: residuals against the next scale", VQ, "feats - f_hats[k - 1]", "feats - f_hats[k]"),
        ("reinit: bilinear instead of area", VQ, 'mode="area")', 'mode="bilinear")'),
        ("reinit: moments kept", VQ, "                moment[rows] = 0\n", "                pass\n"),
        ("reinit: every tensor of the state zeroed", VQ, "if torch.is_tensor(moment) and moment.shape == weight.shape:", "if torch.is_tensor(moment) and moment.dim() > 0:"),
        ("reinit: no broadcast", VQ, "            torch_dist.broadcast(new, src=0)\n", "            pass\n"),
        ("reinit: no gather", VQ, "            torch_dist.all_gather(parts, feats.contiguous())\n            feats = torch.cat(parts)\n", "            pass\n"),
        ("reinit: every rank draws", VQ, "        if dist.is_main:\n            feats = feats[:pool_images]", "        if True:\n            feats = feats[:pool_images]"),
        ("reinit: counters not reset", VQ, "        self.since_hit[dead] = 0\n", ""),
        ("update: a code hit at one scale only stays unused", VQ, "torch.where(hits.sum(0) > 0, 0,", "torch.where(hits.min(0).values > 0, 0,"),
        ("dead: one step later", VQ, "self.since_hit >= self.after", "self.since_hit > self.after"),
        ("reinit: draws in reverse order", VQ, "new.copy_(pool[pick.to(pool.device)])", "new.copy_(pool[pick.flip(0).to(pool.device)])"),
    ],
}


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] not in SETS:
        sys.exit(f"usage: python bench/planted_bugs.py TREE {{{','.join(SETS)}}} TESTS... [pytest options]")
    tree, which, *pytest_args = sys.argv[1:]
    killed = 0
    for label, rel, old, new in SETS[which]:
        scratch = Path(tempfile.mkdtemp(prefix="hand_mut_"))
        shutil.copytree(tree, scratch / "t", ignore=shutil.ignore_patterns(".git", "runs", "data", "__pycache__"))
        path = scratch / "t" / rel
        text = path.read_text()
        assert text.count(old) == 1, (label, old)
        path.write_text(text.replace(old, new))
        res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *pytest_args],
                             cwd=scratch / "t", capture_output=True, text=True)
        shutil.rmtree(scratch)
        status = "killed" if res.returncode == 1 else "survived" if res.returncode == 0 else f"error {res.returncode}"
        killed += status == "killed"
        print(f"{status:9} {label}", flush=True)
        if status.startswith("error"):
            print(res.stdout[-1500:], res.stderr[-1500:])
    print(f"{which}: {killed} / {len(SETS[which])} killed")


if __name__ == "__main__":
    main()
