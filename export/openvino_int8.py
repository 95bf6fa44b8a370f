"""int8 OpenVINO IR: NNCF post-training quantisation of the checked f32 IR, calibrated on training images and
judged by COCO AP.

int8 arithmetic cannot meet the f32 export check's per-query tolerance, so an int8 IR is judged by what it is for:
its AP on the recipe's validation set beside the f32 IR's, measured during the export. When int8 falls more than
``max_ap_drop`` below f32, nothing is written (:class:`ApDropTooLarge`). The calibration images are images of the
recipe's training set spread evenly over it, pre-processed exactly as evaluation pre-processes them
(:class:`dino.predict.preprocess.Preprocessor`: resized, letterboxed to the export canvas, padding mask).

The scheme (:data:`SCHEME`: NNCF's model type and the nodes kept in float) was chosen by measured AP: on the trained
quickstart model TRANSFORMER lost 0.006 AP against f32 and NNCF's default 0.078; the ignored scopes of
:data:`SCHEMES` were measured only on a checkpoint after one epoch, where every scheme was within noise
(docs/deployment.md "int8"). ``nncf`` is imported only when used.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from pathlib import Path

import numpy as np
import onnx

import dino
from dino.config import DataConfig, Recipe
from dino.data import build_dataset
from dino.errors import CheckFailure, UserError
from dino.predict.openvino_runtime import inference_precision, openvino, set_precision
from dino.predict.preprocess import Preprocessor

DEFAULT_CALIBRATION_IMAGES = 300
DEFAULT_MAX_AP_DROP = 0.01
AP_KEY = "dino.int8_ap"  # rt_info: the AP gate's line, int8 against f32 on the validation set at export


@dataclasses.dataclass(frozen=True)
class Int8Scheme:
    """What NNCF quantises: ``transformer`` selects ``nncf.ModelType.TRANSFORMER`` (False: NNCF's default, for
    CNNs); ``float_modules``: regular expressions searched in each ONNX node's module path (its ``namespace``
    metadata, e.g. ``...decoder.layers.0.cross_attn.sampling_offsets: torch.nn.modules.linear.Linear/...``); the
    matching nodes stay in float (``nncf.IgnoredScope``). The IR keeps the ONNX node names, not the module paths."""
    name: str
    transformer: bool
    float_modules: tuple[str, ...] = ()


# The deformable attention's sampling offsets and attention weights: a quantised offset moves the sampling point.
SAMPLING_LINEARS = (r"\.sampling_offsets: ", r"\.attention_weights: ")
# The box and class heads of the decoder and of the encoder's proposals.
HEADS = (r"bbox_embed", r"class_embed")
SCHEMES = (
    Int8Scheme("transformer", True),
    Int8Scheme("default", False),
    Int8Scheme("transformer, sampling linears float", True, SAMPLING_LINEARS),
    Int8Scheme("transformer, heads float", True, HEADS),
    Int8Scheme("transformer, sampling linears and heads float", True, SAMPLING_LINEARS + HEADS),
)
SCHEME = SCHEMES[0]  # chosen by measured AP: docs/deployment.md "int8"


class ApDropTooLarge(CheckFailure):
    """The int8 IR's AP fell more than the allowed drop below the f32 IR's: nothing was written."""


def nncf():
    """The ``nncf`` module; UserError with the install line when it is missing."""
    try:
        import nncf as module
    except ImportError:
        raise UserError("--precision int8 needs NNCF: pip install 'dino[export]' (or nncf)") from None
    return module


def check_calibration_count(count: int, data: DataConfig):
    """The recipe's training set (a :class:`dino.data.coco.CocoDetection`) when it holds at least ``count`` >= 1
    images; UserError otherwise, naming the count and the set."""
    if count < 1:
        raise UserError(f"--calibration-images must be >= 1 (training images to calibrate int8 on), got {count}")
    dataset = build_dataset(data, "train")
    if count > len(dataset):
        raise UserError(f"--calibration-images {count}: the training set ({dataset.annotations_file}) has only "
                        f"{len(dataset)} images")
    return dataset


def calibration_samples(dataset, data: DataConfig, image_size: tuple[int, int], count: int
                        ) -> list[dict[str, np.ndarray]]:
    """``count`` images of the training set ``dataset`` spread evenly over it, each as the IR's inputs: ``{"images":
    (1, 3, H, W) float32, "mask": (1, H, W) bool}``, resized by ``data``'s evaluation transform and letterboxed to
    ``image_size`` as evaluation does."""
    preprocess = Preprocessor(data, tuple(image_size))
    samples = []
    for index in np.linspace(0, len(dataset) - 1, count).round().astype(int):
        images, mask, _ = preprocess([dataset.load_image(int(index))])
        samples.append({"images": images.numpy(), "mask": mask.numpy()})
    return samples


def float_node_names(onnx_path: str | os.PathLike, float_modules: tuple[str, ...]) -> list[str]:
    """Names of the nodes of the ONNX graph ``onnx_path`` whose module path matches one of ``float_modules``."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    names = []
    for node in graph.node:
        namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        if any(re.search(pattern, namespace) for pattern in float_modules):
            names.append(node.name)
    return names


