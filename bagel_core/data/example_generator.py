"""Deterministic built-in example dataset in exactly the official ``bagel_example`` layout.

The official zip cannot be downloaded everywhere (and is slow to train on a CPU), so we synthesise
one with the same folders, file names, columns and JSON shapes::

    bagel_example/
      t2i/chunk_<i>.parquet                        image: binary, captions: string (JSON object)
      editing/seedxedit_multi/chunk_<i>.parquet    image_list: list<binary>,
                                                   instruction_list: list<list<string>>
      editing/parquet_info/seedxedit_multi_nas.json  keys carry the ``your_data_path`` placeholder
      vlm/images/<name>.{png,jpg}
      vlm/llava_ov_si.jsonl                         {"id", "image", "conversations": [...]}

Every image is a scene of coloured shapes at named positions, and every caption, edit instruction
and answer states facts of that scene, so a small model trained on it has something learnable.
Same ``ExampleConfig`` -> byte-identical files (fixed seeds, no timestamps in the content).
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from bagel_core.config.registry import PLACEHOLDER

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "black": (20, 20, 20),
    "cyan": (40, 200, 210),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "light grey": (200, 200, 200),
    "pale blue": (200, 220, 245),
    "beige": (240, 230, 200),
}
SHAPES = ("circle", "square", "triangle")
#: name -> (x, y) centre as fractions of the image size; a 3x3 grid gives unambiguous positions.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.2, 0.2),
    "top": (0.5, 0.2),
    "top right": (0.8, 0.2),
    "left": (0.2, 0.5),
    "centre": (0.5, 0.5),
    "right": (0.8, 0.5),
    "bottom left": (0.2, 0.8),
    "bottom": (0.5, 0.8),
    "bottom right": (0.8, 0.8),
}
#: (width, height) choices: square, landscape, portrait, wide, tall.
IMAGE_SIZES: tuple[tuple[int, int], ...] = (
    (256, 256),
    (320, 240),
    (240, 320),
    (384, 216),
    (200, 400),
    (448, 336),
    (512, 512),
    (288, 288),
)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    position: str

    def describe(self) -> str:
        return f"{article(self.colour)} {self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]
    size: tuple[int, int]


@dataclass(frozen=True)
class ExampleConfig:
    """Sizes of the generated example (defaults: small enough for a CPU run in minutes)."""

    t2i_files: int = 10
    t2i_rows_per_file: int = 10
    t2i_rows_per_row_group: int = 5
    edit_files: int = 10
    edit_row_groups_per_file: int = 2
    edit_rows_per_row_group: int = 5
    vlm_lines: int = 100
    seed: int = 0
    sizes: tuple[tuple[int, int], ...] = field(default=IMAGE_SIZES)

    @property
    def t2i_samples(self) -> int:
        return self.t2i_files * self.t2i_rows_per_file

    @property
    def edit_samples(self) -> int:
        return self.edit_files * self.edit_row_groups_per_file * self.edit_rows_per_row_group


# ---- scenes and rendering ----------------------------------------------------------------------
def random_scene(rng: random.Random, sizes: tuple[tuple[int, int], ...], max_shapes: int = 3) -> Scene:
    count = rng.randint(1, max_shapes)
    positions = rng.sample(sorted(POSITIONS), count)
    shapes = tuple(Shape(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), pos) for pos in positions)
    return Scene(rng.choice(sorted(BACKGROUNDS)), shapes, rng.choice(sizes))


def render(scene: Scene, mode: str = "RGB") -> Image.Image:
    width, height = scene.size
    image = Image.new("RGB", scene.size, BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    radius = int(min(width, height) * 0.12)
    for shape in scene.shapes:
        fx, fy = POSITIONS[shape.position]
        cx, cy = int(fx * width), int(fy * height)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        colour = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse(box, fill=colour)
        elif shape.kind == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    if mode == "RGBA":
        # Transparent background: upstream composites it onto white.
        rgba = image.convert("RGBA")
        alpha = Image.new("L", scene.size, 0)
        ImageDraw.Draw(alpha).rectangle((0, 0, width, height), fill=255)
        for x in range(0, width, 8):
            ImageDraw.Draw(alpha).line((x, 0, x, height), fill=200)
        rgba.putalpha(alpha)
        return rgba
    return image


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format=fmt, optimize=False)
    return buffer.getvalue()


def _list_phrase(shapes: tuple[Shape, ...]) -> str:
    parts = [s.describe() for s in shapes]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions_for(scene: Scene) -> dict[str, str]:
    """Short and long captions; both state only facts visible in the image."""
    placed = "; ".join(f"{s.describe()} at the {s.position}" for s in scene.shapes)
    return {
        "short": f"{_list_phrase(scene.shapes)} on {article(scene.background)} {scene.background} background",
        "long": f"{article(scene.background).capitalize()} {scene.background} background with {len(scene.shapes)} "
        f"shape{'s' if len(scene.shapes) > 1 else ''}: {placed}.",
    }


# ---- edits -------------------------------------------------------------------------------------
def random_edit(rng: random.Random, scene: Scene) -> tuple[Scene, list[str]]:
    """One edit step and two alternative phrasings of it."""
    shapes = list(scene.shapes)
    free = [p for p in sorted(POSITIONS) if p not in {s.position for s in shapes}]
    choices = (
        ["recolour", "move"] + (["add"] if free and len(shapes) < 4 else []) + (["remove"] if len(shapes) > 1 else [])
    )
    action = rng.choice(choices)
    if action == "add":
        new = Shape(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.choice(free))
        shapes.append(new)
        phrasings = [f"Add {new.describe()} at the {new.position}.", f"Draw {new.describe()} in the {new.position}"]
    elif action == "remove":
        old = shapes.pop(rng.randrange(len(shapes)))
        phrasings = [f"Remove the {old.colour} {old.kind}.", f"Delete the {old.kind} at the {old.position}"]
    elif action == "move":
        index = rng.randrange(len(shapes))
        old = shapes[index]
        target = rng.choice(free) if free else old.position
        shapes[index] = Shape(old.kind, old.colour, target)
        phrasings = [f"Move the {old.colour} {old.kind} to the {target}.", f"Put the {old.kind} at the {target}"]
    else:
        index = rng.randrange(len(shapes))
        old = shapes[index]
        colour = rng.choice([c for c in sorted(COLOURS) if c != old.colour])
        shapes[index] = Shape(old.kind, colour, old.position)
        phrasings = [f"Make the {old.colour} {old.kind} {colour}.", f"Change the {old.kind}'s colour to {colour}"]
    return Scene(scene.background, tuple(shapes), scene.size), phrasings


# ---- VLM conversations -------------------------------------------------------------------------
def _count_phrase(count: int) -> str:
    return "There is 1 shape." if count == 1 else f"There are {count} shapes."


def _qa_pairs(rng: random.Random, scene: Scene) -> list[tuple[str, str]]:
    shape = rng.choice(scene.shapes)
    pairs = [
        ("How many shapes are in the image?", _count_phrase(len(scene.shapes))),
        (f"What colour is the {shape.kind} at the {shape.position}?", f"It is {shape.colour}."),
        (f"Where is the {shape.colour} {shape.kind}?", f"The {shape.colour} {shape.kind} is at the {shape.position}."),
        ("What colour is the background?", f"The background is {scene.background}."),
        ("Describe the image.", captions_for(scene)["long"]),
    ]
    rng.shuffle(pairs)
    return pairs


def vlm_record(rng: random.Random, index: int, image_names: list[str], scenes: list[Scene]) -> dict:
    conversations: list[dict[str, str]] = []
    if len(scenes) == 2:
        counts = [len(s.shapes) for s in scenes]
        answer = (
            "Both images have the same number of shapes."
            if counts[0] == counts[1]
            else f"The {'first' if counts[0] > counts[1] else 'second'} image has more shapes."
        )
        conversations += [
            {"from": "human", "value": "<image>\n<image>\nWhich image has more shapes?"},
            {"from": "gpt", "value": answer},
        ]
        turns = []
    elif scenes:
        turns = _qa_pairs(rng, scenes[0])[: rng.randint(1, 3)]
    else:
        turns = [
            (
                f"What do you get if you mix {a} and {b} light?",
                f"Mixing {a} and {b} light gives {c}.",
            )
            for a, b, c in [
                rng.choice([("red", "green", "yellow"), ("green", "blue", "cyan"), ("red", "blue", "magenta")])
            ]
        ]
    for turn, (question, answer) in enumerate(turns):
        prefix = "<image>\n" if scenes and turn == 0 and len(scenes) == 1 else ""
        conversations += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    record: dict = {"id": f"example_{index:06d}"}
    if image_names:
        record["image"] = image_names[0] if len(image_names) == 1 else image_names
    record["conversations"] = conversations
    return record


# ---- writers -----------------------------------------------------------------------------------
def _write_t2i(root: Path, cfg: ExampleConfig, rng: random.Random) -> None:
    out = root / "t2i"
    out.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("image", pa.binary()), ("captions", pa.string())])
    for file_index in range(cfg.t2i_files):
        images, captions = [], []
        for _ in range(cfg.t2i_rows_per_file):
            scene = random_scene(rng, cfg.sizes)
            mode = "RGBA" if rng.random() < 0.1 else "RGB"
            fmt = "PNG" if mode == "RGBA" or rng.random() < 0.5 else "JPEG"
            images.append(encode(render(scene, mode), fmt))
            caps = captions_for(scene)
            if rng.random() < 0.3:
                caps = {"short": caps["short"]}
            captions.append(json.dumps(caps))
        table = pa.table({"image": images, "captions": captions}, schema=schema)
        pq.write_table(table, out / f"chunk_{file_index}.parquet", row_group_size=cfg.t2i_rows_per_row_group)


def _write_edit(root: Path, cfg: ExampleConfig, rng: random.Random) -> None:
    out = root / "editing" / "seedxedit_multi"
    out.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("image_list", pa.list_(pa.binary())), ("instruction_list", pa.list_(pa.list_(pa.string())))])
    info: dict[str, dict[str, int]] = {}
    rows_per_file = cfg.edit_row_groups_per_file * cfg.edit_rows_per_row_group
    for file_index in range(cfg.edit_files):
        image_lists, instruction_lists = [], []
        for _ in range(rows_per_file):
            scene = random_scene(rng, cfg.sizes, max_shapes=2)
            steps = rng.choice((1, 1, 2, 3))  # N images = steps + 1; multi-step samples included
            images, instructions = [encode(render(scene), "PNG")], []
            for _ in range(steps):
                scene, phrasings = random_edit(rng, scene)
                images.append(encode(render(scene), "PNG"))
                instructions.append(phrasings)
            image_lists.append(images)
            instruction_lists.append(instructions)
        table = pa.table({"image_list": image_lists, "instruction_list": instruction_lists}, schema=schema)
        name = f"chunk_{file_index}.parquet"
        pq.write_table(table, out / name, row_group_size=cfg.edit_rows_per_row_group, version="2.6")
        info[f"{PLACEHOLDER}/bagel_example/editing/seedxedit_multi/{name}"] = {
            "num_row_groups": cfg.edit_row_groups_per_file,
            "num_rows": rows_per_file,
            "num_columns": 2,
        }
    info_dir = root / "editing" / "parquet_info"
    info_dir.mkdir(parents=True, exist_ok=True)
    (info_dir / "seedxedit_multi_nas.json").write_text(json.dumps(info, indent=2) + "\n")


def _write_vlm(root: Path, cfg: ExampleConfig, rng: random.Random) -> None:
    images_dir = root / "vlm" / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(cfg.vlm_lines):
        kind = rng.random()
        count = 0 if kind < 0.05 else 2 if kind < 0.2 else 1
        scenes = [random_scene(rng, cfg.sizes) for _ in range(count)]
        names = []
        for k, scene in enumerate(scenes):
            fmt = "JPEG" if rng.random() < 0.6 else "PNG"
            name = f"example_{index:06d}_{k}.{'jpg' if fmt == 'JPEG' else 'png'}"
            (images_dir / name).write_bytes(encode(render(scene), fmt))
            names.append(name)
        lines.append(json.dumps(vlm_record(rng, index, names, scenes)))
    (root / "vlm" / "llava_ov_si.jsonl").write_text("\n".join(lines) + "\n")


def write_example_dataset(out_dir: str | Path, config: ExampleConfig | None = None) -> Path:
    """Write ``out_dir/bagel_example/`` and return that folder. Overwrites generated files in place."""
    cfg = config or ExampleConfig()
    root = Path(out_dir) / "bagel_example"
    # Independent streams per task, so changing one task's size leaves the others' bytes unchanged.
    _write_t2i(root, cfg, random.Random(f"{cfg.seed}-t2i"))
    _write_edit(root, cfg, random.Random(f"{cfg.seed}-edit"))
    _write_vlm(root, cfg, random.Random(f"{cfg.seed}-vlm"))
    return root
