"""A video's own settings: a JSON object in a settings file beside it, ``<video name>.json``
(``clip.mp4.json`` for ``clip.mp4``), read by the watcher when it stages the video.

    {"model.style": 5}
    {"model": "arbitrary", "model.style_image": "monet.jpg"}     # styles/monet.jpg in the input area

The file is an upload like any other, so nothing in it is trusted: at most :data:`MAX_BYTES`,
one JSON object, keys from the watcher's ``settings_allowed`` only (each a batch line's
per-video setting, :data:`mpistyle.batch_inputs.PER_VIDEO_SETTINGS`, or ``model``: one of
``settings_models``), each value checked as a batch line's is
(:func:`mpistyle.batch_inputs.setting_error`). ``model.style_image`` names a picture in the
input area's ``style_images`` folder, never a path on the watcher's host. What fails is an
:class:`~mpistyle.errors.InputError` whose message is the reason the video is quarantined.

No storage here: bytes in, settings out, checked; the watcher lists, downloads and probes.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from omegaconf import DictConfig

from .. import config as job_schema
from ..batch_inputs import PER_VIDEO_SETTINGS, setting_error
from ..errors import ConfigError, InputError
from ..formats import VIDEO_SUFFIXES
from .names import shown

SUFFIX = ".json"
# A settings file is a few lines; anything larger is not one (and is never downloaded).
MAX_BYTES = 16 * 1024
# A style image is one picture: mpistyle shrinks it to 256 pixels a side before it is used.
STYLE_IMAGE_MAX_BYTES = 64 * 2**20
MODEL = "model"  # the one key beyond a batch line's settings: which model config the job uses
ALLOWED = PER_VIDEO_SETTINGS | {MODEL}
STYLE_IMAGE = "model.style_image"
_BLEND = "model.blend"


def is_sidecar(name: str) -> bool:
    """Whether ``name`` is a settings file: a video's name with ``.json`` added."""
    return name.endswith(SUFFIX) and PurePosixPath(name[: -len(SUFFIX)]).suffix.lower() in VIDEO_SUFFIXES


def sidecar_of(video: str) -> str:
    return video + SUFFIX


@dataclass(frozen=True)
class Settings:
    """A video's checked settings: the model config it chooses (None: the watcher's), and the
    values by key, each as the job takes it (``model.blend`` as ``"3:0.5,19:0.5"``), but
    ``model.style_image``: the picture's name in the input area, which the watcher downloads."""

    model: str | None = None
    values: Mapping[str, Any] = field(default_factory=dict)

    @property
    def style_image(self) -> str | None:
        image = self.values.get(STYLE_IMAGE)
        return str(image) if image is not None else None

    def shown(self) -> dict[str, Any]:
        """For the state record and the quarantine's error.json: as the user wrote them."""
        return {**({MODEL: self.model} if self.model else {}), **self.values}

    def choice(self) -> list[str]:
        """The Hydra override choosing the model config; before the watcher's job_overrides."""
        return [f"model={self.model}"] if self.model else []

    def overrides(self, style_copy: Path | None) -> list[str]:
        """The value overrides of the video's own job; after the watcher's job_overrides. Every
        value is a number, a blend (``3:0.5,19:0.5``), a preset's name of letters, or the
        watcher's own path for the style image (passed as the input's is): quoted where Hydra
        would read a comma or colon, and none holds a quote, backslash or ``${``."""
        return [f"{key}={_override_value(key, value)}" for key, value in self.line(style_copy).items()]

    def line(self, style_copy: Path | None) -> dict[str, Any]:
        """The settings of the video's line in a batch's JSONL file (``model`` never: a video
        that chooses its model runs in a job of its own)."""
        return {key: str(style_copy) if key == STYLE_IMAGE else value for key, value in self.values.items()}


def _override_value(key: str, value: Any) -> str:
    if isinstance(value, str) and key != STYLE_IMAGE:
        return f"'{value}'"  # a blend: unquoted, Hydra would read its commas as a list
    return repr(value) if isinstance(value, float) else str(value)


