"""CLIP image and text embeddings with open_clip, batched, on CPU or CUDA.

The backbone is a model name plus either an open_clip pretrained tag or a local checkpoint file.
Both go through the same loading call, ``open_clip.create_model_and_transforms(name,
pretrained=<local file>)``: a tag is first resolved to its cached file (never downloaded when
``HF_HUB_OFFLINE`` is set), a checkpoint is used as is. Nothing pretrained is available offline,
so tests build a tiny model from ``tasks/model_configs/rs5m-tiny-vit.json``, save its random
weights with :func:`create_random_checkpoint` and load them like a real checkpoint.

Embeddings are L2-normalised float32 arrays here; the features stage stores them as float16 and
later stages (dedup, outliers) read them from there instead of recomputing them.

Command line (make a checkpoint for a tiny model)::

    python -m tasks.embed create-random-checkpoint rs5m-tiny-vit /path/tiny.pt
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

    from schemas.dedup_config import EmbedConfig

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
TINY_MODEL = "rs5m-tiny-vit"

_HOW_TO_PROVIDE = (
    "Provide weights in one of these ways: (1) set `checkpoint` to a local open_clip "
    "state-dict file (.pt/.pth/.bin/.safetensors), e.g. one downloaded elsewhere with "
    "`open_clip.create_model_and_transforms(name, pretrained=tag)` and copied from its cache; "
    "(2) set `pretrained` to a tag whose weights are already in the local open_clip/Hugging "
    "Face cache; (3) for tests and smoke runs, create random weights with "
    "`python -m tasks.embed create-random-checkpoint rs5m-tiny-vit /path/tiny.pt`."
)


class CheckpointNotFoundError(FileNotFoundError):
    """The model's weights are not available locally (and will not be downloaded)."""


_registered = False


