"""Caption fidelity of a text-to-image shapes model: does the image show what the caption asks for?

    python benchmarks/t2i_caption_fidelity.py [--model DIR] [--num 200] [--cfg-scale 3.0] [--seed 0]
        [--train-cache runs/cache/shapes32_s2_t2i_minilm24] [--held-out "red star,..."] [--out result.json]
    python benchmarks/t2i_caption_fidelity.py --readers-only [--num 2000]   # the readers' own accuracy

Prompts are held-out captions: the captions of ``ShapesDataset(split="test")`` items (a hash stream the
training split never uses), in two groups:

* ``seen_pairs``: test captions whose (colour, shape) pair occurs in training (``--train-cache`` also
  splits off the captions whose exact text never occurs in training: ``seen_pairs_novel_caption``);
* ``held_out_pairs``: test captions with one of the :data:`HELD_OUT` (colour, shape) pairs that
  ``configs/shapes_t2i.yaml`` leaves out of training (``visar tokenize --exclude-caption``): combinations the
  model never saw.

What each caption asks for is parsed from its words (:func:`parse_caption`: shape, colour, background,
size, position; they are exactly the renderer's ground truth, which the test suite checks). What an image
shows is read by:

* shape: the bundled shapes classifier (``visar/assets/classifier``);
* background: the four corner pixels (the shape never reaches them), flat or the two ends of a gradient,
  matched to the named backgrounds;
* colour: the median of the pixels farthest from the background (a background model interpolated from the
  corners), matched to the named colours;
* size: the area of the foreground (pixels farther from the background than half the largest distance),
  divided by the asked shape's area at scale 1, gives the scale, cut at the renderer's 0.48 / 0.64;
* position: the foreground's centroid, cut at the renderer's +-0.2.

The readers are not perfect (a shape near a size or position boundary, anti-aliasing, VQ artefacts), so the
same readers are also scored on the VQ reconstructions of the real images of the same captions
(``reader_ceiling``): a model cannot be measured above that. ``all_correct`` counts an image right when all
five attributes are. Writes JSON to stdout (and ``--out``). Not a timed test: a measurement.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from visar.data.shapes import BACKGROUNDS, CLASSES, COLOURS, ShapesDataset  # noqa: E402

ATTRIBUTES = ("shape", "colour", "background", "size", "position")
#: (colour, shape) pairs left out of training by configs/shapes_t2i.yaml, as caption phrases
HELD_OUT = ("orange circle", "pink square", "cyan triangle", "red star", "yellow cross", "green ring",
            "white diamond", "blue hexagon", "purple heart", "brown set of stripes")
#: the renderer's cuts (visar.data.shapes.ShapesDataset.captions)
SIZE_CUTS, POSITION_CUT = (0.48, 0.64), 0.2


# ---------------------------------------------------------------------------------------------- captions
def _alternation(names) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_NOUNS = {("set of stripes" if c == "stripes" else c): c for c in CLASSES}
_CAPTION = re.compile(
    rf"^a (?P<size>small|medium|large) (?P<colour>{_alternation(COLOURS)}) (?P<noun>{_alternation(_NOUNS)}) "
    rf"on a (?P<background>{_alternation(BACKGROUNDS)})(?P<gradient> gradient)? background"
    r"(?:, (?:at|on) the (?P<position>(?:top|bottom)(?: left| right)?|left|right))?(?P<rotated>, rotated)?$")


def parse_caption(caption: str) -> dict:
    """``{"shape", "colour", "background", "size", "position"}`` asked for by a shapes caption (position:
    ``"top left"``, ``"right"``, ... or ``"centre"``). Raises ``ValueError`` for text of another form."""
    m = _CAPTION.match(caption)
    if m is None:
        raise ValueError(f"not a shapes caption: {caption!r}")
    return {"shape": _NOUNS[m["noun"]], "colour": m["colour"], "background": m["background"], "size": m["size"],
            "position": m["position"] or "centre"}


def held_out_phrase(caption: str, held_out=HELD_OUT) -> str | None:
    for p in held_out:
        if re.search(rf"(?<!\w){re.escape(p)}(?!\w)", caption):
            return p
    return None


# ---------------------------------------------------------------------------------------------- readers
_FG = torch.tensor(list(COLOURS.values()))
_BG = torch.tensor(list(BACKGROUNDS.values()))
_BG_OTHER = torch.where(_BG.mean(-1, keepdim=True) > 0.5, _BG * 0.55, (_BG + 0.35).clamp(max=1.0))  # gradient ends


@functools.lru_cache(maxsize=None)
def shape_geometry(n: int = 301) -> dict[str, dict]:
    """Per shape kind at scale 1 (local units, radius ~1), from the renderer's signed distances: ``area``, and
    ``offset`` (distance from the rotation centre to the area centroid, along the axis where the shape is
    skewed; ``skew`` the sign of the third moment along that direction). Only the heart's centroid is off
    its centre; the position reader moves the heart's centroid back to its centre."""
    from visar.data.shapes import _sdf  # the renderer's own geometry

    c = torch.linspace(-1.3, 1.3, n, dtype=torch.float64)
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    p = torch.stack([xs, ys], -1).reshape(-1, 2)
    cell = (2.6 / (n - 1)) ** 2
    out = {}
    for k in CLASSES:
        pts = p[(_sdf(k, p[None]) < 0)[0]]
        centroid = pts.mean(0)
        off = float(centroid.norm())
        u = centroid / off if off > 1e-9 else torch.tensor([0.0, 1.0], dtype=torch.float64)
        proj = (pts - centroid) @ u
        out[k] = {"area": len(pts) * cell, "offset": off, "skew": float(torch.sign((proj ** 3).mean()))}
    return out