def parse(raw: bytes, name: str, allowed: Iterable[str], models: Iterable[str], style_images: str) -> Settings:
    """The settings in the settings file ``name`` (its bytes ``raw``), checked against the
    watcher's allow-list (``allowed`` keys, ``models`` to choose from, the input area's folder
    ``style_images`` of pictures; "" takes none)."""
    where = shown(name)
    if len(raw) > MAX_BYTES:
        raise InputError(f"the settings file {where} is {len(raw)} bytes; a settings file is at most {MAX_BYTES}")
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_repeats, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise InputError(f"the settings file {where} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise InputError(f"the settings file {where} is not JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except ValueError as err:
        raise InputError(f"the settings file {where} {err}") from None
    if not isinstance(data, dict):
        raise InputError(f"the settings file {where} holds a JSON {type(data).__name__}, not an object of settings")
    allowed = sorted(allowed)
    refused = sorted(key for key in data if key not in allowed)
    if refused:
        listed = ", ".join(shown(key, 60) for key in refused[:5]) + (", ..." if len(refused) > 5 else "")
        raise InputError(f"the settings file {where} sets {listed}, which a settings file may not set "
                         f"(allowed here: {', '.join(allowed) or 'none'})")
    model = data.pop(MODEL, None)
    models = sorted(models)
    if model is not None and model not in models:
        raise InputError(f"the settings file {where} sets model to {json.dumps(model)[:60]}: it may choose "
                         f"{', '.join(models) or 'no model'}")
    values = {}
    for key, value in data.items():
        error = setting_error(key, value)
        if error is not None:
            raise InputError(f"the settings file {where}: {error}")
        values[key] = _blend(value, where) if key == _BLEND else value
    if STYLE_IMAGE in values:
        values[STYLE_IMAGE] = _style_image(str(values[STYLE_IMAGE]), where, style_images)
    return Settings(model, values)


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys are each set once: a repeated key would mean whichever came last."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"sets {shown(key, 60)} twice")
        found[key] = value
    return found


def _no_constant(constant: str) -> Any:
    raise ValueError(f"holds {constant}, which is not a number any setting takes")


def _blend(value: Any, where: str) -> str:
    """A blend as ``"3:0.5,19:0.5"`` (the form the job reads from a string), from that form or
    an object ``{"3": 0.5, "19": 0.5}``: style numbers and finite weights, nothing else."""
    try:
        pairs = value.items() if isinstance(value, dict) else (part.split(":") for part in value.split(","))
        weights = {int(str(style)): float(weight) for style, weight in pairs}
    except (TypeError, ValueError, AttributeError):
        weights = {}
    if not weights or any(weight != weight or abs(weight) == float("inf") for weight in weights.values()):
        raise InputError(f'the settings file {where}: model.blend must map style numbers to weights, like '
                         f'{{"3": 0.5, "19": 0.5}} or "3:0.5,19:0.5", got {json.dumps(value)[:80]}')
    return ",".join(f"{style}:{weight!r}" for style, weight in weights.items())


def _style_image(image: str, where: str, folder: str) -> str:
    """The input area's name for the picture ``image`` names: in ``folder``, by name alone."""
    if not folder:
        raise InputError(f"the settings file {where} names a style image, and this watcher takes none (style_images is unset)")
    if not image or image.startswith("/") or "\\" in image or any(part in ("", ".", "..") for part in image.split("/")):
        raise InputError(f"the settings file {where}: model.style_image must name a picture in the input area's "
                         f"{folder} folder, like \"monet.jpg\", got {json.dumps(image)[:80]}")
    return folder + image


def check_job(cfg: DictConfig, settings: Settings, name: str) -> None:
    """The checks the job makes of these settings before any work, on the config it composes
    from them (``cfg``): the config's own, and the model builder's of styles, blend and
    strength. A value the job would refuse (exit 2: retried, as the watcher's own config is)
    is the video's refusal instead."""
    target = str(cfg.model.get("_target_", ""))
    try:
        job_schema.check_job(cfg)
        if target.endswith(".load_multistyle") and settings.values.keys() & {"model.style", _BLEND}:
            from ..model.loading import style_vector  # torch: only for a video that sets these

            style_vector(cfg.model.style, cfg.model.blend)
        if target.endswith(".load_arbitrary") and "model.style_strength" in settings.values:
            from ..model.loading import check_style_strength

            check_style_strength(cfg.model.style_strength)
    except ConfigError as err:
        raise InputError(f"the settings file {shown(name)}: {err}") from None
