"""The gate's rules as data: which manifest fact each rule checks, on which rows, against which limit.

Policy lives here (limits come from ValidateConfig), facts live in the manifest
(emu.data.manifest), and emu.validate.suites turns every Rule into Great Expectations
expectations. Keeping the rules free of GX keeps them readable and testable without the slow GX
import. Rule names are stable: scripts and dashboards key on them.

Great Expectations' column-map expectations skip null values. A fact that is null for a row of a
kind where the manifest always sets it would therefore pass silently; `required` rules add a
not-null expectation so that a missing fact fails the rule too. Facts that are legitimately null
(box coordinates when a box is not finite, image size when no image decodes) are left optional,
and another required rule (`boxes_finite`, `image_decodable`) fails those rows instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from emu.data.schema import KINDS, KINDS_NEEDING_IMAGES
from emu.validate import ValidateConfig

#: The two tables the suites run over: one row per sample, and one row per shard.
SAMPLES, SHARDS = "samples", "shards"
#: Columns that name a failing row in each table (GX `unexpected_index_column_names`).
INDEX_COLUMNS = {SAMPLES: ("dataset", "shard", "key"), SHARDS: ("dataset", "shard")}

Check = Literal["null", "true", "between", "equal", "unique"]


@dataclass(frozen=True)
class Rule:
    """One named rule: a check on `columns` of the rows it applies to.

    check: `null` (the column is null), `true` (the boolean fact is true), `between`
    (min_value <= column <= max_value, `strict_min` makes the lower bound exclusive), `equal`
    (the two columns are equal), `unique` (the column combination is unique).
    """

    name: str
    description: str
    check: Check
    columns: tuple[str, ...]
    min_value: float | None = None
    max_value: float | None = None
    strict_min: bool = False
    #: A null value fails the rule too (see the module docstring).
    required: bool = False
    #: Extra row filter `(column, operator, value)`, ANDed with the suite's kind filter.
    when: tuple[str, str, Any] | None = None
    #: max_failure_fraction does not apply: one failing row fails the rule.
    strict: bool = False


@dataclass(frozen=True)
class SuiteSpec:
    """An expectation suite: the rules that run over one table, restricted to one sample kind."""

    name: str
    table: str
    kind: str | None
    rules: tuple[Rule, ...]


def build_suites(config: ValidateConfig, kinds: list[str]) -> list[SuiteSpec]:
    """The suites of one gate run: structure and shards always, one per sample kind present."""
    suites = [SuiteSpec("structure", SAMPLES, None, structure_rules()),
              SuiteSpec("shards", SHARDS, None, shard_rules())]
    for kind in sorted(k for k in kinds if k in KINDS):
        suites.append(SuiteSpec(f"kind_{kind}", SAMPLES, kind, kind_rules(kind, config)))
    return suites


def structure_rules() -> tuple[Rule, ...]:
    """Rules over every sample row, decodable or not."""
    return (
        Rule("structure_ok", "the sample decodes: tar members safe, regular and complete, record valid "
             "UTF-8 JSON, every listed image present and no member unreferenced",
             "null", ("structure_error",)),
        # An unreadable shard start yields a row with an empty key; structure_ok reports it already.
        Rule("key_unique", "each key appears once per dataset, across all its shards",
             "unique", ("dataset", "key"), when=("key", "!=", "")),
    )


def shard_rules() -> tuple[Rule, ...]:
    """Rules over every shard listed in a dataset.json."""
    return (
        Rule("shard_checksum", "the shard's sha256 equals the one dataset.json recorded at import",
             "equal", ("sha256_expected", "sha256_actual"), required=True, strict=True),
    )


def kind_rules(kind: str, config: ValidateConfig) -> tuple[Rule, ...]:
    """Rules for the rows of one sample kind, limits taken from `config`."""
    rules = list(_text_rules(kind, config))
    if kind != "text":
        rules += _image_rules(kind, config)
    if kind in ("pair", "video_text"):
        rules += _video_rules(kind, config)
    if kind == "grounded":
        rules += _grounded_rules(config)
    if kind in ("interleaved", "gen"):
        rules.append(Rule("image_refs_ok", "every image is referenced exactly once and every "
                          "reference is in range", "true", ("image_refs_ok",), required=True))
    if kind == "chat":
        rules += [
            Rule("turns_alternate", "turns run [system] user assistant (user assistant)*",
                 "true", ("turns_alternate",), required=True),
            Rule("placeholders_match_images", "the number of <image> placeholders equals the "
                 "number of images", "equal", ("n_image_placeholders", "n_images"), required=True),
        ]
    if kind == "vqa":
        rules.append(Rule("vqa_answers", f"each question carries exactly {config.vqa_answers} answers",
                          "between", ("n_answers",), min_value=config.vqa_answers,
                          max_value=config.vqa_answers, required=True))
    return tuple(rules)


def _text_rules(kind: str, config: ValidateConfig) -> list[Rule]:
    return [
        # Silent stretches are normal in video, so a video_text sample may carry no text at all.
        Rule("text_nonempty", f"every text has at least {config.min_text_chars} non-blank characters",
             "between", ("text_chars_min",), min_value=config.min_text_chars,
             required=kind != "video_text"),
        Rule("text_length_max", f"no text is longer than {config.max_text_chars} characters",
             "between", ("text_chars_max",), max_value=config.max_text_chars),
        Rule("text_unicode_ok", "every text is valid Unicode (encodes as strict UTF-8)",
             "true", ("text_unicode_ok",), required=True),
    ]


def _image_rules(kind: str, config: ValidateConfig) -> list[Rule]:
    rules = []
    if kind in KINDS_NEEDING_IMAGES:
        rules.append(Rule("images_present", "the sample has at least one image", "between",
                          ("n_images",), min_value=1, required=True))
    return rules + [
        Rule("image_decodable", "every image is a known format, non-empty, within the pixel budget "
             "and decodes completely", "null", ("image_error",)),
        Rule("image_side_min", f"every image side is at least {config.min_image_side} px",
             "between", ("image_side_min",), min_value=config.min_image_side),
        Rule("image_aspect_max", f"every image has aspect ratio at most {config.max_aspect_ratio:g}",
             "between", ("image_aspect_max",), max_value=config.max_aspect_ratio),
    ]


def _video_rules(kind: str, config: ValidateConfig) -> list[Rule]:
    # Image pairs record n_frames = 0; only video pairs are checked for frame counts.
    when = ("n_frames", ">", 0) if kind == "pair" else None
    rules = [Rule("video_frames", f"a video has {config.min_frames} to {config.max_frames} frames",
                  "between", ("n_frames",), min_value=config.min_frames, max_value=config.max_frames,
                  required=True, when=when)]
    if kind == "video_text":
        rules.append(Rule("subtitles_match_frames", "one subtitle (possibly empty) per frame",
                          "equal", ("n_subtitles", "n_frames"), required=True))
    return rules


def _grounded_rules(config: ValidateConfig) -> list[Rule]:
    return [
        Rule("boxes_present", f"the sample carries at least {config.min_boxes} boxes", "between",
             ("n_boxes",), min_value=config.min_boxes, required=True),
        Rule("boxes_finite", "every box coordinate is a finite number", "true",
             ("boxes_finite",), required=True),
        Rule("box_coord_min", "no box coordinate is below 0 (coordinates are normalised)",
             "between", ("box_coord_min",), min_value=0.0),
        Rule("box_coord_max", "no box coordinate is above 1 (coordinates are normalised)",
             "between", ("box_coord_max",), max_value=1.0),
        Rule("box_extent_positive", "every box has x_min < x_max and y_min < y_max",
             "between", ("box_extent_min",), min_value=0.0, strict_min=True),
        Rule("phrase_spans_ok", "every phrase span satisfies 0 <= start < end <= len(text)",
             "true", ("phrase_spans_ok",), required=True),
    ]
