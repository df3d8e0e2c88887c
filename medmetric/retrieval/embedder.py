"""A trained stage-1 model as an image -> embedding function, with a fingerprint of what it computes.

The retrieval embedding is the stage-1 projector output (L2-normalised, the space the metric
loss shaped) by default, or the backbone's pooled features (``embedding="backbone"``),
L2-normalised too so that an inner product is a cosine similarity in both cases.

The fingerprint hashes the weights actually used (tensor values, not the file, so the same
model read from a handoff manifest or from a Lightning checkpoint gives the same value), the
backbone config, the embedding choice and the eval transform (image size, normalisation). An
index built with one fingerprint must not be searched with embeddings of another.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from medmetric.lightning_modules.backbones import create_backbone
from medmetric.lightning_modules.heads import Projector

EMBEDDINGS = ("projector", "backbone")
EVAL_TRANSFORM = "resize + ImageNet normalisation (medmetric.datamodules.transforms preset 'none')"


class EmbedderError(ValueError):
    """The model cannot be loaded as an embedder (missing files, unknown layout)."""


class EmbeddingNet(nn.Module):
    """backbone -> (projector) -> L2 normalisation."""

    def __init__(self, backbone: nn.Module, projector: nn.Module | None):
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        return F.normalize(self.projector(features) if self.projector is not None else features, dim=1)


@dataclass
class Embedder:
    net: EmbeddingNet
    image_size: int
    embedding: str
    dim: int
    fingerprint: str
    source: str
    backbone: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {
            "source": self.source, "backbone": self.backbone, "embedding": self.embedding,
            "image_size": self.image_size, "transform": EVAL_TRANSFORM, "dim": self.dim,
        }


def weights_sha256(*modules: nn.Module) -> str:
    digest = hashlib.sha256()
    for module in modules:
        for key, tensor in sorted(module.state_dict().items()):
            array = tensor.detach().cpu().contiguous().numpy()
            digest.update(f"{key}:{array.dtype}:{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def _image_size_from_run(run_dir: Path | None) -> int | None:
    """The stage-1 run's data.image_size from its saved config.yaml, if there is one."""
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return None
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    data = config.get("data") or {}
    size = (data.get("init_args") or data).get("image_size")
    return int(size) if size else None


def _split_state(state: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def _from_manifest(path: Path) -> tuple[dict, dict, dict | None, int, Path | None]:
    from medmetric.run_io.manifest import read_manifest

    manifest = read_manifest(path)
    backbone_state = torch.load(manifest["backbone_weights"], map_location="cpu", weights_only=True)
    projector_path = manifest.get("projector_weights")
    projector_state = (
        torch.load(projector_path, map_location="cpu", weights_only=True)
        if projector_path and Path(projector_path).is_file() else None
    )
    run_dir = Path(manifest["stage1_run_dir"]) if manifest.get("stage1_run_dir") else path.parent
    return manifest["backbone"], backbone_state, projector_state, manifest.get("embedding_dim"), run_dir


def _from_checkpoint(path: Path) -> tuple[dict, dict, dict | None, int, Path | None]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors, unsafe globals
        raise EmbedderError(f"{path} is not a loadable Lightning checkpoint ({type(err).__name__}: {err})") from err
    hp = checkpoint.get("hyper_parameters") or {}
    if "backbone" not in hp or "state_dict" not in checkpoint:
        raise EmbedderError(f"{path} is not a medmetric stage-1 checkpoint (no backbone hyper-parameter)")
    state = checkpoint["state_dict"]
    projector = _split_state(state, "projector") or None
    config = {"name": hp["backbone"], "in_chans": hp.get("in_chans", 3), "kwargs": dict(hp.get("backbone_kwargs") or {})}
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return config, _split_state(state, "backbone"), projector, hp.get("embedding_dim"), run_dir


def resolve_model_path(model: str | Path) -> Path:
    """A handoff.json, a Lightning .ckpt, or a folder holding handoff.json (run or experiment)."""
    path = Path(model)
    if path.is_dir() and (path / "handoff.json").is_file():
        return path / "handoff.json"
    if not path.is_file():
        raise EmbedderError(
            f"model not found: {path}. Give a stage-1 handoff.json (runs/<experiment>/handoff.json), "
            "its run folder, or a stage-1 checkpoint (.ckpt)"
        )
    return path


def load_embedder(model: str | Path, embedding: str = "projector", image_size: int | None = None) -> Embedder:
    """Rebuild a stage-1 model's embedding network from a handoff manifest or a checkpoint.

    ``image_size`` defaults to the stage-1 run's ``data.image_size`` (its config.yaml).
    """
    if embedding not in EMBEDDINGS:
        raise EmbedderError(f"unknown embedding {embedding!r} (--embedding); valid: {list(EMBEDDINGS)}")
    path = resolve_model_path(model)
    loader = _from_checkpoint if path.suffix == ".ckpt" else _from_manifest
    config, backbone_state, projector_state, embedding_dim, run_dir = loader(path)
    backbone, feature_dim = create_backbone(config["name"], in_chans=config.get("in_chans", 3), **config.get("kwargs", {}))
    backbone.load_state_dict(backbone_state)
    projector = None
    if embedding == "projector":
        if projector_state is None or not embedding_dim:
            raise EmbedderError(f"{path} has no projector weights; use --embedding backbone")
        projector = Projector(feature_dim, int(embedding_dim))
        projector.load_state_dict(projector_state)
    image_size = image_size or _image_size_from_run(run_dir)
    if not image_size:
        raise EmbedderError(f"cannot tell the image size {path} was trained at (no config.yaml in {run_dir}); pass --image_size")
    net = EmbeddingNet(backbone, projector).eval()
    parts = [weights_sha256(*(m for m in (backbone, projector) if m is not None)),
             json.dumps(config, sort_keys=True), embedding, str(image_size), EVAL_TRANSFORM]
    fingerprint = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    dim = int(embedding_dim) if projector is not None else int(feature_dim)
    # runs/<experiment>/handoff.json is "the latest stage 1" and moves on; record the run's own copy
    own = run_dir / "handoff.json" if run_dir is not None and loader is _from_manifest else None
    source = own if own is not None and own.is_file() else path
    return Embedder(net, int(image_size), embedding, dim, fingerprint, str(source.resolve()), config)


class _PathDataset(Dataset):
    def __init__(self, paths: Sequence[str], image_size: int):
        from medmetric.datamodules.histopathology import load_patch
        from medmetric.datamodules.transforms import build_transform

        self.paths = list(paths)
        self.load = load_patch
        self.transform = build_transform("none", image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(image=self.load(self.paths[i]))["image"]


@torch.no_grad()
def embed_paths(
    embedder: Embedder, paths: Sequence[str], batch_size: int = 64, num_workers: int = 0,
    device: str = "cpu", progress: bool = True, desc: str = "embedding",
) -> Iterator[np.ndarray]:
    """Stream float32 (batch, dim) embeddings of ``paths``, in order, read from disk batch by batch."""
    from tqdm import tqdm

    net = embedder.net.to(device)
    loader = DataLoader(_PathDataset(paths, embedder.image_size), batch_size=batch_size, num_workers=num_workers)
    with tqdm(total=len(paths), unit="img", desc=desc, disable=not progress) as bar:
        for images in loader:
            yield net(images.to(device)).float().cpu().numpy()
            bar.update(len(images))