def quantize(ir, samples: list[dict[str, np.ndarray]], scheme: Int8Scheme = SCHEME,
             onnx_path: str | os.PathLike | None = None):
    """The int8 ``openvino.Model`` of the f32 IR ``ir`` (an ``openvino.Model``, converted from ``onnx_path``),
    calibrated on ``samples`` (:func:`calibration_samples`) with ``scheme``."""
    module = nncf()
    ignored = None
    if scheme.float_modules:
        names = float_node_names(onnx_path, scheme.float_modules)
        # OpenVINO names a node converted into several after the ONNX node, plus a suffix ("node_Gemm_7/...").
        ignored = module.IgnoredScope(patterns=[f"{re.escape(name)}(/.*)?" for name in names], validate=False)
    return module.quantize(ir, module.Dataset(samples), subset_size=len(samples),
                           model_type=module.ModelType.TRANSFORMER if scheme.transformer else None,
                           ignored_scope=ignored)


def validation_ap(xml: str | os.PathLike, cfg: Recipe) -> dict:
    """COCO stats (``"AP"``, ``"AP50"``, ``"AP75"``, ...) of the IR ``xml`` at its recorded precision on the
    recipe's validation set, as ``dino eval`` evaluates an artifact (:func:`dino.evaluate`: each image resized as
    for evaluation and letterboxed into the IR's canvas; prints the 12-line table)."""
    return dino.evaluate(xml, cfg, kind="openvino")


def check_ap_drop(f32: dict, int8: dict, max_drop: float) -> str:
    """One line with both APs; raises :class:`ApDropTooLarge` with it when int8's AP is more than ``max_drop``
    below f32's."""
    drop = f32["AP"] - int8["AP"]
    line = (f"int8 AP {int8['AP']:.4f} (AP50 {int8['AP50']:.4f}) vs f32 AP {f32['AP']:.4f} (AP50 {f32['AP50']:.4f}) "
            f"on the validation set: drop {drop:.4f}")
    if drop > max_drop:
        raise ApDropTooLarge(f"{line} > --max-ap-drop {max_drop:g}; nothing was written (more --calibration-images, "
                             f"or a larger --max-ap-drop)")
    return f"{line} <= --max-ap-drop {max_drop:g}"


@dataclasses.dataclass
class Int8Plan:
    """How ``dino export openvino --precision int8`` quantises: the recipe whose training set calibrates and whose
    validation set judges, how many calibration images, the largest AP drop accepted, the scheme."""
    recipe: Recipe
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    max_ap_drop: float = DEFAULT_MAX_AP_DROP
    scheme: Int8Scheme = SCHEME

    @functools.cached_property
    def training_set(self):
        """The recipe's training set (:class:`dino.data.coco.CocoDetection`), read once."""
        nncf()
        return check_calibration_count(self.calibration_images, self.recipe.data)

    def check(self) -> None:
        """UserError for a bad ``calibration_images`` or a missing NNCF, before any work."""
        self.training_set  # noqa: B018 - built once, kept for the calibration


def write_int8(ir, f32_xml: Path, onnx_path: Path, image_size: tuple[int, int], plan: Int8Plan, verify: bool,
               notes: list[str]) -> Path:
    """Quantises the f32 IR ``ir`` (saved, checked, at ``f32_xml``; converted from ``onnx_path``) and saves the
    int8 IR beside it; with
    ``verify``, measures both IRs' AP and raises :class:`ApDropTooLarge` past ``plan.max_ap_drop``. Appends what
    it did to ``notes``; returns the int8 IR's ``.xml``."""
    started = time.perf_counter()
    samples = calibration_samples(plan.training_set, plan.recipe.data, image_size, plan.calibration_images)
    quantized = quantize(ir, samples, plan.scheme, onnx_path)
    notes.append(f"int8: NNCF {plan.scheme.name}, calibrated on {len(samples)} training images in "
                 f"{time.perf_counter() - started:.0f} s; the rest of the graph runs at "
                 f"{inference_precision('int8')} on this CPU (bf16 where the CPU has it, else f32)")
    set_precision(quantized, "int8")
    xml = f32_xml.with_name("model_int8.xml")
    openvino().save_model(quantized, str(xml), compress_to_fp16=False)
    if verify:
        line = check_ap_drop(validation_ap(f32_xml, plan.recipe), validation_ap(xml, plan.recipe), plan.max_ap_drop)
        notes.append(line)
        quantized.set_rt_info(line, [AP_KEY])  # what the IR was judged by, kept in it
        openvino().save_model(quantized, str(xml), compress_to_fp16=False)
    else:
        notes.append("int8 AP not measured (--no-verify): written unjudged")
    return xml
