"""Model builders, weights specs, safe checkpoints, masks and the per-image fallback."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from models import weights as W
from models.detection import build_detector
from models.embedding import build_embedder
from models.errors import LakelensError
from models.masks import crop_to_rle, rle_to_mask
from models.predict import DetectionPredictor, EmbeddingPredictor, predict_each
from models.registry import ARCH_NAMES, DEFAULT_ARCHS, TASKS, arch_choices


def test_every_task_has_its_default_and_a_tiny_arch() -> None:
    for task in TASKS:
        assert DEFAULT_ARCHS[task] in arch_choices(task)
        assert any("tiny" in a for a in arch_choices(task))
    with pytest.raises(LakelensError, match="choose from"):
        build_detector("yolo", weights="random")


def test_the_arch_names_checked_without_torch_are_the_builders_own() -> None:
    from models.detection import DETECTION_ARCHS
    from models.embedding import EMBED_ARCHS
    from models.semantic import SEMANTIC_ARCHS

    builders = {task: sorted(n for n, spec in DETECTION_ARCHS.items() if spec.task == task)
                for task in ("detect", "segment", "pose")}
    builders |= {"semantic": sorted(SEMANTIC_ARCHS), "embed": sorted(EMBED_ARCHS)}
    assert {t: sorted(names) for t, names in ARCH_NAMES.items()} == builders


def test_a_job_config_is_checked_without_importing_torch() -> None:
    """The CLI starts Ray while torch imports: its config must not import torch first."""
    import subprocess
    import sys

    code = ("import sys; from pipelines.config import AnnotateConfig; "
            "AnnotateConfig(sources=('x',), out='o', tasks=('detect', 'embed'), "
            "archs={'detect': 'fasterrcnn_tiny'}, weights={'embed': 'random'}); "
            "import pipelines.annotate.connect; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("arch", ["fasterrcnn_tiny", "maskrcnn_tiny", "keypointrcnn_tiny"])
def test_random_weights_are_seeded(arch: str) -> None:
    a, info = build_detector(arch, weights="random")
    b, _ = build_detector(arch, weights="random")
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka
    assert info.weights_id == "random:seed0"


def test_checkpoint_round_trip_keeps_labels_and_weights(tmp_path: Path) -> None:
    model, _ = build_detector("keypointrcnn_tiny", weights="random", num_keypoints=4)
    path = tmp_path / "pose.pt"
    W.save_checkpoint(path, model.state_dict(), {"arch": "keypointrcnn_tiny", "task": "pose",
                                                 "labels": ["__background__", "shape"],
                                                 "keypoint_names": ["a", "b", "c", "d"]})
    loaded, info = build_detector("keypointrcnn_tiny", weights=str(path))
    assert info.labels == ("__background__", "shape")
    assert info.keypoint_names == ("a", "b", "c", "d")
    assert info.weights_id.startswith("sha256:")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_checkpoint_needing_code_execution_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    path.write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(LakelensError, match="refused"):
        W.read_checkpoint(str(path))


def test_checkpoint_for_another_arch_is_a_clear_error(tmp_path: Path) -> None:
    model, _ = build_detector("fasterrcnn_tiny", weights="random")
    W.save_checkpoint(tmp_path / "d.pt", model.state_dict(), {"arch": "fasterrcnn_tiny"})
    with pytest.raises(LakelensError, match="is for segment arch 'fasterrcnn_tiny'"):
        build_detector("maskrcnn_tiny", weights=str(tmp_path / "d.pt"))
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # a bare state dict, no metadata
    with pytest.raises(LakelensError, match="does not fit arch"):
        build_detector("keypointrcnn_tiny", weights=str(tmp_path / "bare.pt"))


def test_safetensors_checkpoint_loads(tmp_path: Path) -> None:
    import json

    from safetensors.torch import save_file

    model, _, _ = build_embedder("tiny", weights="random")
    save_file(model.state_dict(), tmp_path / "e.safetensors",
              metadata={"lakelens": json.dumps({"arch": "tiny"})})
    loaded, info, _ = build_embedder("tiny", weights=str(tmp_path / "e.safetensors"))
    assert info.weights_id.startswith("sha256:") and info.embedding_dim == 128
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(model(x), loaded(x))


def test_weights_spec_validation_and_offline_default() -> None:
    with pytest.raises(LakelensError, match="'default'.*'random'"):
        W.validate_spec("/no/such/checkpoint.pt")
    with pytest.raises(LakelensError, match="--weights random"):
        # Port 9 (discard) on loopback refuses at once: as offline as a machine gets.
        W.ensure_default_available("http://127.0.0.1:9/lakelens-test-weights.pth", what="detect")


def test_crop_to_rle_matches_direct_threshold_and_scales() -> None:
    prob = np.zeros((20, 30), np.float32)
    prob[5:15, 10:25] = 0.9
    crop = prob[3:18, 8:28]
    rle = crop_to_rle(crop, 3, 8, scale_y=1.0, scale_x=1.0, height=20, width=30)
    assert np.array_equal(rle_to_mask(rle), (prob >= 0.5).astype(np.uint8))
    rle2 = crop_to_rle(crop, 3, 8, scale_y=2.0, scale_x=2.0, height=40, width=60)
    mask2 = rle_to_mask(rle2)
    assert mask2.shape == (40, 60)
    ys, xs = np.nonzero(mask2)
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (10, 30, 20, 50)


def test_failing_image_is_isolated_and_others_keep_their_outputs() -> None:
    det = DetectionPredictor("fasterrcnn_tiny", weights="random", image_size=64)
    good = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    bad = good[:, :, :2]  # two channels: the model's normalisation raises
    out = predict_each(det, [good, bad, good])
    assert isinstance(out[1], RuntimeError)
    assert isinstance(out[0], dict) and isinstance(out[2], dict)
    assert out[0]["boxes"].shape[1] == 4


class _OomOnBatches(EmbeddingPredictor):
    """A real embedder whose device 'runs out of memory' on batches of more than one."""

    def __call__(self, images):
        if len(images) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return super().__call__(images)


def test_out_of_memory_halves_the_sub_batch_and_retries_per_image() -> None:
    emb = _OomOnBatches("tiny", weights="random", max_batch=8)
    images = [np.full((32, 32, 3), v, np.uint8) for v in (10, 120, 240)]
    out = predict_each(emb, images)
    assert emb.max_batch == 4
    assert all(isinstance(o, np.ndarray) and o.shape == (128,) for o in out)
    np.testing.assert_allclose([np.linalg.norm(o) for o in out], 1.0, rtol=1e-5)


@pytest.mark.gpu
def test_predictors_run_on_cuda_with_autocast() -> None:
    det = DetectionPredictor("fasterrcnn_tiny", weights="random", image_size=64, device="cuda")
    emb = EmbeddingPredictor("tiny", weights="random", device="cuda")
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    assert det([image])[0]["boxes"].dtype == np.float32
    e = emb([image, image])
    assert len(e) == 2 and abs(float(np.linalg.norm(e[0])) - 1) < 1e-3


@pytest.mark.gpu
def test_cuda_embeddings_match_cpu_within_autocast_tolerance() -> None:
    """channels_last + bf16/fp16 autocast on CUDA: the same embedding as fp32 on CPU."""
    images = [np.random.default_rng(i).integers(0, 255, (64, 80, 3), dtype=np.uint8) for i in range(4)]
    cpu = EmbeddingPredictor("resnet18", weights="random", device="cpu")(images)
    gpu_pred = EmbeddingPredictor("resnet18", weights="random", device="cuda")
    assert gpu_pred.channels_last
    gpu = gpu_pred(images)
    for a, b in zip(cpu, gpu, strict=True):
        assert float(np.dot(a, b)) > 0.99  # unit vectors: cosine similarity
