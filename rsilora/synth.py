"""Synthetic aerial scenes written as RSICap / RSIEval look-alike datasets.

Why: the demo and every test need image-caption data that ships with the package, is small, fast to
make and identical on every machine. This module draws top-down scenes (buildings, roads, rivers,
ponds, trees, fields, parking lots, cars) with PIL and numpy and writes them in exactly the layout of
the real releases, so the same loaders and training code run on them unchanged.

Orientation: north is up and east is right, so "a road runs from north to south" is vertical.

Captions and answers are true by construction. A scene is first sampled as a small model: lines
that cross the whole image (roads, rivers) run through one column or row of a 3x3 grid (or along
its diagonal), and every object group (buildings, a parking lot, ...) is confined to one free cell
of that grid. The drawing and the text are both derived from that model, so "a pond in the lower
right corner" is drawn inside the lower right cell. Everything is seeded: the same seed gives
byte-identical JSON and identical pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from rsilora.files import atomic_write_json, prepare_output_dir

RSICAP_PROMPTS: tuple[str, ...] = (
    "Take a look at this image and describe what you notice.",
    "Describe this image in detail.",
    "Could you describe the contents of this image for me?",
    "Please provide a detailed description of the picture.",
)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the image side (y grows south)
Cell = tuple[int, int]  # (row, column) of the 3x3 grid; row 0 is north

_NS, _EW, _NWSE, _NESW = "north-south", "east-west", "northwest-southeast", "northeast-southwest"
_WHERE = {(0, 0): "in the upper left corner", (0, 1): "at the top", (0, 2): "in the upper right corner",
          (1, 0): "on the left side", (1, 1): "in the center", (1, 2): "on the right side",
          (2, 0): "in the lower left corner", (2, 1): "at the bottom", (2, 2): "in the lower right corner"}
_NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
            "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = ("", "", "twenty", "thirty", "forty", "fifty")

_ROOFS = {"red": (175, 60, 50), "orange": (205, 120, 55), "blue": (70, 100, 190),
          "grey": (150, 150, 155), "white": (232, 232, 226)}
_FIELDS = {"green": (85, 150, 60), "yellow": (205, 185, 95)}
_CARS = {"white": (235, 235, 235), "black": (30, 30, 35), "red": (190, 40, 40),
         "silver": (185, 185, 190), "yellow": (225, 195, 45)}  # no blue cars: blue means water or roofs
_GROUND = {"sandy": ((180, 160, 120), "sandy"), "brown": ((135, 110, 80), "bare brown soil"),
           "grassy": ((110, 135, 80), "covered with short grass")}
_WATER, _ROAD, _LOT, _TREE, _SHADOW = (40, 85, 130), (100, 100, 100), (120, 120, 122), (40, 95, 45), (55, 50, 45)
_CAR_LEN, _CAR_WID = 0.035, 0.018


@dataclass(frozen=True)
class _Theme:
    grounds: tuple[str, ...]
    lines: dict[str, float]  # line layout -> sampling weight
    kinds: dict[str, float]  # object group kind -> sampling weight
    roofs: tuple[str, ...]


_THEMES = {
    "residential area": _Theme(("sandy", "grassy"),
                               {"road": 3, "cross": 3, "road_river": 1.5, "river": 1, "none": 0.5},
                               {"buildings": 5, "trees": 2, "parking": 1, "pond": 0.7, "field": 0.3},
                               ("red", "orange", "blue", "grey", "white")),
    "commercial area": _Theme(("sandy", "brown"), {"road": 3, "cross": 4, "road_river": 1},
                              {"buildings": 4, "parking": 3, "trees": 1}, ("white", "grey", "blue", "red")),
    "industrial area": _Theme(("brown", "sandy"), {"road": 3, "cross": 3, "road_river": 1, "none": 0.5},
                              {"buildings": 4, "parking": 2, "field": 0.5}, ("grey", "white", "blue")),
    "farmland": _Theme(("grassy", "brown"), {"road": 2, "river": 2, "road_river": 2, "none": 1},
                       {"field": 5, "trees": 2, "buildings": 1, "pond": 1}, ("red", "white")),
    "park": _Theme(("grassy",), {"road": 2, "river": 1, "road_river": 1, "none": 1},
                   {"trees": 4, "pond": 2, "field": 1, "parking": 1}, ("white", "red")),
}


@dataclass(frozen=True)
class _Car:
    x: float
    y: float
    angle: float  # degrees: 0 points east, 90 points south
    color: str


@dataclass(frozen=True)
class _Line:
    """A road or river crossing the whole image through one grid column/row (or the diagonal)."""
    kind: str  # "road" | "river"
    orient: str  # _NS, _EW, _NWSE or _NESW
    index: int  # grid column (north-south) or row (east-west); 1 for diagonals
    width: float
    wave: float = 0.0  # river meander amplitude, small enough to stay inside the column/row
    phase: float = 0.0
    cars: tuple[_Car, ...] = ()


@dataclass(frozen=True)
class _Group:
    """Objects of one kind inside one grid cell."""
    kind: str  # "buildings" | "parking" | "trees" | "field" | "pond"
    cell: Cell
    color: str  # roof or field colour, "" otherwise
    area: Box  # the lot, field or pond ellipse; for buildings and trees the usable part of the cell
    items: tuple[Box, ...] = ()  # buildings or tree crowns
    cars: tuple[_Car, ...] = ()  # cars in a parking lot

    @property
    def count(self) -> int:
        return len(self.cars) if self.kind == "parking" else len(self.items)

    @property
    def footprint(self) -> float:
        """Covered area as a fraction of the image, for the area comparison questions."""
        if self.kind == "buildings":
            return sum((b[2] - b[0]) * (b[3] - b[1]) for b in self.items)
        if self.kind == "trees":
            return sum(math.pi * ((b[2] - b[0]) / 2) ** 2 for b in self.items)
        w, h = self.area[2] - self.area[0], self.area[3] - self.area[1]
        return math.pi * w * h / 4 if self.kind == "pond" else w * h


@dataclass(frozen=True)
class _Scene:
    theme: str
    ground: str
    lines: tuple[_Line, ...]
    groups: tuple[_Group, ...]


# ------------------------------------------------------------------------------------------ sampling

def _choice(rng: np.random.Generator, seq: tuple | list):
    return seq[int(rng.integers(len(seq)))]


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    p = np.array(list(weights.values()), dtype=float)
    return list(weights)[int(rng.choice(len(p), p=p / p.sum()))]


def _subset(rng: np.random.Generator, n: int, low: int) -> list[int]:
    """A sorted random subset of ``range(n)`` with at least ``low`` members."""
    return sorted(int(i) for i in rng.choice(n, int(rng.integers(low, n + 1)), replace=False))


def _line_point(line: _Line, t: float, off: float = 0.0) -> tuple[float, float]:
    """Point at ``t`` along ``line`` (0 = start, 1 = end), ``off`` to the side of its centre."""
    off += line.wave * math.sin(3 * math.pi * t + line.phase)
    c = (line.index + 0.5) / 3
    if line.orient == _NS:
        return c + off, t
    if line.orient == _EW:
        return t, c + off
    k = off / math.sqrt(2)
    return (t - k, t + k) if line.orient == _NWSE else (1 - t + k, t + k)


def _line_cells(line: _Line) -> set[Cell]:
    """The three grid cells a line passes through (it crosses each at a third of its length)."""
    return {(int(y * 3), int(x * 3)) for x, y in (_line_point(line, t) for t in (1 / 6, 1 / 2, 5 / 6))}


def _road(orient: str, index: int, rng: np.random.Generator) -> _Line:
    road = _Line("road", orient, index, float(rng.uniform(0.05, 0.075)))
    angle = {_NS: 90.0, _EW: 0.0, _NWSE: 45.0, _NESW: 135.0}[orient]
    cars = []
    for k in sorted(int(s) for s in rng.choice(9, int(rng.integers(0, 5)), replace=False)):
        # one car per tenth of the road, in either lane, so cars never overlap
        x, y = _line_point(road, (k + 1) / 10, _choice(rng, (-1, 1)) * road.width / 4)
        cars.append(_Car(x, y, angle, _choice(rng, list(_CARS))))
    return _Line("road", orient, index, road.width, cars=tuple(cars))


def _sample_lines(theme: _Theme, rng: np.random.Generator) -> tuple[_Line, ...]:
    layout = _pick(rng, theme.lines)
    if layout == "none":
        return ()
    if layout == "cross":
        return _road(_NS, int(rng.integers(3)), rng), _road(_EW, int(rng.integers(3)), rng)
    if layout == "road":
        orient = _pick(rng, {_NS: 3, _EW: 3, _NWSE: 1, _NESW: 1})
        return (_road(orient, 1 if orient in (_NWSE, _NESW) else int(rng.integers(3)), rng),)
    orient, index = _choice(rng, (_NS, _EW)), int(rng.integers(3))
    river = _Line("river", orient, index, float(rng.uniform(0.08, 0.14)), float(rng.uniform(0.005, 0.025)),
                  float(rng.uniform(0, 2 * math.pi)))
    if layout == "river":
        return (river,)
    if rng.random() < 0.6:  # a road crossing the river on a bridge
        return river, _road(_EW if orient == _NS else _NS, int(rng.integers(3)), rng)
    return river, _road(orient, _choice(rng, [i for i in range(3) if i != index]), rng)


def _slots(box: Box, rows: int, cols: int) -> list[Box]:
    w, h = (box[2] - box[0]) / cols, (box[3] - box[1]) / rows
    return [(box[0] + c * w, box[1] + r * h, box[0] + (c + 1) * w, box[1] + (r + 1) * h)
            for r in range(rows) for c in range(cols)]


def _inner(rng: np.random.Generator, box: Box, lo: float, hi: float) -> Box:
    """A random box inside ``box``, each side ``lo``..``hi`` of the outer one."""
    w, h = (box[2] - box[0]) * rng.uniform(lo, hi), (box[3] - box[1]) * rng.uniform(lo, hi)
    x, y = box[0] + rng.uniform(0, box[2] - box[0] - w), box[1] + rng.uniform(0, box[3] - box[1] - h)
    return float(x), float(y), float(x + w), float(y + h)


def _sample_group(kind: str, cell: Cell, theme: _Theme, rng: np.random.Generator) -> _Group:
    # A margin of a tenth of the cell keeps shadows and outlines inside the cell the text names.
    s, m = 1 / 3, 0.1 / 3
    box = (cell[1] * s + m, cell[0] * s + m, (cell[1] + 1) * s - m, (cell[0] + 1) * s - m)
    if kind == "buildings":  # at most one building per slot: never overlapping, so always countable
        slots = _slots(box, *_choice(rng, ((2, 2), (2, 3), (3, 2))))
        houses = tuple(_inner(rng, slots[i], 0.5, 0.75) for i in _subset(rng, len(slots), 1))
        return _Group(kind, cell, _choice(rng, theme.roofs), box, houses)
    if kind == "trees":
        slots, crowns = _slots(box, 3, 3), []
        for x0, y0, x1, y1 in (slots[i] for i in _subset(rng, 9, 3)):
            r = min(x1 - x0, y1 - y0) * rng.uniform(0.3, 0.45)
            cx, cy = rng.uniform(x0 + r, x1 - r), rng.uniform(y0 + r, y1 - r)
            crowns.append((float(cx - r), float(cy - r), float(cx + r), float(cy + r)))
        return _Group(kind, cell, "", box, tuple(crowns))
    if kind == "parking":  # two rows of parking spaces, at least two of them taken
        lot = _inner(rng, box, 0.7, 1.0)
        slots = _slots(lot, 2, min(6, int((lot[2] - lot[0]) / 0.045)))
        cars = tuple(_Car((slots[i][0] + slots[i][2]) / 2, (slots[i][1] + slots[i][3]) / 2, 90.0,
                          _choice(rng, list(_CARS))) for i in _subset(rng, len(slots), 2))
        return _Group(kind, cell, "", lot, cars=cars)
    if kind == "field":
        return _Group(kind, cell, _choice(rng, list(_FIELDS)), _inner(rng, box, 0.8, 1.0))
    return _Group("pond", cell, "", _inner(rng, box, 0.5, 0.9))


def _sample_scene(rng: np.random.Generator, theme: str | None = None, ground: str | None = None) -> _Scene:
    """Sample a scene; the crops of one DOTA-like scene pass the same ``theme`` and ``ground``."""
    theme = theme or _choice(rng, sorted(_THEMES))
    ground = ground or _choice(rng, _THEMES[theme].grounds)
    lines = _sample_lines(_THEMES[theme], rng)
    taken = set().union(*(_line_cells(line) for line in lines))
    free = [cell for cell in sorted(_WHERE) if cell not in taken]
    # fewer groups when lines already take many words, so captions stay near RSICap's 40-90 words
    n = int(rng.integers(*((2, 5), (2, 4), (1, 3))[len(lines)]))
    cells = [free[int(i)] for i in rng.permutation(len(free))][:n]
    groups = tuple(_sample_group(_pick(rng, _THEMES[theme].kinds), cell, _THEMES[theme], rng) for cell in cells)
    return _Scene(theme, ground, lines, groups)


def _plan(n: int, first_scene: int, rng: np.random.Generator) -> list[tuple[str, _Scene]]:
    """``n`` (filename, scene) pairs; each scene id gets 1-4 crops sharing a theme, like DOTA crops."""
    out: list[tuple[str, _Scene]] = []
    scene_id = first_scene
    while len(out) < n:
        theme = _choice(rng, sorted(_THEMES))
        ground = _choice(rng, _THEMES[theme].grounds)
        for crop in range(min(int(rng.integers(1, 5)), n - len(out))):
            out.append((f"P{scene_id:04d}_{crop:04d}.png", _sample_scene(rng, theme, ground)))
        scene_id += 1
    return out


# ---------------------------------------------------------------------------------------------- text

def _num(n: int) -> str:
    return _NUMBERS[n] if n < 20 else _TENS[n // 10] + ("-" + _NUMBERS[n % 10] if n % 10 else "")


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _a(noun: str) -> str:
    return noun if noun == "farmland" else ("an " if noun[0] in "aeiou" else "a ") + noun


def _line_where(line: _Line) -> str:
    if line.orient in (_NWSE, _NESW):
        return "diagonally through the center of the image"
    sides = ("along the left side", "through the center", "along the right side") if line.orient == _NS \
        else ("along the top", "through the center", "along the bottom")
    return sides[line.index] + " of the image"


def _line_sentence(line: _Line, rng: np.random.Generator) -> str:
    start, end = line.orient.split("-")
    if line.kind == "river":
        verb = _choice(rng, ("A river flows", "A winding river runs"))
        return f"{verb} from {start} to {end} {_line_where(line)}."
    verb, n = _choice(rng, ("A road runs", "A straight road runs")), len(line.cars)
    cars = "" if n == 0 else f", with {_num(n)} {'car' if n == 1 else 'cars'} on it"
    return f"{verb} from {start} to {end} {_line_where(line)}{cars}."


def _crossings(scene: _Scene) -> list[tuple[str, Cell]]:
    """("road" or "river road", cell) per pair of perpendicular lines: they meet in one grid cell."""
    ns = [line for line in scene.lines if line.orient == _NS]
    ew = [line for line in scene.lines if line.orient == _EW]
    return [(" ".join(sorted({a.kind, b.kind})), (b.index, a.index)) for a in ns for b in ew]


def _group_sentence(g: _Group, rng: np.random.Generator) -> str:
    w, n, c = _WHERE[g.cell], _num(g.count), g.color
    first = _cap(w) + " of the image"
    options = {
        "buildings": (f"There are {n} buildings with {c} roofs {w}.", f"{_cap(n)} buildings with {c} roofs "
                      f"can be seen {w}.", f"{first}, there are {n} buildings with {c} roofs."),
        "parking": (f"{first}, there is a parking lot with {n} cars.",
                    f"A parking lot with {n} cars is located {w}."),
        "trees": (f"A group of {n} trees grows {w}.", f"{first}, there are {n} green trees."),
        "field": (f"There is a {c} field {w}.", f"{first}, there is a {c} farm field."),
        "pond": (f"There is a small pond {w}.", f"A pond lies {w}."),
    }[g.kind]
    if g.kind == "buildings" and g.count == 1:
        options = (f"There is a building with {_a(c + ' roof')} {w}.", f"A single building with {_a(c + ' roof')} "
                   f"stands {w}.")
    return _choice(rng, options)


def _caption(scene: _Scene, rng: np.random.Generator) -> str:
    """RSICap-style caption; every statement is read off the scene model."""
    opening = _choice(rng, ("This is a high-resolution aerial image of {}.",
                            "This aerial image shows {} seen from above.", "The image is a satellite view of {}."))
    parts = [opening.format(_a(scene.theme))] + [_line_sentence(line, rng) for line in scene.lines]
    for kinds, cell in _crossings(scene):
        parts.append(f"The two roads cross {_WHERE[cell]}." if kinds == "road"
                     else f"The road crosses the river on a bridge {_WHERE[cell]}.")
    parts += [_group_sentence(g, rng) for g in scene.groups]
    if not scene.lines:
        parts.append("There are no roads or rivers in the image.")
    # optional sentences, only where they keep the caption near RSICap's 40-90 words
    houses, words = [g.count for g in scene.groups if g.kind == "buildings"], len(" ".join(parts).split())
    if len(houses) > 1 and words <= 80:
        parts.append(f"In total, there are {_num(sum(houses))} buildings in the image.")
        words += 9
    if words < 45 or (words <= 80 and rng.random() < 0.3):
        parts.append(f"The open ground between the objects is {_GROUND[scene.ground][1]}.")
    return " ".join(parts)


_NOUNS = {"buildings": "the buildings with {} roofs", "parking": "the parking lot", "trees": "the trees",
          "field": "the {} field", "pond": "the pond"}


def _ref(g: _Group, scene: _Scene) -> tuple[str, bool]:
    """How a question names ``g`` and whether that name is unique; else the cell is added to it."""
    name = _NOUNS[g.kind].format(g.color)
    unique = sum((h.kind, h.color) == (g.kind, g.color) for h in scene.groups) == 1
    return (name, True) if unique else (f"{name} {_WHERE[g.cell]}", False)


def _relation(a: Cell, b: Cell) -> str:
    """Where cell ``a`` lies seen from cell ``b``, e.g. "To the upper left of"."""
    vert = "upper " if a[0] < b[0] else "lower " if a[0] > b[0] else ""
    hor = "left" if a[1] < b[1] else "right" if a[1] > b[1] else ""
    return f"To the {vert}{hor} of" if hor else "Above" if vert else "Below"


def _be(name: str) -> str:
    return "are" if name.startswith(("the buildings", "the trees")) else "is"


def _qa_candidates(scene: _Scene) -> list[tuple[str, str, str]]:
    """Every (type, question, answer) this scene can answer truthfully."""
    qa = [("scene", "What type of scene is this?", _cap(_a(scene.theme)) + "."),
          ("image", "Is this an aerial image?", "Yes."),
          ("image", "Is this image a panchromatic image or a color image?", "Color image.")]
    roads = [line for line in scene.lines if line.kind == "road"]
    rivers = [line for line in scene.lines if line.kind == "river"]
    kinds = {g.kind for g in scene.groups}
    for question, present in (("Is there a river", rivers), ("Is there a road", roads),
                              ("Is there a parking lot", "parking" in kinds), ("Is there a pond", "pond" in kinds),
                              ("Are there any trees", "trees" in kinds)):
        qa.append(("presence", question + " in the image?", "Yes." if present else "No."))
    if roads:
        qa.append(("presence", "Are there any cars on the road?", "Yes." if any(r.cars for r in roads) else "No."))
        qa.append(("quantity", "How many roads are in the image?", _cap(_num(len(roads))) + "."))
    places = [_line_where(line) for line in roads]
    for line, place in zip(roads, places):
        if len(roads) == 1 or places.count(place) == 1:  # two roads "through the center" can't be told apart
            which = "" if len(roads) == 1 else " " + place
            qa.append(("road_ori", f"What is the orientation of the road{which}?", _cap(line.orient) + "."))
    named = []  # (name, area, cell) of everything with a unique name, for pairwise questions
    if len(rivers) == 1:
        qa.append(("ab_position", "Where is the river?", _cap(_line_where(rivers[0])) + "."))
        named.append(("the river", rivers[0].width, None))
    if len(roads) == 1:
        named.append(("the road", roads[0].width * (1.41 if roads[0].orient in (_NWSE, _NESW) else 1), None))
    for g in scene.groups:
        (ref, unique), w, n = _ref(g, scene), _WHERE[g.cell], _cap(_num(g.count)) + "."
        if g.kind in ("buildings", "trees"):
            qa.append(("quantity", f"How many {g.kind} are {w}?", n))
        if g.kind == "parking":
            qa.append(("quantity", f"How many cars are in {ref}?", n))
        if g.kind in ("buildings", "field"):
            thing = "are the roofs of the buildings" if g.kind == "buildings" else "is the field"
            qa.append(("color", f"What color {thing} {w}?", _cap(g.color) + "."))
        if unique:
            qa.append(("ab_position", f"Where {_be(ref)} {ref}?", _cap(w) + "."))
            named.append((ref, g.footprint, g.cell))
    for i, (a, area_a, cell_a) in enumerate(named):
        for b, area_b, cell_b in named[i + 1:]:
            if cell_a and cell_b:
                qa.append(("re_position", f"Where {_be(a)} {a} relative to {b}?",
                           f"{_relation(cell_a, cell_b)} {b}."))
            if max(area_a, area_b) > 1.5 * min(area_a, area_b):  # only clear-cut comparisons
                qa.append(("area_comp", f"Which covers a larger area, {a} or {b}?",
                           _cap(a if area_a > area_b else b) + "."))
    lots = [g for g in scene.groups if g.kind == "parking"]
    qa.append(("reasoning", "Is there a place to park a car in this area?",
               "No, there is no parking lot." if not lots else f"Yes, there are {_num(len(lots))} parking lots."
               if len(lots) > 1 else f"Yes, there is a parking lot {_WHERE[lots[0].cell]}."))
    if rivers:
        bridge = any(pair == "river road" for pair, _ in _crossings(scene))
        qa.append(("reasoning", "Can a car cross the river?", "Yes, the road crosses the river on a bridge."
                   if bridge else "No, there is no road or bridge across the river."))
    return qa


def _qa_pairs(scene: _Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    """5-10 RSIEval-style question/answer pairs, spread over as many question types as possible."""
    buckets: dict[str, list[tuple[str, str, str]]] = {}
    for cand in _qa_candidates(scene):
        buckets.setdefault(cand[0], []).append(cand)
    queues = [[b[int(i)] for i in rng.permutation(len(b))] for b in buckets.values()]
    queues = [queues[int(i)] for i in rng.permutation(len(queues))]
    picked: list[tuple[str, str, str]] = []
    want = int(rng.integers(5, 11))
    while len(picked) < want and any(queues):  # round robin: one question of each type per pass
        picked += [q.pop(0) for q in queues if q][: want - len(picked)]
    return [{"question": q, "answer": a, "type": t} for t, q, a in picked]


# ----------------------------------------------------------------------------------------- rendering

def _shade(color: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return int(color[0] * f), int(color[1] * f), int(color[2] * f)


def _draw_car(draw: ImageDraw.ImageDraw, car: _Car, size: int) -> None:
    a = math.radians(car.angle)
    dx, dy = math.cos(a) * _CAR_LEN / 2, math.sin(a) * _CAR_LEN / 2
    nx, ny = -math.sin(a) * _CAR_WID / 2, math.cos(a) * _CAR_WID / 2
    corners = [(car.x + i * dx + j * nx, car.y + i * dy + j * ny) for i, j in ((1, 1), (1, -1), (-1, -1), (-1, 1))]
    draw.polygon([(x * size, y * size) for x, y in corners], fill=_CARS[car.color])


def _draw_line(draw: ImageDraw.ImageDraw, line: _Line, size: int) -> None:
    ts = np.linspace(-0.1, 1.1, 49)  # past both ends, so diagonals reach the image corners
    edge = [_line_point(line, t, -line.width / 2) for t in ts]
    edge += [_line_point(line, t, line.width / 2) for t in ts[::-1]]
    draw.polygon([(x * size, y * size) for x, y in edge], fill=_WATER if line.kind == "river" else _ROAD)
    if line.kind == "road":  # dashed centre marking
        for t in np.arange(-0.1, 1.1, 0.06):
            (x0, y0), (x1, y1) = _line_point(line, t), _line_point(line, t + 0.03)
            draw.line([(x0 * size, y0 * size), (x1 * size, y1 * size)], fill=(225, 225, 210),
                      width=max(1, size // 170))


def _draw_group(draw: ImageDraw.ImageDraw, g: _Group, size: int) -> None:
    px = [v * size for v in g.area]
    if g.kind == "buildings":
        off, roof = max(1.0, size * 0.008), _ROOFS[g.color]
        for b in g.items:  # shadows first, so no shadow covers a neighbouring roof
            draw.rectangle([v * size + off for v in b], fill=_SHADOW)
        for b in g.items:
            x0, y0, x1, y1 = (v * size for v in b)
            draw.rectangle([x0, y0, x1, y1], fill=roof, outline=_shade(roof, 0.7))
            # a darker half along the long side reads as a pitched roof lit from the north-west
            wide = x1 - x0 > y1 - y0
            half = [x0 + 1, (y0 + y1) / 2] if wide else [(x0 + x1) / 2, y0 + 1]
            draw.rectangle(half + [x1 - 1, y1 - 1], fill=_shade(roof, 0.85))
    elif g.kind == "trees":
        for b in g.items:
            draw.ellipse([v * size for v in b], fill=_TREE, outline=(25, 65, 30))
    elif g.kind == "parking":
        draw.rectangle(px, fill=_LOT, outline=(200, 200, 200))
        for car in g.cars:
            _draw_car(draw, car, size)
    elif g.kind == "field":
        draw.rectangle(px, fill=_FIELDS[g.color])
        for x in np.arange(px[0] + 2, px[2] - 1, max(3, size // 64)):  # crop rows
            draw.line([(x, px[1]), (x, px[3])], fill=_shade(_FIELDS[g.color], 0.85))
    else:
        draw.ellipse(px, fill=_WATER, outline=_shade(_WATER, 0.8))


def _render(scene: _Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image."""
    # All noise is drawn first and in fixed amounts, independent of the content: two scenes rendered
    # with equal generators differ only where their drawings differ (the tests rely on this).
    patches = [np.asarray(Image.fromarray(rng.normal(0, 1, (6, 6)).astype(np.float32))
                          .resize((size, size), Image.Resampling.BILINEAR))[..., None] for _ in range(2)]
    grain = rng.normal(0, 4.0, (size, size, 3))
    ground = (np.array(_GROUND[scene.ground][0], dtype=np.float32) + patches[0] * 10  # brightness
              + patches[1] * np.array([6, -3, -6], dtype=np.float32))  # and hue patches
    img = Image.fromarray(np.clip(ground, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for line in sorted(scene.lines, key=lambda line: line.kind == "road"):  # roads last: bridges over rivers
        _draw_line(draw, line, size)
    for car in (car for line in scene.lines for car in line.cars):
        _draw_car(draw, car, size)
    for g in scene.groups:
        _draw_group(draw, g, size)
    return Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).round().astype(np.uint8))