def _size_name(scale: float) -> str:
    return "small" if scale < SIZE_CUTS[0] else ("medium" if scale < SIZE_CUTS[1] else "large")


def _position_name(cx: float, cy: float) -> str:
    v = "top" if cy > POSITION_CUT else ("bottom" if cy < -POSITION_CUT else "")
    h = "right" if cx > POSITION_CUT else ("left" if cx < -POSITION_CUT else "")
    return " ".join(w for w in (v, h) if w) or "centre"


def _centre(w: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor, geometry: dict, scale: float) -> tuple[float, float]:
    """The shape's rotation centre: the foreground centroid, moved back by the shape's centroid offset along the
    principal axis where the foreground is skewed (the heart's symmetry axis; a no-op for centred shapes)."""
    pts = torch.stack([gx[w], gy[w]], -1).double()
    centroid = pts.mean(0)
    if geometry["offset"] < 0.02 or len(pts) < 3:
        return float(centroid[0]), float(centroid[1])
    d = pts - centroid
    _, vecs = torch.linalg.eigh(d.T @ d)
    m3 = [float(((d @ vecs[:, j]) ** 3).mean()) for j in range(2)]
    j = int(abs(m3[1]) > abs(m3[0]))
    u = vecs[:, j] * (1.0 if (m3[j] > 0) == (geometry["skew"] > 0) else -1.0)  # points from centre to centroid
    c = centroid - u * geometry["offset"] * scale
    return float(c[0]), float(c[1])