def register_model_configs() -> list[str]:
    """Register the project's own open_clip model configs (``tasks/model_configs/*.json``).

    Idempotent; returns the names registered.
    """
    global _registered
    import open_clip

    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def create_random_checkpoint(model_name: str, path: str, seed: int = 0) -> str:
    """Build ``model_name`` with random weights and save its state dict at ``path``.

    The file loads through the same path as a real checkpoint
    (``open_clip.create_model_and_transforms(model_name, pretrained=path)``).
    """
    import open_clip
    import torch

    register_model_configs()
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name, pretrained=None, device="cpu")
    finally:
        torch.random.set_rng_state(state)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save({"state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)
    return str(path)


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, cached per (path, size, mtime) so fingerprints stay cheap."""
    st = os.stat(path)
    cache_key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if cache_key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _SHA_CACHE[cache_key] = h.hexdigest()
    return _SHA_CACHE[cache_key]


def weights_identity(
    model_name: str, pretrained: str | None = None, checkpoint: str | None = None
) -> str:
    """The backbone's identity without loading it: ``name@sha256:<file digest>`` for a
    checkpoint, ``name@<tag>`` for a pretrained tag. Equals ``ClipEmbedder(...).identity``."""
    if checkpoint is None and pretrained is not None and _looks_like_path(pretrained):
        checkpoint, pretrained = pretrained, None
    if checkpoint is not None:
        checkpoint = os.path.expanduser(str(checkpoint))
        if not os.path.isfile(checkpoint):
            raise CheckpointNotFoundError(
                f"checkpoint for {model_name} not found: {checkpoint}. {_HOW_TO_PROVIDE}"
            )
        return f"{model_name}@sha256:{file_sha256(checkpoint)}"
    if pretrained is not None:
        return f"{model_name}@{pretrained}"
    raise CheckpointNotFoundError(
        f"no weights given for {model_name}: set `checkpoint` or `pretrained` "
        f"(random weights are never used silently). {_HOW_TO_PROVIDE}"
    )


def _offline() -> bool:
    return any(
        os.environ.get(k, "").strip().lower() in {"1", "true", "yes", "on"}
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _resolve_tag(model_name: str, tag: str) -> str:
    """The local file of an open_clip pretrained tag; fails fast when it is not cached offline."""
    import open_clip
    from open_clip import pretrained as oc_pretrained

    cfg = oc_pretrained.get_pretrained_cfg(model_name, tag)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(model_name)
        raise CheckpointNotFoundError(
            f"'{tag}' is neither a file nor a known pretrained tag of {model_name} "
            f"(known tags: {known}). {_HOW_TO_PROVIDE}"
        )
    if "file" in cfg:
        return cfg["file"]
    url = cfg.get("url", "")
    hf = cfg.get("hf_hub", "")
    if _offline():
        if hf and oc_pretrained.has_hf_hub():
            # With HF_HUB_OFFLINE the hub client only looks in its cache: fast either way.
            try:
                return oc_pretrained.download_pretrained(cfg)
            except Exception as exc:
                raise CheckpointNotFoundError(
                    f"weights of {model_name} '{tag}' ({hf}) are not in the local Hugging Face "
                    f"cache and HF_HUB_OFFLINE is set, so they are not downloaded. "
                    f"{_HOW_TO_PROVIDE}"
                ) from exc
        cached = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if url and os.path.isfile(cached):
            return cached
        raise CheckpointNotFoundError(
            f"weights of {model_name} '{tag}' ({url or hf}) are not cached locally and "
            f"HF_HUB_OFFLINE is set, so they are not downloaded. {_HOW_TO_PROVIDE}"
        )
    return oc_pretrained.download_pretrained(cfg)


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available here")
    return device


class ClipEmbedder:
    """Embeds PIL images and captions with one open_clip model.

    ``embed_images`` and ``embed_texts`` return float32 arrays of shape ``(n, dim)``, each row
    L2-normalised (so inner product = cosine similarity).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        checkpoint: str | None = None,
        device: str = "cpu",
        batch_size: int = 64,
    ):
        import open_clip
        import torch

        register_model_configs()
        if model_name not in open_clip.list_models():
            raise ValueError(
                f"unknown open_clip model {model_name!r}; the project's own configs are "
                f"{register_model_configs()} (tasks/model_configs/)"
            )
        self.identity = weights_identity(model_name, pretrained, checkpoint)
        if checkpoint is None and pretrained is not None and _looks_like_path(pretrained):
            checkpoint, pretrained = pretrained, None
        if checkpoint is not None:
            weights = os.path.expanduser(str(checkpoint))
        else:
            weights = _resolve_tag(model_name, str(pretrained))

        self.model_name = model_name
        self.device = _resolve_device(device)
        self.batch_size = int(batch_size)
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=weights, device=self.device
        )
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self._torch = torch
        cfg = open_clip.get_model_config(model_name) or {}
        self.dim = int(cfg.get("embed_dim") or self.embed_texts(["x"]).shape[1])

    @classmethod
    def from_config(cls, cfg: EmbedConfig) -> ClipEmbedder:
        return cls(cfg.model_name, cfg.pretrained, cfg.checkpoint, cfg.device, cfg.batch_size)

    def __repr__(self) -> str:
        return f"ClipEmbedder({self.identity!r}, device={self.device!r})"

    def _autocast(self):
        torch = self._torch
        if self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.float16)
        return _nullcontext()

    def _finish(self, parts: list[np.ndarray]) -> np.ndarray:
        if not parts:
            return np.zeros((0, self.dim), np.float32)
        out = np.concatenate(parts).astype(np.float32, copy=False)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embeddings of the images, shape ``(len(images), dim)``, float32, L2-normalised."""
        torch = self._torch
        parts: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            batch = [
                self.preprocess(im if im.mode == "RGB" else im.convert("RGB"))
                for im in images[start : start + self.batch_size]
            ]
            x = torch.stack(batch).to(self.device, non_blocking=True)
            with torch.inference_mode(), self._autocast():
                feats = self.model.encode_image(x)
            parts.append(feats.float().cpu().numpy())
        return self._finish(parts)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of the captions, shape ``(len(texts), dim)``, float32, L2-normalised."""
        torch = self._torch
        parts: list[np.ndarray] = []
        for start in range(0, len(texts), self.batch_size):
            batch = ["" if t is None else str(t) for t in texts[start : start + self.batch_size]]
            tokens = self.tokenizer(batch).to(self.device, non_blocking=True)
            with torch.inference_mode(), self._autocast():
                feats = self.model.encode_text(tokens)
            parts.append(feats.float().cpu().numpy())
        return self._finish(parts)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _looks_like_path(value: str) -> bool:
    return (
        os.sep in value
        or value.startswith((".", "~"))
        or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) in (3, 4) and args[0] == "create-random-checkpoint":
        seed = int(args[3]) if len(args) == 4 else 0
        print(create_random_checkpoint(args[1], args[2], seed=seed))
        return 0
    print("usage: python -m tasks.embed create-random-checkpoint MODEL PATH [SEED]")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