# -------------------------------------------------------------------------------------------- output

@dataclass(frozen=True)
class SynthSummary:
    rsicap_dir: Path
    rsieval_dir: Path
    train_images: int
    test_images: int
    train_scenes: int
    test_scenes: int


def _rng(*key: int) -> np.random.Generator:
    # One generator per (seed, split, image, purpose): each image and text is independent of the others.
    return np.random.default_rng(list(key))


def _check(**args: tuple[int, int]) -> None:
    for name, (value, low) in args.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _scene_ids(plan: list[tuple[str, _Scene]]) -> set[int]:
    return {int(name[1:].split("_")[0]) for name, _ in plan}


def write_synthetic_datasets(out_dir: str | Path, train_images: int, test_images: int, seed: int = 0,
                             image_size: int = 256, overwrite: bool = False) -> SynthSummary:
    """Write ``out_dir/RSICap`` (captions) and ``out_dir/RSIEval`` (captions + QA) of synthetic scenes.

    Test scene ids start after the last train scene id, so no scene has crops in both sets. Raises
    ``ValueError`` for bad arguments and ``OutputExistsError`` if either folder is non-empty and
    ``overwrite`` is False (both are checked before anything is written).
    """
    _check(train_images=(train_images, 1), test_images=(test_images, 0), image_size=(image_size, 64),
           seed=(seed, 0))
    cap_dir, eval_dir = Path(out_dir) / "RSICap", Path(out_dir) / "RSIEval"
    for folder in (cap_dir, eval_dir):  # refuses, before writing anything, if either holds data
        prepare_output_dir(folder, overwrite)
    for folder in (cap_dir, eval_dir):
        (folder / "images").mkdir()
    train = _plan(train_images, 0, _rng(seed, 0))
    test = _plan(test_images, max(_scene_ids(train)) + 1, _rng(seed, 1))
    # Images go straight into the fresh folders; the JSON, written last and atomically, is what
    # makes a dataset exist, so an interrupted run never looks complete.
    captions, evals = [], []
    for i, (name, scene) in enumerate(train):
        _render(scene, image_size, _rng(seed, 0, i, 0)).save(cap_dir / "images" / name, compress_level=1)
        captions.append({"image_id": str(i), "filename": name, "text_input": RSICAP_PROMPTS[i % 4],
                         "text_output": _caption(scene, _rng(seed, 0, i, 1))})
    for i, (name, scene) in enumerate(test):
        _render(scene, image_size, _rng(seed, 1, i, 0)).save(eval_dir / "images" / name, compress_level=1)
        evals.append({"filename": name, "caption": _caption(scene, _rng(seed, 1, i, 1)),
                      "qa_pairs": _qa_pairs(scene, _rng(seed, 1, i, 2))})
    atomic_write_json(cap_dir / "captions.json", {"annotations": captions})
    atomic_write_json(eval_dir / "annotations.json", {"annotations": evals})
    return SynthSummary(cap_dir, eval_dir, len(train), len(test), len(_scene_ids(train)), len(_scene_ids(test)))


def caption_corpus(n: int, seed: int = 0) -> list[str]:
    """n synthetic captions plus question/answer strings, without drawing images (fast).

    Used to train the tiny model's tokenizer, so it comes from the same generators as the datasets:
    the first ``n`` strings are exactly the captions of the first ``n`` RSICap images that
    :func:`write_synthetic_datasets` writes for ``seed``; question and answer strings follow.
    """
    _check(n=(n, 0), seed=(seed, 0))
    plan = _plan(n, 0, _rng(seed, 0))
    captions = [_caption(scene, _rng(seed, 0, i, 1)) for i, (_, scene) in enumerate(plan)]
    qa = [text for i, (_, scene) in enumerate(plan) for pair in _qa_pairs(scene, _rng(seed, 0, i, 2))
          for text in (pair["question"], pair["answer"])]
    return captions + qa