def read_attributes(images: torch.Tensor, asked_shapes: list[str], geometry: dict[str, dict]) -> list[dict]:
    """Colour, background, size and position read from ``images [N, 3, S, S]`` in ``[-1, 1]``.

    ``asked_shapes`` (the caption's shape of each image) sets the area of scale 1 used for the size and the
    centroid offset used for the position (:func:`shape_geometry`).
    """
    x = ((images.float().clamp(-1, 1) + 1) / 2).cpu()  # [N, 3, S, S] in [0, 1]
    N, _, S, _ = x.shape
    fg_names, bg_names = list(COLOURS), list(BACKGROUNDS)
    k = max(1, S // 16)  # corner patch side (2 px at 32 px)
    corners = torch.stack([x[:, :, :k, :k], x[:, :, :k, -k:], x[:, :, -k:, :k], x[:, :, -k:, -k:]], 1).mean((-1, -2))
    t = torch.linspace(0, 1, S)  # bilinear background from the corners [N, 4 (tl, tr, bl, br), 3]
    top = corners[:, 0, :, None] * (1 - t) + corners[:, 1, :, None] * t          # [N, 3, S] along x
    bottom = corners[:, 2, :, None] * (1 - t) + corners[:, 3, :, None] * t
    back = top[:, :, None, :] * (1 - t)[:, None] + bottom[:, :, None, :] * t[:, None]  # [N, 3, S(y), S(x)]
    dist = (x - back).norm(dim=1)  # [N, S, S]
    c = (torch.arange(S) + 0.5) / S * 2 - 1
    gy, gx = torch.meshgrid(-c, c, indexing="ij")  # y up
    out = []
    for i in range(N):
        d = dist[i]
        pair = torch.cdist(corners[i], corners[i])
        a, b = divmod(int(pair.argmax()), 4)
        if float(pair.max()) < 0.1:  # flat
            bg = int((_BG - corners[i].mean(0)).norm(dim=-1).argmin())
        else:  # gradient: one end is the named background, the other its lighter / darker version
            e1, e2 = corners[i, a], corners[i, b]
            score = torch.minimum((_BG - e1).norm(dim=-1) + (_BG_OTHER - e2).norm(dim=-1),
                                  (_BG - e2).norm(dim=-1) + (_BG_OTHER - e1).norm(dim=-1))
            bg = int(score.argmin())
        peak = float(d.max())
        mask = d > max(0.12, 0.5 * peak)
        if not bool(mask.any()):
            out.append({"colour": None, "background": bg_names[bg], "size": None, "position": None})
            continue
        core = d >= 0.7 * peak
        rgb = x[i][:, core].median(dim=1).values
        colour = fg_names[int((_FG - rgb).norm(dim=-1).argmin())]
        geo = geometry[asked_shapes[i]]
        scale = math.sqrt(float(mask.sum()) / (geo["area"] * (S / 2) ** 2))
        cx, cy = _centre(mask, gx, gy, geo, scale)
        out.append({"colour": colour, "background": bg_names[bg], "size": _size_name(scale),
                    "position": _position_name(cx, cy)})
    return out


@torch.no_grad()
def read_images(images: torch.Tensor, asked: list[dict], classifier, geometry) -> list[dict]:
    """Every attribute of every image (shape from the classifier)."""
    shapes = classifier.predict(images.float()).tolist()
    read = read_attributes(images, [a["shape"] for a in asked], geometry)
    return [{**r, "shape": CLASSES[s]} for r, s in zip(read, shapes)]


def score(asked: list[dict], read: list[dict]) -> dict:
    """Per-attribute accuracy and the all-attributes-correct rate of ``read`` against ``asked``."""
    n = len(asked)
    if n == 0:
        return {"num": 0}
    right = {a: [q[a] == r[a] for q, r in zip(asked, read)] for a in ATTRIBUTES}
    res = {"num": n, **{a: sum(v) / n for a, v in right.items()}}
    res["all_correct"] = sum(all(right[a][i] for a in ATTRIBUTES) for i in range(n)) / n
    return res


def breakdown(asked: list[dict], read: list[dict], attribute: str, by: str) -> dict[str, dict]:
    """Accuracy of ``attribute`` per asked value of ``by`` (e.g. shape accuracy per asked size):
    ``{value: {"num": n, "accuracy": a}}``, values in sorted order."""
    out: dict[str, dict] = {}
    for value in sorted({q[by] for q in asked}):
        rows = [(q, r) for q, r in zip(asked, read) if q[by] == value]
        out[value] = {"num": len(rows), "accuracy": sum(q[attribute] == r[attribute] for q, r in rows) / len(rows)}
    return out


# ---------------------------------------------------------------------------------------------- prompts
def test_prompts(num: int, held_out=HELD_OUT, seed: int = 0, size: int = 32) -> dict[str, list[int]]:
    """Indices of ``ShapesDataset(split="test")`` items: ``num`` with a held-out pair, ``num`` without."""
    groups: dict[str, list[int]] = {"seen_pairs": [], "held_out_pairs": []}
    ds = ShapesDataset(size=size, length=10_000_000, split="test", seed=seed)
    start = 0
    while min(len(v) for v in groups.values()) < num:
        caps = ds.captions(range(start, start + 4096))
        for j, c in enumerate(caps):
            g = "held_out_pairs" if held_out_phrase(c, held_out) else "seen_pairs"
            if len(groups[g]) < num:
                groups[g].append(start + j)
        start += 4096
        if start > 4_000_000:
            raise ValueError(f"fewer than {num} test captions hold a held-out pair {list(held_out)}")
    return groups


def training_captions(cache: str | None) -> set[str] | None:
    if not cache:
        return None
    p = Path(cache) / "captions.json"
    if not p.is_file():
        raise FileNotFoundError(f"--train-cache {cache} has no captions.json (a token cache built with --text-encoder)")
    return set(json.loads(p.read_text())["captions"])


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    from visar.eval.classifier import load_classifier
    from visar.eval.sampling import chunk_seed, weights_state_sha256

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="text-to-image pipeline folder (default: the bundled one)")
    ap.add_argument("--num", type=int, default=200, help="prompts per group (default: 200)")
    ap.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the model's stored one)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="more sampling options (JSON)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the test split (default: 0)")
    ap.add_argument("--batch-size", type=int, default=50, help="prompts per generate call (default: 50)")
    ap.add_argument("--held-out", default=",".join(HELD_OUT), help="comma-separated held-out caption phrases")
    ap.add_argument("--train-cache", default=None, help="training token cache (captions.json): marks novel captions")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--readers-only", action="store_true",
                    help="no model: score the readers on test items 0..num-1, rendered and through --tokenizer")
    ap.add_argument("--tokenizer", default="visar/assets/shapes-llamagen", help="VQ folder for --readers-only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.readers_only:
        return _emit(readers_only(args.num, args.tokenizer, args.data_seed), args.out)
    from visar.cli import load_t2i_pipeline
    from visar.eval.cli import key_value_option

    t0 = time.perf_counter()
    pipe = load_t2i_pipeline(args.model, args.device)
    options = dict(key_value_option(o) for o in args.option)
    if args.cfg_scale is not None:
        options["cfg_scale"] = args.cfg_scale
    held_out = tuple(p.strip() for p in args.held_out.split(",") if p.strip())
    classifier = load_classifier(device=args.device)
    geometry = shape_geometry()
    size = pipe.generator.grid_size * pipe.tokenizer.downsample  # 32 px for the shapes VQ
    ds = ShapesDataset(size=size, length=10_000_000, split="test", seed=args.data_seed)
    groups = test_prompts(args.num, held_out, args.data_seed, size)
    seen = training_captions(args.train_cache)
    result = {"model": args.model or "bundled", "weights_sha256": weights_state_sha256(pipe),
              "text_encoder": pipe.text_encoder.describe(), "options": pipe.sampler.resolve(pipe.options_for(
                  pipe.sampler, options)), "seed": args.seed, "data_seed": args.data_seed, "num_per_group": args.num,
              "held_out": list(held_out), "image_size": size, "groups": {}, "reader_ceiling": {}}
    for g, idx in groups.items():
        captions = ds.captions(idx)
        asked = [parse_caption(c) for c in captions]
        real = ds.render(idx)[0]
        recon = torch.cat([pipe.tokenizer.decode(pipe.tokenizer.encode(real[i:i + 256].to(pipe.device))).clamp(-1, 1)
                           for i in range(0, len(real), 256)]).cpu()
        result["reader_ceiling"][g] = score(asked, read_images(recon, asked, classifier, geometry))
        images = []
        for s in range(0, len(captions), args.batch_size):
            images.append(pipe.generate(prompts=captions[s:s + args.batch_size], seed=chunk_seed(args.seed, s),
                                        **options).cpu())
        read = read_images(torch.cat(images), asked, classifier, geometry)
        result["groups"][g] = score(asked, read)
        if seen is not None and g == "seen_pairs":
            novel = [i for i, c in enumerate(captions) if c not in seen]
            result["groups"]["seen_pairs_novel_caption"] = score([asked[i] for i in novel], [read[i] for i in novel])
        result["groups"][g]["shape_by_asked"] = {by: breakdown(asked, read, "shape", by)
                                                 for by in ("shape", "size", "position")}
        result["groups"][g]["examples"] = [{"caption": c, "read": r} for c, r in zip(captions[:5], read[:5])]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return _emit(result, args.out)


def _emit(result: dict, out: str | None) -> dict:
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text)
    return result


@torch.no_grad()
def readers_only(num: int, tokenizer: str, data_seed: int = 0, size: int = 32) -> dict:
    """The readers' accuracy on test items ``0 .. num - 1``: rendered, and encoded + decoded by ``tokenizer``."""
    from visar.eval.classifier import load_classifier
    from visar.tokenizers.base import Tokenizer

    ds = ShapesDataset(size=size, length=num, split="test", seed=data_seed)
    asked = [parse_caption(c) for c in ds.captions(range(num))]
    real = ds.render(range(num))[0]
    tok = Tokenizer.from_pretrained(tokenizer, "tokenizer").eval()
    recon = torch.cat([tok.decode(tok.encode(real[i:i + 256])).clamp(-1, 1) for i in range(0, num, 256)])
    clf, geometry = load_classifier(), shape_geometry()
    return {"num": num, "data_seed": data_seed, "tokenizer": tokenizer,
            "rendered": score(asked, read_images(real, asked, clf, geometry)),
            "through_tokenizer": score(asked, read_images(recon, asked, clf, geometry))}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
